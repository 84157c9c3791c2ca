"""Model selection: the selection metric, guarded by train.select_max_val_error."""

from __future__ import annotations

import pytest

from medwsol.engine.train import SELECT, selection_key


def _pick(rows, metric, guard):
    key, higher = SELECT[metric]
    best, best_epoch = None, None
    for r in rows:
        rank = selection_key(r, key, higher, guard)
        if best is None or rank > best:
            best, best_epoch = rank, r["epoch"]
    return best_epoch


# the demo's trajectory on one machine: localization peaked at the epoch where the classifier collapsed
DEMO = [
    {"epoch": 1, "val_error": 50.0, "valpx_pxap": 37.3},
    {"epoch": 5, "val_error": 0.0, "valpx_pxap": 45.8},
    {"epoch": 9, "val_error": 50.0, "valpx_pxap": 62.7},
    {"epoch": 10, "val_error": 5.6, "valpx_pxap": 60.4},
    {"epoch": 11, "val_error": 11.1, "valpx_pxap": 43.4},
]


def test_without_guard_the_metric_alone_decides():
    assert _pick(DEMO, "valpx_pxap", None) == 9


def test_guard_skips_a_collapsed_classifier():
    assert _pick(DEMO, "valpx_pxap", 10.0) == 10
    assert _pick(DEMO, "valpx_pxap", 0.0) == 5


def test_guard_never_met_keeps_the_lowest_val_error():
    rows = [{"epoch": 1, "val_error": 50.0, "valpx_pxap": 70.0}, {"epoch": 2, "val_error": 30.0, "valpx_pxap": 40.0},
            {"epoch": 3, "val_error": 40.0, "valpx_pxap": 90.0}]
    assert _pick(rows, "valpx_pxap", 10.0) == 2


@pytest.mark.parametrize("metric,expected", [("val_loss", 2), ("val_error", 1)])
def test_lower_is_better_metrics(metric, expected):
    rows = [{"epoch": 1, "val_error": 0.0, "val_loss": 0.5}, {"epoch": 2, "val_error": 5.0, "val_loss": 0.1},
            {"epoch": 3, "val_error": 20.0, "val_loss": 0.01}]
    assert _pick(rows, metric, 10.0) == expected
