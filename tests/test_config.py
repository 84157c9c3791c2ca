"""Typed configs: every pipeline validates; every kind of mistake names its YAML path."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medwsol.config import apply_overrides, flatten, load_config, parse_config
from medwsol.errors import ConfigError, RegistryError
from medwsol.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_committed_pipeline_parses(path):
    cfg = parse_config(yaml.safe_load(path.read_text()), str(path))
    assert cfg.name == path.stem
    assert list(cfg.stages) == sorted(cfg.stages, key=["prepare", "train", "evaluate", "infer", "export"].index)


@pytest.mark.parametrize(
    "override, path_in_message",
    [
        ("train.lrr=1", "train.lrr"),
        ("train.epochs=abc", "train.epochs"),
        ("data.batch_size=0", "data.batch_size"),
        ("model.method=minmax", "model.method"),
        ("model.backbone=resnet19", "model.backbone"),
        ("model.params.kmax=-1", "model.params.kmax"),
        ("model.params.nope=1", "model.params.nope"),
        ("slides.overlap=999", "slides"),
        ("tracking.foo=1", "tracking.foo"),
        ("stages=[train,deploy]", "stages[1]"),
    ],
)
def test_bad_values_name_their_yaml_path(override, path_in_message):
    with pytest.raises(ConfigError) as ei:
        load_config(ROOT / "pipelines/demo.yaml", overrides=[override], check=False)
    msg = str(ei.value)
    assert path_in_message in msg
    assert "\n" not in msg
    assert msg.startswith(str(ROOT / "pipelines/demo.yaml"))


def test_did_you_mean_for_methods():
    with pytest.raises(ConfigError, match="did you mean 'minmax_entropy'"):
        load_config(ROOT / "pipelines/demo.yaml", overrides=["model.method=minmax"], check=False)


def test_several_problems_reported_at_once():
    with pytest.raises(ConfigError) as ei:
        load_config(ROOT / "pipelines/demo.yaml", overrides=["train.lrr=1", "data.batch_size=-2"], check=False)
    assert "train.lrr" in str(ei.value) and "data.batch_size" in str(ei.value)


def test_overrides_parse_yaml_values_and_create_sections():
    d = apply_overrides({"name": "x"}, ["train.epochs=3", "data.classes=[a,b]", "model.params.kmax=0.2"])
    assert d["train"]["epochs"] == 3 and d["data"]["classes"] == ["a", "b"] and d["model"]["params"]["kmax"] == 0.2
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["noequals"])


def test_method_params_are_typed_and_defaulted():
    cfg = load_config(ROOT / "pipelines/demo.yaml", overrides=["model.params.minmax_entropy.erase_steps=4"],
                      check=False)
    # the demo's per-method entry (TMI mask) plus the override; the rest are the method's defaults
    assert cfg.model.params["erase_steps"] == 4 and cfg.model.params["sigmoid_w"] == 5.0
    assert cfg.model.params["kmax"] == 0.1
    # switching the method keeps the demo valid: the other method gets its own defaults
    cfg = load_config(ROOT / "pipelines/demo.yaml", overrides=["model.method=weightmap_ce"], check=False)
    assert "area_weight" in cfg.model.params and "sigmoid_w" not in cfg.model.params
    # flat params still work, and a typo in any method's entry names its full path
    cfg = load_config(ROOT / "pipelines/demo.yaml", overrides=["model.params={}", "model.params.erase_steps=2"],
                      check=False)
    assert cfg.model.params["erase_steps"] == 2 and cfg.model.params["sigmoid_w"] == 8.0
    with pytest.raises(ConfigError, match=r"model\.params\.cam\.kmaxx"):
        load_config(ROOT / "pipelines/demo.yaml", overrides=["model.params.cam.kmaxx=1"], check=False)


def test_missing_files_fail_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.manifest"):
        load_config(ROOT / "pipelines/demo.yaml", overrides=[f"data.manifest={tmp_path}/none.csv"], stages=["train"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(ROOT / "pipelines/demo.yaml", overrides=[f"model.pretrained={tmp_path}/w.pth"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config(ROOT / "pipelines/glas.yaml", overrides=[f"data.root={tmp_path}/nope"])
    # unset GlaS root: an error for a run, a note for validate
    with pytest.raises(ConfigError, match="data.root"):
        load_config(ROOT / "pipelines/glas.yaml")
    notes: list[str] = []
    load_config(ROOT / "pipelines/glas.yaml", notes=notes)
    assert notes and "data.root" in notes[0]


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_registry_did_you_mean():
    r = Registry("colour")
    r.register("red")(1)
    with pytest.raises(RegistryError, match="did you mean 'red'"):
        r.get("rde")
    with pytest.raises(RegistryError, match="registered twice"):
        r.register("red")(2)
    assert r.names() == ["red"] and "red" in r


def _cli(*args, cwd=ROOT):
    exe = Path(sys.executable).with_name("medwsol")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_fast_and_exit_codes():
    t0 = time.perf_counter()
    ok = _cli("validate", "pipelines/demo.yaml", "pipelines/glas.yaml")
    assert time.perf_counter() - t0 < 10  # the budget (2 s) is asserted on imports below; this is a sanity bound
    assert ok.returncode == 0, ok.stderr
    bad = _cli("validate", "pipelines/demo.yaml", "--set", "train.lrr=1")
    assert bad.returncode == 2
    lines = [l for l in bad.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "train.lrr" in lines[0] and "Traceback" not in bad.stderr


def test_help_and_validate_do_not_import_heavy_modules():
    code = (
        "import sys; from typer.testing import CliRunner; from medwsol.cli import app; "
        "r = CliRunner().invoke(app, ['validate', 'pipelines/demo.yaml']); assert r.exit_code == 0, r.output; "
        "CliRunner().invoke(app, ['--help']); "
        "heavy = [m for m in ('torch', 'monai', 'mlflow') if m in sys.modules]; print(heavy); assert not heavy, heavy"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
