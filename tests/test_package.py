"""The model package: build, load, verify; the MLflow pyfunc and registry; serving settings from the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from medwsol.engine.served import ServedModel, served_from_package
from medwsol.errors import ConfigError, PackageError, TrackingError
from medwsol.methods.base import build_method
from medwsol.package import SCHEMA_VERSION, build_package, load_package, read_package_meta

CLASSES = ["normal", "tumour"]
ROOT = Path(__file__).resolve().parents[1]


def make_package(folder: Path, method: str = "minmax_entropy", tau: float = 0.42, manifest_hash: str = "abc",
                 seed: int = 0, **kw) -> Path:
    torch.manual_seed(seed)
    net = build_method(method, num_classes=2, output_stride=16).eval()
    model = {**net.describe(), "extra_state": net.extra_state()}
    cal = {"map_range": [0.1, 2.5] if net.normalizes_per_image else None, "map_range_fitted_on": "test",
           "score": kw.pop("score", "weight_x_prob"), "positive_class": "tumour", "tau": tau, "tau_chosen_on": "test"}
    prov = {"run_id": "r1", "data_manifest_sha256": manifest_hash, "guard_met": True,
            "metrics": {"served_test": {"pxap": 61.5, "tau": {"dice_fg": 70.25, "f1_pos": 68.0, "f1_neg": 80.5}}}}
    return build_package(folder, net.state_dict(), model, CLASSES, "tumour",
                         {"tile_size": 64, "target_mpp": 2.0, "mpp_source": "test"}, cal, prov)


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("pkg") / "package")


def tiles(n=3, size=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def as_input(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float().div(255).permute(0, 3, 1, 2).contiguous()


def test_round_trip_gives_identical_outputs(pkg_dir, tmp_path):
    torch.manual_seed(0)
    ref = build_method("minmax_entropy", num_classes=2, output_stride=16).eval()
    served_ref = ServedModel(ref, CLASSES, "tumour", "weight_x_prob", map_range=(0.1, 2.5), tau=0.42)
    pkg = load_package(pkg_dir)
    served = served_from_package(pkg)
    x = as_input(tiles())
    with torch.no_grad():
        for a, b in zip(served_ref(x), served(x)):
            assert torch.equal(a, b)
    meta = read_package_meta(pkg_dir)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["classes"] == CLASSES
    assert meta["calibration"]["tau"] == 0.42 and meta["input"]["tile_size"] == 64
    assert served.tau == 0.42 and served.score_mode == "weight_x_prob" and served.positive == 1
    # the served weight is the fixed-range transform of the raw map, not the per-image min-max
    with torch.no_grad():
        out = pkg.network(x)
        fixed = pkg.network.map_from_raw(out.extras["raw_map"], 0.1, 2.5)
    assert torch.allclose(served(x)[1], fixed) and not torch.allclose(fixed, out.weight_map)
    # the weights file is safetensors: loadable with no code at all
    from safetensors.torch import load_file

    assert set(load_file(str(pkg_dir / "weights.safetensors"))) == set(pkg.network.state_dict())


def _edit(pkg_dir: Path, tmp_path: Path, fn) -> Path:
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(pkg_dir, dst)
    meta = json.loads((dst / "package.json").read_text())
    fn(meta)
    (dst / "package.json").write_text(json.dumps(meta))
    return dst


def test_newer_schema_edited_json_and_corrupt_weights_fail_in_one_line(pkg_dir, tmp_path):
    newer = _edit(pkg_dir, tmp_path / "a", lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(PackageError, match=r"schema 2 is newer .*fix: upgrade medwsol") as e:
        load_package(newer)
    assert "\n" not in str(e.value)
    edited = _edit(pkg_dir, tmp_path / "b", lambda m: m["calibration"].update(tau=0.1))
    with pytest.raises(PackageError, match="digest mismatch"):
        load_package(edited)
    corrupt = _edit(pkg_dir, tmp_path / "c", lambda m: None)
    data = bytearray((corrupt / "weights.safetensors").read_bytes())
    data[-10:] = b"\0" * 10
    (corrupt / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match its sha256"):
        load_package(corrupt)
    with pytest.raises(PackageError, match="no model package here"):
        load_package(tmp_path)


def test_weights_that_do_not_fit_the_config_fail_in_one_line(tmp_path):
    net = build_method("cam", num_classes=2, backbone="resnet18", output_stride=16)
    wrong = {**net.describe(), "backbone": "resnet34", "extra_state": {}}
    d = build_package(tmp_path / "p", net.state_dict(), wrong, CLASSES, "tumour", {"tile_size": 64},
                      {"map_range": None, "score": "weight", "tau": 0.5}, {})
    with pytest.raises(PackageError, match=r"weights do not fit its model config cam/resnet34") as e:
        load_package(d)
    assert "\n" not in str(e.value)


def test_serving_setup_takes_the_package_and_refuses_conflicts(pkg_dir):
    from medwsol.config import SlidesConfig
    from medwsol.stages import serving_setup

    pkg = load_package(pkg_dir)
    served, s = serving_setup(pkg, SlidesConfig())
    assert (s.tile_size, s.target_mpp, served.tau, served.score_mode) == (64, 2.0, 0.42, "weight_x_prob")
    explicit = SlidesConfig(tile_size=128, overlap=16)
    served, s = serving_setup(pkg, explicit, explicit=set(explicit.model_fields_set))
    assert (s.tile_size, s.overlap, s.target_mpp) == (128, 16, 2.0)  # explicit geometry is kept
    with pytest.raises(ConfigError, match=r"data.classes \['benign', 'malignant'\] conflicts with the classes"):
        serving_setup(pkg, SlidesConfig(), classes=["benign", "malignant"])
    with pytest.raises(ConfigError, match="was chosen for the weight_x_prob score.*also set slides.threshold"):
        serving_setup(pkg, SlidesConfig(score="weight"), explicit={"score"})
    served, _ = serving_setup(pkg, SlidesConfig(score="weight", threshold=0.3), explicit={"score", "threshold"})
    assert served.tau == 0.3 and served.score_mode == "weight" and "explicit" in served.tau_source
    with pytest.raises(ConfigError, match="not one of the model package's classes"):
        serving_setup(pkg, SlidesConfig(positive_class="benign"), explicit={"positive_class"})


def test_the_package_carries_how_its_pipeline_stitches_slides(tmp_path):
    """`medwsol infer --model` with no config stitches as the pipeline that made the package (overlap, blend)."""
    from medwsol.config import SlidesConfig, load_config
    from medwsol.stages import _input_contract, serving_setup

    cfg = load_config(ROOT / "pipelines" / "slides.yaml", check=False)
    contract = _input_contract(cfg)
    assert contract["stitching"] == {"overlap_fraction": 64 / 128, "blend": "feather", "blend_sigma": 0.125}
    net = build_method("cam", num_classes=2, backbone="resnet18", output_stride=16)
    d = build_package(tmp_path / "p", net.state_dict(), {**net.describe(), "extra_state": {}}, CLASSES, "tumour",
                      contract, {"map_range": None, "score": "weight", "tau": 0.5}, {})
    pkg = load_package(d)
    _, s = serving_setup(pkg, SlidesConfig())  # a bare `medwsol infer`: the defaults would be 32 px, feather
    assert (s.tile_size, s.overlap, s.blend) == (128, 64, "feather")
    _, s = serving_setup(pkg, SlidesConfig(tile_size=256), explicit={"tile_size"})
    assert s.overlap == 128  # the same fraction of another tile size
    chosen = SlidesConfig(overlap=16, blend="gaussian")
    _, s = serving_setup(pkg, chosen, explicit={"overlap", "blend"})
    assert (s.overlap, s.blend) == (16, "gaussian")  # what the user sets wins


# ---------------------------------------------------------------------------------- MLflow registry


@pytest.fixture()
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def _register(uri, pkg, value, name="tiny", guard=True, manifest="abc", model_uri=None):
    """Register ``pkg`` (logged once per store: versions may share one logged model) with the given tags."""
    from medwsol.stages import model_card
    from medwsol.tracking import MLflowTracker

    t = MLflowTracker(uri, "exp", run_name="r")
    tags, desc = model_card(read_package_meta(pkg))
    tags.update(guard_met=str(guard), data_manifest_sha256=manifest)
    res = t.register(model_uri or t.log_package(pkg), name, "valpx_dice", value, True, tags=tags, description=desc)
    t.close()
    return res


def _logged(uri, pkg) -> str:
    from medwsol.tracking import MLflowTracker

    t = MLflowTracker(uri, "exp", run_name="log")
    model_uri = t.log_package(pkg)
    t.close()
    return model_uri


def test_registry_round_trip_pyfunc_and_model_card(pkg_dir, store, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from medwsol.stages import resolve_package

    res = _register(store, pkg_dir, 50.0)
    assert res["champion_moved"] and res["version"] == "1"
    # the package comes back from the registry unchanged: same digest, same outputs
    pkg = resolve_package("models:/tiny@champion", store, tmp_path)
    assert pkg.digest == read_package_meta(pkg_dir)["digest"]
    x = as_input(tiles())
    with torch.no_grad():
        a = served_from_package(pkg)(x)
        b = served_from_package(load_package(pkg_dir))(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # pyfunc: no pickle anywhere
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    out = model.predict(tiles())
    assert out["probs"].shape == (3, 2) and out["weight_map"].shape == (3, 64, 64) == out["score"].shape
    np.testing.assert_allclose(out["probs"], a[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(out["score"], a[2][:, 0].numpy(), atol=1e-6)
    # the model card a person reads in the UI
    mv = MlflowClient(store).get_model_version("tiny", "1")
    for key in ("method", "classes", "tau", "score", "mpp", "tile_size", "test_dice", "test_pxap", "test_f1_pos",
                "test_f1_neg", "data_manifest_sha256"):
        assert key in mv.tags, key
    assert mv.tags["tau"] == "0.4200" and mv.tags["test_dice"] == "70.25" and mv.tags["classes"] == "normal,tumour"
    assert "tau = 0.420" in mv.description and "Dice 70.25" in mv.description
    reqs = (Path(mlflow.artifacts.download_artifacts("models:/tiny@champion", dst_path=str(tmp_path / "dl")))
            / "requirements.txt").read_text()
    assert "medwsol" not in reqs and "torch==" in reqs and "safetensors" in reqs


def test_loading_the_pyfunc_code_prints_no_mlflow_type_hint_warning():
    # MLflow warns "Add type hints to the `predict` method" at class creation unless the model opts out; the
    # warning used to appear three times in every `make demo` (import, log_model, registration)
    code = "import warnings; warnings.simplefilter('always'); import medwsol.pyfunc_model"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "type hint" not in out.stderr.lower(), out.stderr


def test_champion_moves_only_on_fair_improvement(pkg_dir, store):
    from mlflow import MlflowClient

    client = MlflowClient(store)

    def champion():
        return str(client.get_model_version_by_alias("tiny", "champion").version)

    m = _logged(store, pkg_dir)
    assert _register(store, pkg_dir, 50.0, model_uri=m)["champion_moved"]
    worse = _register(store, pkg_dir, 40.0, model_uri=m)
    assert not worse["champion_moved"] and "does not beat champion v1" in worse["reason"]
    better = _register(store, pkg_dir, 60.0, model_uri=m)
    assert better["champion_moved"] and champion() == "3"
    other_data = _register(store, pkg_dir, 99.0, manifest="other", model_uri=m)
    assert not other_data["champion_moved"] and "another data manifest" in other_data["reason"]
    collapsed = _register(store, pkg_dir, 99.0, guard=False, model_uri=m)
    assert not collapsed["champion_moved"] and "classification guard" in collapsed["reason"]
    assert champion() == "3"
    assert client.get_model_version("tiny", "5").tags["champion_reason"] == collapsed["reason"]


def test_concurrent_registrations_never_move_the_alias_backwards(pkg_dir, store):
    from mlflow import MlflowClient

    m = _logged(store, pkg_dir)
    _register(store, pkg_dir, 10.0, model_uri=m)
    values = [30.0, 70.0, 50.0, 20.0]
    errors = []

    def reg(v):
        try:
            _register(store, pkg_dir, v, model_uri=m)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=reg, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    client = MlflowClient(store)
    champ = client.get_model_version_by_alias("tiny", "champion")
    assert float(champ.tags["select_value"]) == 70.0


def test_registry_errors_are_one_line(store, tmp_path):
    from medwsol.stages import resolve_package

    with pytest.raises(TrackingError, match=r"does not exist") as e:  # a store that is not there is not created
        resolve_package("models:/nope@champion", store, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()
    from mlflow import MlflowClient

    MlflowClient(store).search_registered_models()  # the store exists now, without that model
    with pytest.raises(TrackingError, match=r"models:/nope@champion: cannot load from the model registry") as e:
        resolve_package("models:/nope@champion", store, tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking store"):
        resolve_package("models:/nope@champion", "http://127.0.0.1:9", tmp_path)
    assert not list(tmp_path.glob("medwsol-model-*"))  # the download folder is removed


# ------------------------------------------------------------------------------------ the CLI, end to end


def _cli(args, cwd, env=None, check=True):
    exe = str(Path(sys.executable).with_name("medwsol"))
    res = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_infer_from_the_registry_in_an_empty_folder(pkg_dir, tmp_path):
    """`medwsol infer` with only a models:/ URI: classes, tile size, mpp, score and tau come from the package."""
    from medwsol.data.synthetic_slide import make_synthetic_slide

    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    _register(store, pkg_dir, 50.0, name="medwsol-demo")
    slide = make_synthetic_slide(tmp_path / "slides" / "s1.tif", width=1536, height=1024, mpp=1.0, seed=2)["tif"]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _cli(["infer", str(slide), "--model", "models:/medwsol-demo@champion", "--out", "out",
                "--tracking-uri", store], empty, env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert "tau 0.420 from package models:/medwsol-demo@champion" in " ".join(res.stderr.split())
    meta = json.loads((empty / "out" / "s1" / "meta.json").read_text())
    assert meta["threshold"] == 0.42 and meta["classes"] == CLASSES and meta["tile_size"] == 64
    assert meta["target_mpp"] == 2.0 and meta["score"] == "weight_x_prob"
    assert (empty / "out" / "s1" / "s1.geojson").is_file() and sorted(p.name for p in empty.iterdir()) == ["out"]
    # a conflicting explicit override is one line, exit 2, nothing written
    res = _cli(["infer", str(slide), "--model", "models:/medwsol-demo@champion", "--out", "out2", "--tracking-uri",
                store, "--set", "data.classes=[a,b]"], empty, check=False)
    assert res.returncode == 2 and "conflicts with the classes" in res.stderr and "Traceback" not in res.stderr
    assert not (empty / "out2").exists()
    res = _cli(["infer", str(slide), "--model", "models:/missing@champion", "--out", "out3", "--tracking-uri", store],
               empty, check=False)
    assert res.returncode == 2 and "models:/missing@champion" in res.stderr and not (empty / "out3").exists()
    res = _cli(["infer", str(slide), "--model", "models:/medwsol-demo@champion", "--out", "out4", "--tracking-uri",
                "http://127.0.0.1:9"], empty, check=False)
    assert res.returncode == 2 and "cannot reach the MLflow tracking store" in res.stderr and not (empty / "out4").exists()
    newer = _edit(pkg_dir, tmp_path / "newer", lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    res = _cli(["infer", str(slide), "--model", str(newer), "--out", "out5"], empty, check=False)
    assert res.returncode == 2 and "newer than this medwsol reads" in res.stderr and not (empty / "out5").exists()
    for r in (res,):
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_request(pkg_dir, tmp_path):
    """`mlflow models serve -m models:/<name>@champion --env-manager local` on 127.0.0.1, a bounded request loop."""
    import socket
    import time
    import urllib.error
    import urllib.request

    store = f"sqlite:///{tmp_path}/mlflow.db"
    _register(store, pkg_dir, 50.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = str(Path(sys.executable).parent)  # as with the virtual environment activated (mlflow runs uvicorn)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    exe = str(Path(bindir) / "mlflow")
    proc = subprocess.Popen([exe, "models", "serve", "-m", "models:/tiny@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not come up within 180 s"
            time.sleep(1)
        x = tiles(2, 32)
        req = urllib.request.Request(base + "/invocations", data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        pred = body["predictions"]
        probs = np.asarray(pred["probs"])
        assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
        assert np.asarray(pred["score"]).shape == (2, 32, 32) == np.asarray(pred["weight_map"]).shape
        with torch.no_grad():
            ref = served_from_package(load_package(pkg_dir))(as_input(x))
        np.testing.assert_allclose(probs, ref[0].numpy(), atol=1e-5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
