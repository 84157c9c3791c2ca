"""Run folders: which one a command uses, and what a failed invocation leaves (medwsol.rundir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medwsol.config import load_config
from medwsol.errors import ConfigError
from medwsol.rundir import MARKER, RunSession, latest_run_dir, read_marker, resolve_run_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path):
    return load_config(ROOT / "pipelines/demo.yaml", overrides=[f"run_root={tmp_path}/runs", "model.method=cam",
                                                               "train.epochs=2"], check=False)


def _run(cfg, stamp: str, train: str | None = "finished", files=("checkpoints/best.pt", "checkpoints/last.pt")):
    d = Path(cfg.run_root) / cfg.name / stamp
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    stages = {} if train is None else {"train": {"status": train, "epochs": 2}}
    (d / MARKER).write_text(json.dumps({"format": "medwsol-run", "version": 1, "pipeline": cfg.name, "stages": stages}))
    for f in files:
        (d / f).write_text("weights")
    return d


def test_latest_picks_the_newest_run_that_has_what_the_stage_needs(cfg):
    done = _run(cfg, "20260101-000000")
    failed = _run(cfg, "20260102-000000", train="interrupted")
    _run(cfg, "20260103-000000", train=None, files=())  # made, nothing in it
    (Path(cfg.run_root) / cfg.name / "20260104-000000").mkdir()  # not a run at all
    assert latest_run_dir(cfg, "model") == done
    assert latest_run_dir(cfg, "resume") == failed
    assert latest_run_dir(cfg, "slides") is None
    assert resolve_run_dir(cfg, None, ["evaluate"]) == (done, False)
    assert resolve_run_dir(cfg, None, ["train"], resume=True) == (failed, False)


def test_runs_made_before_the_marker_are_recognised(cfg):
    legacy = _run(cfg, "20250101-000000")
    (legacy / MARKER).unlink()
    assert read_marker(legacy)["pipeline"] == "demo" and read_marker(legacy)["legacy"]
    assert latest_run_dir(cfg, "model") == legacy
    only_config = _run(cfg, "20250102-000000", files=())  # the old bug's leftover: config.yaml and nothing else
    (only_config / MARKER).unlink()
    (only_config / "checkpoints").rmdir()
    assert read_marker(only_config) is None and latest_run_dir(cfg, "model") == legacy


@pytest.mark.parametrize("stages, kw, match", [
    (["train"], {}, "already holds a finished training"),
    (["train"], {"resume": True}, "the training is finished"),
    (["train"], {"resume": True, "overwrite": True}, "choose one"),
    (["evaluate"], {"resume": True}, "only the train stage"),
])
def test_training_into_a_trained_run_needs_resume_or_overwrite(cfg, stages, kw, match):
    d = _run(cfg, "20260101-000000")
    with pytest.raises(ConfigError, match=match):
        resolve_run_dir(cfg, d, stages, **kw)
    assert resolve_run_dir(cfg, d, ["train"], overwrite=True) == (d, False)


def test_a_new_run_folder_is_removed_on_failure_with_the_parents_it_made(cfg):
    d = Path(cfg.run_root) / cfg.name / "20260101-000000"
    with pytest.raises(RuntimeError):
        with RunSession(d, True, cfg.name, "name: demo\n") as s:
            s.mark("train", "running")
            (d / "train_log.csv").write_text("epoch\n1\n")
            raise RuntimeError("boom")
    assert not Path(cfg.run_root).exists()


def test_a_new_run_with_a_resumable_checkpoint_is_kept_and_marked(cfg):
    d = Path(cfg.run_root) / cfg.name / "20260101-000000"
    with pytest.raises(KeyboardInterrupt):
        with RunSession(d, True, cfg.name, "name: demo\n") as s:
            s.mark("train", "running")
            (d / "checkpoints").mkdir()
            (d / "checkpoints" / "last.pt").write_text("epoch 1")
            raise KeyboardInterrupt
    assert read_marker(d)["stages"]["train"]["status"] == "interrupted"


def test_overwrite_puts_the_previous_training_back_when_it_fails(cfg):
    d = _run(cfg, "20260101-000000")
    (d / "eval").mkdir()
    (d / "eval" / "metrics.json").write_text("{}")
    (d / "mlflow_run_id").write_text("old-run")
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError):
        with RunSession(d, False, cfg.name, "name: changed\n", overwrite=True) as s:
            assert not (d / "checkpoints").exists() and not (d / "eval").exists()  # set aside
            (d / "mlflow_run_id").write_text("new-run")
            s.mark("train", "running")
            (d / "checkpoints").mkdir()
            (d / "checkpoints" / "last.pt").write_text("new epoch 1")
            raise RuntimeError("diverged")
    after = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before  # byte for byte, marker and config.yaml included; no hidden folder left


def test_overwrite_that_succeeds_drops_the_previous_training(cfg):
    d = _run(cfg, "20260101-000000")
    with RunSession(d, False, cfg.name, "name: demo\n", overwrite=True) as s:
        s.mark("train", "running")
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "best.pt").write_text("new")
        s.mark("train", "finished", epochs=2)
    assert (d / "checkpoints" / "best.pt").read_text() == "new" and not (d / "checkpoints" / "last.pt").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_a_failed_evaluation_puts_the_previous_one_back(cfg):
    d = _run(cfg, "20260101-000000")
    (d / "eval").mkdir()
    (d / "eval" / "metrics.json").write_text('{"old": 1}')
    marker = (d / MARKER).read_bytes()
    with pytest.raises(RuntimeError):
        with RunSession(d, False, cfg.name, "name: demo\n") as s:
            s.mark("evaluate", "running")
            (d / "eval").mkdir()
            (d / "eval" / "table.md").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (d / "eval").iterdir()) == ["metrics.json"]
    assert (d / MARKER).read_bytes() == marker


def test_finished_slides_of_a_failed_cohort_are_kept(cfg):
    """Ctrl-C after some slides of a new run's cohort: their folders are complete and a re-run skips them."""
    d = Path(cfg.run_root) / cfg.name / "20260101-000000"
    with pytest.raises(KeyboardInterrupt):
        with RunSession(d, True, cfg.name, "name: demo\n") as s:
            s.mark("infer", "running")
            (d / "slides" / "a").mkdir(parents=True)
            (d / "slides" / "a" / "meta.json").write_text("{}")
            raise KeyboardInterrupt
    assert (d / "slides" / "a" / "meta.json").is_file()
    assert read_marker(d)["stages"]["infer"]["status"] == "interrupted"


def test_progress_of_an_earlier_stage_is_recorded_when_a_later_one_fails(cfg):
    """run --resume: training goes on and finishes, then evaluation fails; the marker tells the truth."""
    d = _run(cfg, "20260101-000000", train="stopped")
    with pytest.raises(RuntimeError):
        with RunSession(d, False, cfg.name, "name: demo\n") as s:
            s.mark("train", "running")
            (d / "checkpoints" / "last.pt").write_text("epoch 2 of 2, much longer")
            s.mark("train", "finished", epochs=2)
            s.mark("evaluate", "running")
            raise RuntimeError("boom")
    stages = read_marker(d)["stages"]
    assert stages["train"]["status"] == "finished" and stages["evaluate"]["status"] == "failed"
