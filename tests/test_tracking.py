"""Tracking with the real MLflow (SQLite store in a temp folder): runs, metrics, registry, champion alias."""

from __future__ import annotations

import pytest

from medwsol.errors import TrackingError
from medwsol.tracking import MLflowTracker, NullTracker


@pytest.fixture()
def uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts land beside the store, inside tmp
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_null_tracker_records():
    t = NullTracker()
    t.log_params({"a": 1})
    t.log_metrics({"m": 0.5}, step=2)
    t.log_artifact("x.png", "eval")
    c = t.child("sub")
    t.close("FINISHED")
    assert t.params == {"a": 1} and t.metrics == [({"m": 0.5}, 2)] and t.artifacts == [("x.png", "eval")]
    assert t.children == [c] and t.status == "FINISHED"


def test_mlflow_run_params_metrics_artifacts(uri, tmp_path):
    """The registry and the champion rules are tested with real packages in test_package.py."""
    from mlflow.tracking import MlflowClient

    t = MLflowTracker(uri, "exp", run_name="r1")
    t.log_params({"train.lr": 0.01, "model.method": "cam"})
    for e in range(3):
        t.log_metrics({"loss": 1.0 / (e + 1)}, step=e + 1)
    (tmp_path / "a.txt").write_text("hello")
    t.log_artifact(tmp_path / "a.txt", "eval")
    t.close()

    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(t.run_id)
    assert run.data.params["train.lr"] == "0.01" and run.info.status == "FINISHED"
    hist = c.get_metric_history(t.run_id, "loss")
    assert [m.step for m in hist] == [1, 2, 3]
    assert "eval" in [a.path for a in c.list_artifacts(t.run_id)]


def test_unreachable_server_fails_fast():
    import time

    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="tracking.uri"):
        MLflowTracker("http://127.0.0.1:9", "exp", run_name="x")
    assert time.perf_counter() - t0 < 30
