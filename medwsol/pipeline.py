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

__all__ = ["RunContext", "run_pipeline", "run_distributed_train", "resolve_run_dir", "latest_run_dir", "STAGE_FUNCS"]


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


def latest_run_dir(cfg: PipelineConfig) -> Path | None:
    """The newest run directory of this pipeline name, if any."""
    base = cfg.run_root / cfg.name
    if not base.is_dir():
        return None
    runs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    return runs[-1] if runs else None


def resolve_run_dir(cfg: PipelineConfig, run_dir: Path | None, stages: list[str], model_ref: str | None = None) -> Path:
    """Explicit dir, else a new one when the stages start from scratch, else the latest run."""
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    starts_fresh = stages[0] in ("prepare", "train") or model_ref is not None
    if not starts_fresh:
        latest = latest_run_dir(cfg)
        if latest is None:
            raise ConfigError(
                f"no run of pipeline {cfg.name!r} under {cfg.run_root}/{cfg.name}; "
                "fix: run `medwsol run` first, or pass --run-dir or --model"
            )
        return latest
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = cfg.run_root / cfg.name / stamp
    i = 1
    while d.exists():
        d = cfg.run_root / cfg.name / f"{stamp}-{i}"
        i += 1
    d.mkdir(parents=True)
    return d


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
) -> RunContext:
    """Run ``stages`` (default: the YAML's) into a run directory and one tracking run.

    When ``train`` is among the stages and ``package`` is true, the run's model package is built,
    logged and registered right after the last of ``train``/``evaluate`` (:func:`medwsol.stages.package_run`).
    """
    from rich.console import Console

    console = Console(stderr=True)
    stages = sorted(stages or list(cfg.stages), key=STAGES.index)
    existed = run_dir is not None and run_dir.exists()
    rd = resolve_run_dir(cfg, run_dir, stages, model)
    own_tracker = tracker is None
    if tracker is None:
        from medwsol.tracking import make_tracker

        id_file = rd / "mlflow_run_id"
        old_id = id_file.read_text().strip() if id_file.is_file() else None
        try:  # reach the tracking store before any work; a failure leaves no new run dir behind
            tracker = make_tracker(cfg.tracking, run_name=f"{cfg.name}/{rd.name}", run_id=old_id)
        except BaseException:
            if not existed and not any(rd.iterdir()):
                rd.rmdir()
            raise
        if tracker.run_id:
            write_text(id_file, tracker.run_id)
    dump = cfg.model_dump(mode="json")
    write_text(rd / "config.yaml", yaml.safe_dump(dump, sort_keys=False))
    ctx = RunContext(cfg=cfg, run_dir=rd, tracker=tracker, resume=resume, model_ref=model)
    tracker.log_params(flatten(dump))
    tracker.set_tags({"pipeline": cfg.name, "run_dir": str(rd), "stages": ",".join(stages)})
    console.print(f"[bold]medwsol[/] {cfg.name}: stages {' → '.join(stages)}  run dir [cyan]{rd}[/]")
    status = "FAILED"
    # the model package is built once the model stages of this invocation are done (after train, or after
    # the evaluate that follows it), before infer/export, which load it
    model_stages = [s for s in stages if s in ("train", "evaluate")]
    package_after = model_stages[-1] if package and "train" in stages else None
    try:
        for s in stages:
            t0 = time.perf_counter()
            console.rule(f"[bold]{s}")
            STAGE_FUNCS[s](ctx)
            dt = time.perf_counter() - t0
            tracker.log_metrics({f"stage_seconds.{s}": dt})
            console.print(f"[green]✓[/] {s} in {dt:.1f} s")
            if s == package_after:
                stage_impl.package_run(ctx)
        status = "FINISHED"
    finally:
        if own_tracker:
            tracker.close(status)
    _print_where(ctx, console)
    n_failed = int(ctx.results.get("failed_slides") or 0)
    if n_failed:
        from medwsol.errors import SlideError

        raise SlideError(f"{n_failed} slide(s) failed (the others finished); see {ctx.slides_dir / 'slides.csv'} "
                         "for each error; fix: correct or remove those slides and re-run (finished ones are skipped)")
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
                          resume: bool = False) -> RunContext | None:
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
                return run_pipeline(cfg, config_path=config_path, run_dir=run_dir, stages=["train"], resume=resume)
            except BaseException:
                if not dist.started and dist.world > 1:
                    dist.broadcast(None)  # the others wait for the run directory: tell them to stop
                raise
        from medwsol.engine.train import train

        train(cfg, None, tracker=None, resume=resume, dist=dist)
        return None
    finally:
        d.shutdown()
