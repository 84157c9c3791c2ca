"""Slide runtimes (ONNX Runtime fp32 and int8): built from the model package, cached, checked, refused, served.

Real ONNX Runtime sessions on real (synthetic) images; nothing is mocked.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
# one export (~40 s on 2 idle cores) and one int8 quantization are shared by the module's tests
pytestmark = pytest.mark.slow

from medwsol.config import SlidesConfig  # noqa: E402
from medwsol.engine.runtimes import (  # noqa: E402
    OnnxServedModel,
    build_runtime,
    calibration_tiles,
    check_runtime,
    resolve_runtime,
    runtime_cache_dir,
    session_options,
)
from medwsol.engine.served import served_from_package  # noqa: E402
from medwsol.errors import ConfigError, DataError  # noqa: E402
from medwsol.methods.base import build_method  # noqa: E402
from medwsol.package import build_package, load_package, sha256_file  # noqa: E402

CLASSES = ["normal", "tumour"]
TILE = 64


def make_package(folder: Path, manifest: Path | None, method: str = "minmax_entropy", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_method(method, num_classes=2, output_stride=16).eval()
    model = {**net.describe(), "extra_state": net.extra_state()}
    cal = {"map_range": [0.1, 2.5] if net.normalizes_per_image else None, "map_range_fitted_on": "test",
           "score": "weight_x_prob", "positive_class": "tumour", "tau": 0.3, "tau_chosen_on": "test"}
    prov = {"run_id": "r1", "guard_met": True,
            "data_manifest": str(manifest) if manifest else None,
            "data_manifest_sha256": sha256_file(manifest) if manifest and manifest.is_file() else None}
    return build_package(folder, net.state_dict(), model, CLASSES, "tumour",
                         {"tile_size": TILE, "target_mpp": 2.0, "mpp_source": "test"}, cal, prov)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medwsol.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("data")
    return Path(make_synthetic_dataset(root / "syn", n_images=16, size=80, seed=0, classes=tuple(CLASSES),
                                       n_valpx=2))


@pytest.fixture(scope="module")
def pkg(tmp_path_factory, data):
    return load_package(make_package(tmp_path_factory.mktemp("pkg") / "package", data))


@pytest.fixture(scope="module")
def int8(pkg):
    msgs: list[str] = []
    rt = build_runtime(pkg, served_from_package(pkg), "onnx-int8", TILE, threads=2, n_calibration=16,
                       min_dice=None, log=msgs.append)
    return rt, msgs


def test_resolve_runtime_auto_and_device():
    assert resolve_runtime("auto", "cpu") in ("onnx", "onnx-int8", "torch")
    assert resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ConfigError, match="fix:"):
        resolve_runtime("onnx", torch.device("cuda"))
    with pytest.raises(ConfigError, match="fix:"):
        resolve_runtime("tensorrt", "cpu")


def test_session_threads_set_and_spinning_off():
    so = session_options(3)
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_calibration_tiles_come_from_the_valid_split(pkg, data):
    cal = calibration_tiles(pkg, TILE, n=8)
    assert cal.tiles.shape[1:] == (3, TILE, TILE) and 1 <= len(cal.tiles) <= 8
    assert str(data) in cal.source and "valid split" in cal.source
    import pandas as pd

    valid = set(pd.read_csv(data).query("split == 'valid'").image.map(lambda p: Path(p).stem))
    assert set(cal.names) <= valid
    assert cal.tiles.min() >= 0 and cal.tiles.max() <= 1 and cal.tiles.std() > 0.01  # images, not a constant


def test_onnx_fp32_serves_what_the_package_serves(pkg, data):
    served = served_from_package(pkg)
    rt = build_runtime(pkg, served, "onnx", TILE, threads=2, min_dice=0.97)
    assert isinstance(rt, OnnxServedModel) and rt.graph.is_file()
    assert rt.graph.parent == runtime_cache_dir(pkg) == pkg.path / "runtimes" / pkg.digest.split(":")[1]
    for attr in ("classes", "positive_class", "score_mode", "map_range", "tau", "tau_source", "digest"):
        assert getattr(rt, attr) == getattr(served, attr)
    x = torch.from_numpy(calibration_tiles(pkg, TILE, n=5).tiles)
    with torch.inference_mode():
        ref = served(x)
    out = rt(x.contiguous(memory_format=torch.channels_last))  # the slide path's layout
    for a, b in zip(out, ref):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert float((a - b).abs().max()) < 1e-4
    assert rt.describe()["runtime"] == "onnx" and rt.describe()["digest"] == pkg.digest
    assert rt.info["check"]["dice"] > 0.999 and rt.info["check"]["agreement"] == 1.0
    rt2 = pickle.loads(pickle.dumps(rt))  # a Dask worker gets its own session
    assert torch.allclose(rt2(x[:2])[2], out[2][:2])


def test_int8_is_calibrated_on_validation_tiles_cached_and_reused(pkg, int8, data):
    rt, msgs = int8
    assert rt.runtime == "onnx-int8" and rt.graph.name.startswith("int8_")
    info = json.loads(Path(str(rt.graph) + ".json").read_text())
    assert info["recipe"]["format"] == "QDQ" and info["recipe"]["per_channel"]
    assert "valid split" in info["calibration"]["source"] and str(data) in info["calibration"]["source"]
    assert any("quantized" in m for m in msgs)
    import onnx

    ops = {n.op_type for n in onnx.load(str(rt.graph)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    chk = info["check"]
    assert 0.0 <= chk["dice"] <= 1.0 and 0.0 <= chk["agreement"] <= 1.0 and chk["n_tiles"] >= 8
    mtime = rt.graph.stat().st_mtime_ns
    again: list[str] = []
    rt2 = build_runtime(pkg, served_from_package(pkg), "onnx-int8", TILE, threads=1, min_dice=None, log=again.append)
    assert rt2.graph == rt.graph and rt2.graph.stat().st_mtime_ns == mtime
    assert any("reusing" in m for m in again)
    # int8 changes the numbers, but not beyond recognition
    x = torch.from_numpy(calibration_tiles(pkg, TILE, n=4).tiles)
    with torch.inference_mode():
        ref = served_from_package(pkg)(x)
    assert float((rt2(x)[1] - ref[1]).abs().mean()) < 0.2


def test_a_runtime_below_the_floor_is_refused_in_one_line(pkg, int8):
    rt, _ = int8
    info_path = Path(str(rt.graph) + ".json")
    saved = info_path.read_text()
    try:
        info = json.loads(saved)
        info["check"]["dice"] = 0.5  # as a graph whose maps disagree would have measured
        info_path.write_text(json.dumps(info))
        with pytest.raises(ConfigError) as err:
            build_runtime(pkg, served_from_package(pkg), "onnx-int8", TILE, min_dice=0.97)
        msg = str(err.value)
        assert "\n" not in msg and "0.5000" in msg and "0.97" in msg and "fix:" in msg
    finally:
        info_path.write_text(saved)


def test_int8_without_validation_data_says_what_to_pass(tmp_path):
    p = load_package(make_package(tmp_path / "package", tmp_path / "gone.csv"))
    with pytest.raises(DataError, match="calibration-manifest"):
        build_runtime(p, served_from_package(p), "onnx-int8", TILE)


def test_slide_path_with_onnx_runtime_matches_torch_and_keys_differ(pkg, tmp_path):
    from medwsol.data.synthetic_slide import make_synthetic_slide
    from medwsol.engine.infer import infer_slide, load_heatmap

    slide = make_synthetic_slide(tmp_path / "s.tif", width=1024, height=768, mpp=0.5, seed=1)["tif"]
    cfg = SlidesConfig(target_mpp=2.0, tile_size=TILE, overlap=16, output_mpp=8.0, batch_size=8, num_workers=0)
    served = served_from_package(pkg)
    rt = build_runtime(pkg, served, "onnx", TILE, threads=2, min_dice=None)
    a = infer_slide(served, slide, cfg, tmp_path / "torch", "cpu", progress=False)
    b = infer_slide(rt, slide, cfg, tmp_path / "onnx", "cpu", progress=False)
    assert a["tiles"] == b["tiles"] > 0
    ha, _, ma = load_heatmap(Path(a["outputs"]))
    hb, _, mb = load_heatmap(Path(b["outputs"]))
    assert float(np.abs(np.asarray(ha) - np.asarray(hb)).max()) < 1e-4
    assert mb["model"]["runtime"] == "onnx" and ma["key"] != mb["key"]
    # the torch run's outputs are not taken for the onnx run's (and vice versa)
    c = infer_slide(rt, slide, cfg, tmp_path / "torch", "cpu", progress=False)
    assert c["status"] == "ok"


def test_check_runtime_cli(pkg, int8):
    res = subprocess.run([sys.executable, "-m", "medwsol.cli", "package", "check-runtime", "--model", str(pkg.path),
                          "--runtime", "onnx", "--n-tiles", "8", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "valid split" in res.stdout and "| onnx | 8 |" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "medwsol.cli", "package", "check-runtime", "--model", str(pkg.path),
                          "--runtime", "torch"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "not an ONNX runtime" in bad.stderr and "Traceback" not in bad.stderr


def test_infer_from_package_runs_the_configured_runtime_and_auto_falls_back(pkg, int8, tmp_path):
    from rich.console import Console

    from medwsol.data.synthetic_slide import make_synthetic_slide
    from medwsol.stages import infer_from_package, serving_runtime

    slide = make_synthetic_slide(tmp_path / "s.tif", width=768, height=512, mpp=0.5, seed=2)["tif"]
    settings = SlidesConfig(target_mpp=2.0, tile_size=TILE, overlap=0, output_mpp=8.0, batch_size=8, num_workers=0,
                            runtime="onnx-int8", runtime_threads=1)
    df = infer_from_package(pkg, [slide], settings, tmp_path / "out", torch.device("cpu"))
    assert df.status.tolist() == ["ok"]
    meta = json.loads((Path(df.outputs[0]) / "meta.json").read_text())
    assert meta["model"]["runtime"] == "onnx-int8" and "dice" in meta["model"]["check"]
    # auto on a CPU wants int8; calibration tiles that cannot be had make it fall back to onnx, and say so
    console = Console(record=True, width=300)
    bad = settings.model_copy(update={"runtime": "auto", "runtime_calibration": [tmp_path / "missing.csv"]})
    rt = serving_runtime(pkg, served_from_package(pkg), bad, torch.device("cpu"), console)
    assert rt.runtime == "onnx" and "running onnx (fp32)" in console.export_text()
    with pytest.raises(DataError, match="missing.csv"):
        serving_runtime(pkg, served_from_package(pkg), bad.model_copy(update={"runtime": "onnx-int8"}),
                        torch.device("cpu"), console)
