"""The only module that knows every stage: run directories, stage order, tracking lifecycle.

``medwsol run pipelines/X.yaml`` runs ``cfg.stages`` in the order
prepare → train → evaluate → infer → export into ``runs/<name>/<timestamp>/``;
each stage is also its own subcommand working on an existing run directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from medwsol import stages as stage_impl
from medwsol.config import STAGES, PipelineConfig, flatten
from medwsol.errors import ConfigError
from medwsol.io import write_text
from medwsol.rundir import RunSession, latest_run_dir, read_marker, resolve_run_dir

__all__ = ["RunContext", "run_pipeline", "run_distributed_train", "preflight", "resolve_run_dir", "latest_run_dir",
           "STAGE_FUNCS"]


@dataclass
class RunContext:
    """What a stage gets: the config, its run directory, a tracker and stage options."""

    cfg: PipelineConfig
    run_dir: Path
    tracker: Any
    resume: bool = False
    model_ref: str | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def slides_dir(self) -> Path:
        return self.cfg.slides.out_dir or (self.run_dir / "slides")


def preflight(cfg: PipelineConfig, stages: list[str], model_ref: str | None = None) -> None:
    """Check the inputs the stages read before a run folder or an MLflow run exists.

    File existence and output locations are checked when the config is loaded
    (:func:`medwsol.config.check_files`); here the contents that can be checked cheaply: the
    manifest (when no earlier stage writes it; :func:`load_manifest` caches the result, so the
    stage does not read it twice), ``model.pretrained`` and a ``--model`` checkpoint path.
    """
    from medwsol.config import output_problems

    problems = output_problems(cfg, stages)  # again: the config may have changed since it was loaded
    if problems:
        raise ConfigError("; ".join(problems))
    if any(s in stages for s in ("train", "evaluate")) and "prepare" not in stages and cfg.data.manifest.is_file():
        from medwsol.data.manifest import load_manifest

        load_manifest(cfg.data.manifest, list(cfg.data.classes))
    if "train" in stages and cfg.model.pretrained is not None:
        from medwsol.methods.backbones import build_backbone

        build_backbone(cfg.model.backbone, pretrained=cfg.model.pretrained)  # a file that does not fit fails here
    if model_ref is not None and not model_ref.startswith(("models:/", "runs:/")):
        from medwsol.errors import CheckpointError

        path = Path(model_ref)
        if not path.exists():
            raise CheckpointError(f"--model {model_ref!r}: file not found; fix: give a checkpoint (checkpoints/best.pt "
                                  "of a run), a model package folder or a models:/<name>@<alias> URI")
        if path.is_dir():  # a package folder, or a run folder holding one: its description is checked here
            from medwsol.package import is_package_dir, read_package_meta

            read_package_meta(path if is_package_dir(path) or not is_package_dir(path / "package")
                              else path / "package")
        else:  # a checkpoint: read and built (a foreign or damaged description fails here, naming the file)
            from medwsol.checkpoint import model_from_checkpoint, read_checkpoint

            model_from_checkpoint(read_checkpoint(path), source=model_ref)


# -- stages ------------------------------------------------------------------------------------


STAGE_FUNCS: dict[str, Callable[[RunContext], Any]] = {
    "prepare": stage_impl.stage_prepare,
    "train": stage_impl.stage_train,
    "evaluate": stage_impl.stage_evaluate,
    "infer": stage_impl.stage_infer,
    "export": stage_impl.stage_export,
}


def run_pipeline(
    cfg: PipelineConfig,
    config_path: Path | None = None,
    run_dir: Path | None = None,
    stages: list[str] | None = None,
    resume: bool = False,
    model: str | None = None,
    tracker: Any = None,
    package: bool = True,
    overwrite: bool = False,
    create_run_dir: bool = False,
) -> RunContext:
    """Run ``stages`` (default: the YAML's) into a run directory and one tracking run.

    When ``train`` is among the stages and ``package`` is true, the run's model package is built,
    logged and registered right after the last of ``train``/``evaluate`` (:func:`medwsol.stages.package_run`).

    Order: inputs checked (:func:`preflight`), run folder chosen (:func:`medwsol.rundir.resolve_run_dir`),
    tracking store reached, and only then the run folder made; a failure at any point leaves nothing
    this invocation made, except work a re-run continues (see :class:`medwsol.rundir.RunSession`).
    The MLflow run ends FINISHED, FAILED, or KILLED (Ctrl-C, SIGTERM).
    """
    from medwsol.data.manifest import cached_manifests

    with cached_manifests():
        return _run_pipeline(cfg, config_path, run_dir, stages, resume, model, tracker, package, overwrite,
                             create_run_dir)


def _run_pipeline(cfg, config_path, run_dir, stages, resume, model, tracker, package, overwrite,
                  create_run_dir) -> RunContext:
    from rich.console import Console

    console = Console(stderr=True)
    stages = sorted(stages or list(cfg.stages), key=STAGES.index)
    preflight(cfg, stages, model)
    rd, is_new = resolve_run_dir(cfg, run_dir, stages, model, resume=resume, overwrite=overwrite,
                                 create=create_run_dir)
    dump = cfg.model_dump(mode="json")
    own_tracker = tracker is None
    if tracker is None:
        from medwsol.tracking import make_tracker

        id_file = rd / "mlflow_run_id"
        old_id = id_file.read_text().strip() if id_file.is_file() and not overwrite else None
        # reach the tracking store before the run folder exists
        tracker = make_tracker(cfg.tracking, run_name=f"{cfg.name}/{rd.name}", run_id=old_id)
    status = "FAILED"
    ctx = RunContext(cfg=cfg, run_dir=rd, tracker=tracker, resume=resume, model_ref=model)
    # the model package is built once the model stages of this invocation are done (after train, or after
    # the evaluate that follows it), before infer/export, which load it
    model_stages = [s for s in stages if s in ("train", "evaluate")]
    package_after = model_stages[-1] if package and "train" in stages else None
    cohort: list[Any] = []  # the infer/export tables: a failed slide makes the invocation fail
    try:
        with RunSession(rd, is_new, cfg.name, yaml.safe_dump(dump, sort_keys=False), overwrite=overwrite) as session:
            if own_tracker and tracker.run_id:
                write_text(rd / "mlflow_run_id", tracker.run_id)
            tracker.log_params(flatten(dump))
            tracker.set_tags({"pipeline": cfg.name, "run_dir": str(rd), "stages": ",".join(stages)})
            console.print(f"[bold]medwsol[/] {cfg.name}: stages {' → '.join(stages)}  run dir [cyan]{rd}[/]")
            for s in stages:
                t0 = time.perf_counter()
                console.rule(f"[bold]{s}")
                session.mark(s, "running")
                out = STAGE_FUNCS[s](ctx)
                if s in ("infer", "export"):
                    cohort.append((out, ctx.slides_dir / ("slides.csv" if s == "infer" else "exports.csv")))
                dt = time.perf_counter() - t0
                result = ctx.results.get(s)
                stopped = s == "train" and isinstance(result, dict) and "stopped_after" in result
                extra = {"epochs": int(cfg.train.epochs)} if s == "train" and not stopped else {}
                session.mark(s, "stopped" if stopped else "finished", seconds=round(dt, 1), **extra)
                tracker.log_metrics({f"stage_seconds.{s}": dt})
                console.print(f"[green]✓[/] {s} in {dt:.1f} s")
                if s == package_after:
                    session.mark("package", "running")
                    stage_impl.package_run(ctx)
                    session.mark("package", "finished")
            failed = stage_impl.cohort_error(cohort)
            if failed is not None:  # a cohort with failed slides is a failed invocation: tidied as for any error
                _print_where(ctx, console)
                raise failed
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if own_tracker:
            tracker.close(status)
        if status != "FINISHED" and is_new and rd.is_dir():
            train = (read_marker(rd) or {}).get("stages", {}).get("train") or {}
            resume = (" --resume" if (rd / "checkpoints" / "last.pt").is_file() and train.get("status") != "finished"
                      else "")
            console.print(f"[yellow]note:[/] kept {rd}: it holds work a re-run continues (a training, finished "
                          f"slides); continue with --run-dir {rd}{resume}")
    _print_where(ctx, console)
    return ctx


def _print_where(ctx: RunContext, console) -> None:
    rd = ctx.run_dir
    lines = []
    for label, p in [
        ("metrics table", rd / "eval" / "table.md"),
        ("overlays", rd / "eval" / "overlays.png"),
        ("slides summary", ctx.slides_dir / "slides.csv"),
        ("checkpoint", rd / "checkpoints" / "best.pt"),
        ("model package", rd / "package" / "package.json"),
    ]:
        if p.exists():
            lines.append(f"  {label:15s} {p}")
    if ctx.cfg.tracking.enabled:
        uri = ctx.cfg.tracking.uri
        if uri.startswith("sqlite:"):
            lines.append(f"  {'MLflow UI':15s} mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
        else:
            lines.append(f"  {'MLflow':15s} {uri}")
    if lines:
        console.print("[bold]outputs[/]\n" + "\n".join(lines))


def run_distributed_train(cfg: PipelineConfig, config_path: Path | None = None, run_dir: Path | None = None,
                          resume: bool = False, overwrite: bool = False) -> RunContext | None:
    """The train stage as one rank of a data-parallel group (``medwsol train --nproc N``, or under torchrun).

    Rank 0 runs the ordinary pipeline (run directory, MLflow run, training, package, registration); the
    other ranks only train, in the run directory rank 0 shares with them. When rank 0 fails before
    training starts (a tracking server that refuses, a run directory it may not use), the others stop
    quietly with the same exit code and rank 0's one line is the only message.
    """
    from medwsol.engine import distributed as d

    dist = d.init(cfg.train.device)
    try:
        if dist.is_main:
            try:
                return run_pipeline(cfg, config_path=config_path, run_dir=run_dir, stages=["train"], resume=resume,
                                    overwrite=overwrite)
            except BaseException:
                if not dist.started and dist.world > 1:
                    dist.broadcast(None)  # the others wait for the run directory: tell them to stop
                raise
        from medwsol.engine.train import train

        train(cfg, None, tracker=None, resume=resume, dist=dist)
        return None
    finally:
        d.shutdown()
