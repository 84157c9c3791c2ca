"""What only a real process shows: SIGTERM is Ctrl-C (clean-up, one line, exit 143, the MLflow run KILLED),
and the exit code of a failure is the process's exit code (no abort while worker threads wind down)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("medwsol"))


def _wait_for(pred, proc, timeout=120.0, what="the process"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} ended early: {proc.communicate()[1][-2000:]}")
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not get there in {timeout} s")


def _stop(proc, sig) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _hidden_tmp(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_sigterm_while_writing_a_dataset_leaves_nothing(tmp_path):
    out = tmp_path / "data"
    proc = subprocess.Popen([EXE, "prepare", "synthetic", "--out", str(out), "--n-images", "20000", "--size", "64"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(p.is_dir() and any(p.glob("images/*.png")) for p in tmp_path.glob(".data.*")), proc)
    code, err = _stop(proc, signal.SIGTERM)
    assert code == 143, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "terminated" in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no hidden temporary folder


@pytest.fixture(scope="module")
def trainable(tmp_path_factory):
    from medwsol.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("sig")
    make_synthetic_dataset(root / "data", n_images=24, size=64, n_valpx=2, progress=False)
    return root


def _train(root: Path, *extra: str) -> subprocess.Popen:
    sets = ["data.manifest=data/manifest.csv", "data.source=manifest", "data.patch_size=64", "data.batch_size=4",
            "train.epochs=500", "train.amp=off", "model.method=cam", "train.threads=1", "train.select_metric=val_error",
            "train.select_max_val_error=null", "train.patience=null", "tracking.uri=sqlite:///mlflow.db",
            "tracking.register_as=null", "run_root=runs", *extra]
    cmd = [EXE, "train", str(ROOT / "pipelines/demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _statuses(root: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("medwsol-demo")
    return [r.info.status for r in client.search_runs([exp.experiment_id])]


def test_sigterm_during_training_keeps_the_resumable_run_and_kills_the_mlflow_run(trainable):
    root = trainable
    proc = _train(root)
    runs = root / "runs" / "demo"
    _wait_for(lambda: any(runs.glob("*/checkpoints/last.pt")), proc, what="the first epoch")
    code, err = _stop(proc, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in err
    (run,) = list(runs.iterdir())
    marker = json.loads((run / "medwsol_run.json").read_text())
    assert marker["stages"]["train"]["status"] == "interrupted"
    assert (run / "checkpoints" / "last.pt").is_file() and "--resume" in err
    assert not _hidden_tmp(root)
    assert _statuses(root) == ["KILLED"]
    # the kept run is what `train --resume` picks up (and is not what `evaluate` would use)
    from medwsol.config import load_config
    from medwsol.rundir import latest_run_dir

    cfg = load_config(ROOT / "pipelines/demo.yaml", overrides=["run_root=" + str(root / "runs")], check=False)
    assert latest_run_dir(cfg, "resume") == run and latest_run_dir(cfg, "model") is None
    import shutil

    shutil.rmtree(root / "runs")


def test_sigterm_before_the_first_checkpoint_removes_the_new_run(trainable):
    root = trainable
    proc = _train(root, "tracking.experiment=early")
    runs = root / "runs" / "demo"
    _wait_for(lambda: any(runs.glob("*/medwsol_run.json")), proc, what="the run folder")
    early = not any(runs.glob("*/checkpoints/last.pt"))
    code, err = _stop(proc, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    if early:  # the usual case: nothing to resume, so nothing is left
        assert not runs.exists() or not any(runs.iterdir())
    assert not _hidden_tmp(root)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("early")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["KILLED"]


def test_a_failure_while_caching_the_dataset_exits_2_not_an_abort(trainable):
    """MONAI's caching ThreadPool was still decoding when the interpreter left: 'terminate called...', exit 134."""
    root = trainable
    work = root / "trunc"
    import shutil

    shutil.copytree(root / "data", work, dirs_exist_ok=True)
    rows = (work / "manifest.csv").read_text().splitlines()
    first = rows[1].split(",")[0]
    data = (work / first).read_bytes()
    (work / first).write_bytes(data[: len(data) // 2])
    proc = _train(root, "data.manifest=trunc/manifest.csv", "data.cache=cache", "tracking.enabled=false")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "terminate called" not in err and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and first.split("/")[-1] in lines[0] and "cannot decode" in lines[0]
    assert not (root / "runs").exists()


@pytest.mark.parametrize("sig, exc", [(signal.SIGTERM, "Terminated"), (signal.SIGINT, "KeyboardInterrupt")])
def test_a_swallowed_interrupt_is_raised_again(monkeypatch, sig, exc):
    """CPython drops an interrupt raised inside a finaliser ('Exception ignored'); some libraries catch
    everything. The CLI raises it again a little later, so a single SIGTERM always stops the command."""
    from medwsol import cli
    from medwsol.errors import Terminated

    monkeypatch.setattr(cli, "REARM_SECONDS", 0.3)
    expected = Terminated if exc == "Terminated" else KeyboardInterrupt
    swallowed = []
    with pytest.raises(expected):
        with cli._signals_as_interrupts():
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)
            except KeyboardInterrupt as err:  # what a catch-all library would do
                swallowed.append(err)
            time.sleep(5)  # without the timer, this command would run on
    assert len(swallowed) == 1
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
