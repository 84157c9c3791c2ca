"""Experiment tracking. The only module that imports mlflow (inside functions).

Core code talks to the small :class:`Tracker` protocol; :class:`NullTracker`
records calls in memory (tests), :class:`MLflowTracker` writes to MLflow
(default store ``sqlite:///mlflow.db``) and its model registry.

Example:
    >>> from medwsol.tracking import NullTracker
    >>> t = NullTracker()
    >>> t.log_metrics({"loss": 0.5}, step=0)
    >>> t.metrics
    [({'loss': 0.5}, 0)]
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medwsol.errors import TrackingError

__all__ = ["Tracker", "NullTracker", "MLflowTracker", "make_tracker", "load_registered_model", "CHAMPION"]

CHAMPION = "champion"


@runtime_checkable
class Tracker(Protocol):
    """What core code may ask of a tracker."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_model(self, model: Any, name: str, example: Any) -> str | None: ...
    def register(self, model_uri: str, name: str, metric: str, value: float, higher_is_better: bool) -> dict: ...
    def child(self, name: str) -> "Tracker": ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Keeps everything in memory; used when tracking is off and in tests."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, Any] = {}
        self.children: list[NullTracker] = []
        self.status: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)

    def log_model(self, model: Any, name: str, example: Any) -> str | None:
        return None

    def register(self, model_uri: str, name: str, metric: str, value: float, higher_is_better: bool) -> dict:
        return {}

    def child(self, name: str) -> "NullTracker":
        c = NullTracker()
        self.children.append(c)
        return c

    def close(self, status: str = "FINISHED") -> None:
        self.status = status


def _quiet_mlflow_env() -> None:
    # fail fast on an unreachable server instead of retrying for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_TRACKING_INSECURE_TLS", os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "false"))


def _check_uri(uri: str) -> None:
    """Reach the tracking store once, before any work, and fail with one line if we cannot."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _quiet_mlflow_env()
    mlflow.set_tracking_uri(uri)
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot track"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise TrackingError(
            f"tracking.uri {uri!r}: cannot reach the MLflow tracking store ({first}); "
            "fix: start the server, correct tracking.uri, or set tracking.enabled=false"
        ) from None


class MLflowTracker:
    """One MLflow run (optionally re-opened by id, or nested under a parent).

    Args:
        uri: tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``).
        experiment: experiment name (created when missing).
        run_name: name of a new run.
        run_id: re-open this run instead of creating one (stages of one pipeline run).
        parent_run_id: create the new run nested under this one.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        _check_uri(uri)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
            except Exception:  # noqa: BLE001
                run = None
            if run is None:
                run_id = None
            else:
                self.client.update_run(run_id, status="RUNNING")
        if run_id is None:
            tags = {"mlflow.runName": run_name or "medwsol"}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name).info.run_id
        self.run_id: str | None = run_id

    # -- logging ---------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(str(k)[:250], str(v)[:6000]) for k, v in params.items() if str(k)[:250] not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), ts, int(step or 0))
            for k, v in metrics.items()
            if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    # -- models ----------------------------------------------------------------------------------
    def log_model(self, model: Any, name: str, example: Any) -> str | None:
        """Log a torch model (pickle serialisation, so any tile size works); return its URI.

        Load it back with ``mlflow.pytorch.load_model`` (what ``--model models:/...`` does): the
        module returns a ``WSOLOutput``, which MLflow's generic pyfunc serving cannot convert, so
        MLflow's serving-example check is silenced rather than printing a misleading warning.
        """
        import logging

        import mlflow
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "image")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1), "weight_map")]),
        )
        import torch

        reqs = [f"torch=={torch.__version__.split('+')[0]}", "monai", "medwsol"]
        mlflow.set_tracking_uri(self.uri)
        quiet = [logging.getLogger(n) for n in ("mlflow.models.model", "mlflow.pytorch")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            info = self._log_model(mlflow, model, name, signature, example, reqs)
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)
        # keep the run open for the remaining stages
        self.client.update_run(self.run_id, status="RUNNING")
        return info.model_uri

    def _log_model(self, mlflow, model, name, signature, example, reqs):
        import numpy as np

        with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
            return mlflow.pytorch.log_model(
                model,
                name=name,
                serialization_format="pickle",
                signature=signature,
                input_example=np.asarray(example, dtype=np.float32),
                pip_requirements=reqs,
            )

    def register(self, model_uri: str, name: str, metric: str, value: float, higher_is_better: bool) -> dict:
        """Register a new version; move the champion alias only if ``value`` beats the champion's."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mv = mlflow.register_model(model_uri, name)
        version = str(mv.version)
        self.client.set_model_version_tag(name, version, "select_metric", metric)
        self.client.set_model_version_tag(name, version, "select_value", repr(float(value)))
        self.client.set_model_version_tag(name, version, "run_id", str(self.run_id))
        prev_version, prev_value = None, None
        try:
            champ = self.client.get_model_version_by_alias(name, CHAMPION)
            prev_version = str(champ.version)
            tags = champ.tags or {}
            if tags.get("select_metric") == metric and "select_value" in tags:
                prev_value = float(tags["select_value"])
        except Exception:  # noqa: BLE001 - no champion yet
            champ = None
        if champ is None or prev_value is None:
            moved = True
        else:
            moved = value > prev_value if higher_is_better else value < prev_value
        if moved:
            self.client.set_registered_model_alias(name, CHAMPION, version)
        result = {
            "registered_model": name,
            "version": version,
            "select_metric": metric,
            "value": float(value),
            "previous_champion_version": prev_version,
            "previous_champion_value": prev_value,
            "champion_moved": moved,
            "champion_version": version if moved else prev_version,
        }
        self.set_tags({f"registry.{k}": v for k, v in result.items()})
        return result

    def child(self, name: str) -> "MLflowTracker":
        exp = self.client.get_experiment(self.experiment_id).name
        return MLflowTracker(self.uri, exp, run_name=name, parent_run_id=self.run_id)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def make_tracker(tracking_cfg: Any, run_name: str, run_id: str | None = None) -> Tracker:
    """MLflowTracker when tracking is enabled, else NullTracker."""
    if not tracking_cfg.enabled:
        return NullTracker()
    return MLflowTracker(tracking_cfg.uri, tracking_cfg.experiment, run_name=run_name, run_id=run_id)


def load_registered_model(uri: str, tracking_uri: str, map_location: str = "cpu"):
    """Load a ``models:/name@alias`` (or ``models:/name/version``) torch model from the registry."""
    _check_uri(tracking_uri)
    import mlflow.pytorch

    try:
        return mlflow.pytorch.load_model(uri, map_location=map_location)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise TrackingError(
            f"--model {uri}: cannot load from the model registry at {tracking_uri} ({first}); "
            "fix: check the name and alias with `mlflow ui`, or pass a checkpoint path"
        ) from None
