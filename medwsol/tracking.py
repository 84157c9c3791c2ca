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

__all__ = ["Tracker", "NullTracker", "MLflowTracker", "make_tracker", "download_package", "serving_requirements",
           "CHAMPION"]

CHAMPION = "champion"


@runtime_checkable
class Tracker(Protocol):
    """What core code may ask of a tracker."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_package(self, package_dir: str | Path, name: str = "model") -> str | None: ...
    def register(self, model_uri: str, name: str, metric: str, value: float, higher_is_better: bool,
                 tags: dict[str, Any] | None = None, description: str | None = None) -> dict: ...
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

    def log_package(self, package_dir: str | Path, name: str = "model") -> str | None:
        return None

    def register(self, model_uri: str, name: str, metric: str, value: float, higher_is_better: bool,
                 tags: dict[str, Any] | None = None, description: str | None = None) -> dict:
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
    def log_package(self, package_dir: str | Path, name: str = "model") -> str:
        """Log a model package as an MLflow pyfunc model ("models from code"); return its model URI.

        The pyfunc's code is :mod:`medwsol.pyfunc_model` (copied into the model), the package folder is
        its artifact ``package``, and the medwsol sources travel as ``code_paths``, so the requirements
        name only packages an index serves (torch, monai, safetensors, ...). Nothing is pickled.
        """
        import logging

        import mlflow
        import mlflow.pyfunc
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        import medwsol
        from medwsol import pyfunc_model
        from medwsol.package import read_package_meta

        meta = read_package_meta(package_dir)
        size = int(meta["input"]["tile_size"])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), "tiles")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])), "probs"),
                            TensorSpec(np.dtype(np.float32), (-1, -1, -1), "weight_map"),
                            TensorSpec(np.dtype(np.float32), (-1, -1, -1), "score")]),
        )
        example = np.random.default_rng(0).integers(0, 256, (1, min(size, 64), min(size, 64), 3), dtype=np.uint8)
        mlflow.set_tracking_uri(self.uri)
        quiet = [logging.getLogger(n) for n in ("mlflow.models.model", "mlflow.pyfunc", "mlflow.models.signature")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        try:
            with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=pyfunc_model.__file__,
                    artifacts={"package": str(package_dir)},
                    code_paths=[str(Path(medwsol.__file__).parent)],
                    signature=signature,
                    input_example=example,
                    pip_requirements=serving_requirements(),
                )
        finally:
            for lg, lv in zip(quiet, levels):
                lg.setLevel(lv)
        # keep the run open for the remaining stages
        self.client.update_run(self.run_id, status="RUNNING")
        return info.model_uri

    def register(self, model_uri: str, name: str, metric: str, value: float, higher_is_better: bool,
                 tags: dict[str, Any] | None = None, description: str | None = None) -> dict:
        """Register a new version; move the ``champion`` alias only where it is a fair comparison.

        The alias moves to the new version only when (1) its run met the classification guard
        (tag ``guard_met``), (2) the current champion was trained on the same data manifest (tag
        ``data_manifest_sha256``) with the same selection metric, and (3) its ``value`` beats the
        champion's. Otherwise the version is registered without the alias and the reason is printed
        by the caller and tagged (``champion_reason``). The alias always ends on the best eligible
        version (re-checked after setting it), so concurrent registrations never move it backwards.
        """
        import mlflow

        tags = {k: str(v) for k, v in (tags or {}).items()}
        mlflow.set_tracking_uri(self.uri)
        mv = mlflow.register_model(model_uri, name)
        version = str(mv.version)
        for k, v in {**tags, "select_metric": metric, "select_value": repr(float(value)),
                     "higher_is_better": str(bool(higher_is_better)), "run_id": str(self.run_id)}.items():
            self.client.set_model_version_tag(name, version, k, v)
        if description:
            self.client.update_model_version(name, version, description=description)
        champ = self._champion(name)
        prev_version = None if champ is None else str(champ.version)
        prev_tags = {} if champ is None else dict(champ.tags or {})
        prev_value = float(prev_tags["select_value"]) if "select_value" in prev_tags else None
        reason = None
        if tags.get("guard_met", "True") != "True":
            reason = "its run did not meet the classification guard (train.select_max_val_error)"
        elif champ is not None and prev_tags.get("data_manifest_sha256") != tags.get("data_manifest_sha256"):
            reason = (f"champion v{prev_version} was trained on another data manifest; promote by hand "
                      f"(mlflow: set alias {CHAMPION!r}) if you mean to compare them")
        elif champ is not None and prev_tags.get("select_metric") not in (None, metric):
            reason = f"champion v{prev_version} was selected on {prev_tags.get('select_metric')}, this one on {metric}"
        if reason is None:
            best = self._promote(name, tags.get("data_manifest_sha256"), metric, higher_is_better)
            if best != version:
                reason = f"its {metric} {float(value):.4g} does not beat champion v{best}"
        moved = reason is None
        self.client.set_model_version_tag(name, version, "champion_reason", reason or "best eligible version")
        champion = self._champion(name)
        result = {
            "registered_model": name,
            "version": version,
            "select_metric": metric,
            "value": float(value),
            "previous_champion_version": prev_version,
            "previous_champion_value": prev_value,
            "champion_moved": moved,
            "champion_version": None if champion is None else str(champion.version),
            "reason": reason,
        }
        self.set_tags({f"registry.{k}": v for k, v in result.items()})
        return result

    def _champion(self, name: str):
        try:
            return self.client.get_model_version_by_alias(name, CHAMPION)
        except Exception:  # noqa: BLE001 - no champion yet
            return None

    def _promote(self, name: str, manifest: str | None, metric: str, higher: bool, rounds: int = 3) -> str | None:
        """Point the alias at the best eligible version; re-read and repeat until it stays there."""
        import time

        best = None
        for _ in range(rounds):
            eligible = []
            for mv in self.client.search_model_versions(f"name = '{name}'"):
                t = mv.tags or {}
                if (t.get("data_manifest_sha256") == manifest and t.get("select_metric") == metric
                        and t.get("guard_met", "True") == "True" and "select_value" in t):
                    v = float(t["select_value"])
                    eligible.append(((v if higher else -v), -int(mv.version), str(mv.version)))
            if not eligible:
                return None
            best = max(eligible)[2]
            champ = self._champion(name)
            if champ is not None and str(champ.version) == best:
                return best
            self.client.set_registered_model_alias(name, CHAMPION, best)
            time.sleep(0.05)
        return best

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


def serving_requirements() -> list[str]:
    """pip requirements of the logged pyfunc: what its code imports, pinned to the versions here."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("torch", "monai", "safetensors", "numpy", "pydantic", "pyyaml", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:  # pragma: no cover - every one is a dependency
            reqs.append(dist)
    return reqs


def _check_store_exists(ref: str, tracking_uri: str) -> None:
    """Reading a model from a local store that is not there fails here (MLflow would create an empty one)."""
    local = None
    if tracking_uri.startswith("sqlite:///"):
        local = Path(tracking_uri[len("sqlite:///"):])
    elif tracking_uri.startswith("file://"):
        local = Path(tracking_uri[len("file://"):])
    elif tracking_uri.startswith("file:"):
        local = Path(tracking_uri[len("file:"):])
    if local is not None and not local.exists():
        raise TrackingError(f"--model {ref}: the tracking store {tracking_uri} does not exist ({local} not found); fix: "
                            "point --tracking-uri (or MLFLOW_TRACKING_URI) at the store the model was registered in, "
                            "e.g. sqlite:///path/to/mlflow.db")


def download_package(uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download the model package of a registered model (``models:/name@alias``, ``models:/name/3``,
    ``runs:/<id>/model``) into ``dst``; return the package folder. Nothing is unpickled or executed."""
    _check_store_exists(uri, tracking_uri)
    _check_uri(tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise TrackingError(
            f"--model {uri}: cannot load from the model registry at {tracking_uri} ({first}); "
            "fix: check the name and alias with `mlflow ui`, or pass a package folder"
        ) from None
    found = sorted(local.rglob("package.json"))
    if not found:
        raise TrackingError(f"--model {uri}: the registered model has no medwsol package (an older medwsol registered "
                            "a pickled module); fix: re-register it with this medwsol (train again), or pass a package")
    return found[0].parent
