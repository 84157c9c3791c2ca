"""Model selection: the trainer's own loop picks best.pt by train.select_metric, guarded by
train.select_max_val_error, with train.select_ties and early stopping.

The loop really trains (cam, tiny synthetic data); only the per-epoch validation scores are scripted
(the trainer's ``_scores`` is replaced), so that the expected best epoch is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medwsol.checkpoint import read_checkpoint
from medwsol.config import load_config
from medwsol.engine import train as train_mod
from medwsol.engine.train import selection_key, train
from medwsol.pipeline import RunContext
from medwsol.stages import stage_prepare
from medwsol.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[1]

# the demo's trajectory on one machine: localization peaked at the epoch where the classifier collapsed
DEMO = [
    {"val_error": 50.0, "valpx_pxap": 37.3},
    {"val_error": 0.0, "valpx_pxap": 45.8},
    {"val_error": 50.0, "valpx_pxap": 62.7},
    {"val_error": 5.6, "valpx_pxap": 60.4},
    {"val_error": 11.1, "valpx_pxap": 43.4},
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sel")
    cfg = _cfg(tmp, [])
    stage_prepare(RunContext(cfg=cfg, run_dir=tmp, tracker=NullTracker()))
    return tmp


def _cfg(tmp, sets):
    base = ["data.synthetic.n_images=16", "data.synthetic.size=64", "data.patch_size=64", "data.batch_size=8",
            "train.amp=off", "model.method=cam", "model.output_stride=32", "train.threads=1", "train.epochs=5",
            "tracking.enabled=false", "train.select_max_val_error=null", "train.patience=null",
            f"data.manifest={tmp}/data/manifest.csv", f"run_root={tmp}/runs"]
    return load_config(ROOT / "pipelines/demo.yaml", overrides=base + list(sets), check=False)


def _run(tmp, run_dir, monkeypatch, trajectory, sets):
    """Train with scripted validation scores; return (summary, best.pt's epoch, train_log)."""
    calls = {"n": 0}

    def fake_scores(model, loader, device, dtype=None, channels_last=False, dist=None):
        epoch, which = divmod(calls["n"], 2)  # per epoch: valid, then valpx
        calls["n"] += 1
        row = trajectory[epoch]
        if which == 0:
            return {"error": row["val_error"], "loss": row.get("val_loss", 1.0), "n": 4}
        return {"error": 0.0, "loss": 1.0, "n": 2, "pxap": row.get("valpx_pxap", 50.0), "miou": 40.0, "dice": 45.0,
                "tau": 0.5}

    monkeypatch.setattr(train_mod, "_scores", fake_scores)  # the merged scores of valid / valpx
    cfg = _cfg(tmp, [f"train.epochs={len(trajectory)}", *sets])
    summary = train(cfg, run_dir, tracker=NullTracker())
    best = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    log = pd.read_csv(run_dir / "train_log.csv")
    return summary, int(best["epoch"]) + 1, log


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["train.select_metric=valpx_pxap"], 3),  # the metric alone: the collapsed classifier wins
        (["train.select_metric=valpx_pxap", "train.select_max_val_error=10"], 4),  # guarded
        (["train.select_metric=val_error"], 2),
    ],
)
def test_trainer_keeps_the_selected_epoch(data_dir, tmp_path, monkeypatch, sets, expected):
    summary, best_epoch, log = _run(data_dir, tmp_path, monkeypatch, DEMO, sets)
    assert summary["best_epoch"] == expected and best_epoch == expected
    assert list(log.epoch) == [1, 2, 3, 4, 5]
    assert list(log.val_error) == [r["val_error"] for r in DEMO]  # the loop saw the scripted scores
    assert log.best.iloc[expected - 1] == 1 and log.best.iloc[expected:].sum() == 0


def test_guard_never_met_keeps_the_lowest_val_error(data_dir, tmp_path, monkeypatch):
    traj = [{"val_error": 50.0, "valpx_pxap": 70.0}, {"val_error": 30.0, "valpx_pxap": 40.0},
            {"val_error": 40.0, "valpx_pxap": 90.0}]
    summary, best_epoch, _ = _run(data_dir, tmp_path, monkeypatch, traj,
                                  ["train.select_metric=valpx_pxap", "train.select_max_val_error=10"])
    assert best_epoch == 2 and summary["best_epoch"] == 2


@pytest.mark.parametrize(("ties", "expected"), [("first", 2), ("last", 4)])
def test_ties_keep_the_first_or_the_last_equal_epoch(data_dir, tmp_path, monkeypatch, ties, expected):
    traj = [{"val_error": 20.0}, {"val_error": 0.0}, {"val_error": 5.0}, {"val_error": 0.0}]
    _, best_epoch, _ = _run(data_dir, tmp_path, monkeypatch, traj, ["train.select_metric=val_error", f"train.select_ties={ties}"])
    assert best_epoch == expected


def test_patience_stops_after_that_many_epochs_without_improvement(data_dir, tmp_path, monkeypatch):
    traj = [{"val_error": 10.0}, {"val_error": 5.0}, {"val_error": 6.0}, {"val_error": 7.0}, {"val_error": 0.0}]
    summary, best_epoch, log = _run(data_dir, tmp_path, monkeypatch, traj, ["train.select_metric=val_error", "train.patience=2"])
    assert summary["stopped_early"] and list(log.epoch) == [1, 2, 3, 4] and best_epoch == 2


def test_selection_key_orders_guarded_epochs():
    collapsed = selection_key({"epoch": 3, "valpx_pxap": 62.7, "val_error": 50.0}, "valpx_pxap", True, 10.0)
    working = selection_key({"epoch": 4, "valpx_pxap": 60.4, "val_error": 5.6}, "valpx_pxap", True, 10.0)
    assert working > collapsed and collapsed == (False, -50.0) and working == (True, 60.4)
    assert selection_key({"epoch": 1, "val_loss": 0.5, "val_error": 0.0}, "val_loss", False, None) == (True, -0.5)
