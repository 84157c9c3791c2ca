"""Tracking with the real MLflow (SQLite store in a temp folder): runs, metrics, registry, champion alias."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medwsol.errors import TrackingError
from medwsol.tracking import CHAMPION, MLflowTracker, NullTracker, load_registered_model


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


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


@pytest.mark.slow
def test_mlflow_run_metrics_and_champion(uri, tmp_path):
    from mlflow.tracking import MlflowClient

    t = MLflowTracker(uri, "exp", run_name="r1")
    t.log_params({"train.lr": 0.01, "model.method": "cam"})
    for e in range(3):
        t.log_metrics({"loss": 1.0 / (e + 1)}, step=e + 1)
    (tmp_path / "a.txt").write_text("hello")
    t.log_artifact(tmp_path / "a.txt", "eval")
    model = Tiny().eval()
    ex = np.zeros((1, 3, 8, 8), np.float32)
    uri1 = t.log_model(model, "model", ex)
    r1 = t.register(uri1, "tiny", "valpx_pxap", 50.0, higher_is_better=True)
    assert r1["champion_moved"] and r1["champion_version"] == "1"
    t.close()

    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(t.run_id)
    assert run.data.params["train.lr"] == "0.01"
    hist = c.get_metric_history(t.run_id, "loss")
    assert [m.step for m in hist] == [1, 2, 3]
    assert "eval" in [a.path for a in c.list_artifacts(t.run_id)]

    # a worse model does not move the champion; a better one does
    t2 = MLflowTracker(uri, "exp", run_name="r2")
    r2 = t2.register(t2.log_model(model, "model", ex), "tiny", "valpx_pxap", 40.0, True)
    assert not r2["champion_moved"] and r2["champion_version"] == "1" and r2["previous_champion_value"] == 50.0
    t3 = MLflowTracker(uri, "exp", run_name="r3")
    r3 = t3.register(t3.log_model(model, "model", ex), "tiny", "valpx_pxap", 60.0, True)
    assert r3["champion_moved"] and str(c.get_model_version_by_alias("tiny", CHAMPION).version) == "3"
    for tr in (t2, t3):
        tr.close()

    # the registered model accepts any input size (pickle serialisation, -1 dims in the signature)
    loaded = load_registered_model("models:/tiny@champion", uri)
    for size in (8, 37):
        x = torch.rand(2, 3, size, size + 3)
        assert torch.allclose(loaded(x), model(x))


def test_unreachable_server_fails_fast():
    import time

    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="tracking.uri"):
        MLflowTracker("http://127.0.0.1:9", "exp", run_name="x")
    assert time.perf_counter() - t0 < 30
