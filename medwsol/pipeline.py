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

from medwsol.config import STAGES, PipelineConfig, flatten
from medwsol.errors import ConfigError, DataError, NotAvailableError
from medwsol.io import write_text

__all__ = ["RunContext", "run_pipeline", "resolve_run_dir", "latest_run_dir", "STAGE_FUNCS"]


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


def stage_prepare(ctx: RunContext) -> None:
    """Write ``data.manifest`` from the configured source."""
    cfg = ctx.cfg
    d = cfg.data
    if d.source == "synthetic":
        from medwsol.data.synthetic import make_synthetic_dataset

        s = d.synthetic
        out = d.manifest.parent
        if d.manifest.is_file() and (out / ".medwsol-synthetic.json").is_file():
            import json

            if json.loads((out / ".medwsol-synthetic.json").read_text()) == s.model_dump():
                ctx.results["manifest"] = d.manifest
                return  # same seed and sizes: the files are already there
        made = make_synthetic_dataset(
            out, n_images=s.n_images, size=s.size, seed=s.seed, classes=tuple(d.classes),
            valid_fraction=s.valid_fraction, test_fraction=s.test_fraction, n_valpx=s.n_valpx,
        )
        if Path(made) != d.manifest:
            raise DataError(f"data.manifest: synthetic data writes {made}; fix: set data.manifest to {made}")
        from medwsol.io import write_json

        write_json(out / ".medwsol-synthetic.json", s.model_dump())
    elif d.source == "glas":
        from medwsol.data.glas import prepare_glas

        prepare_glas(d.root, d.manifest)
    elif d.source == "manifest":
        from medwsol.data.manifest import assign_splits, load_manifest, write_manifest

        df = load_manifest(d.manifest, d.classes, require_split=False)
        if "split" not in df.columns or df["split"].isna().any() or (df["split"].astype(str).str.strip() == "").any():
            df = assign_splits(df, seed=d.split_seed, n_folds=d.n_folds, n_valpx=d.synthetic.n_valpx)
            write_manifest(df, d.manifest)
    elif d.source == "slides":
        from medwsol.data.slide_tiles import make_synthetic_slide_cohort, prepare_slide_tiles

        t = d.tiles
        slides_csv, ann = t.slides, t.annotations
        if slides_csv is None:
            # beside (not inside) the tile folder, which prepare_slide_tiles replaces atomically
            cohort = d.manifest.parent.with_name(d.manifest.parent.name + "_cohort")
            slides_csv = make_synthetic_slide_cohort(cohort, t.synthetic)
            ann = Path(slides_csv).parent / "annotations" if ann is None else ann
        prepare_slide_tiles(slides_csv, ann, d.manifest.parent, t, d.classes, cfg.seed,
                            manifest_name=d.manifest.name, n_valpx=d.synthetic.n_valpx, n_folds=d.n_folds,
                            progress=True)
    ctx.results["manifest"] = d.manifest


def stage_train(ctx: RunContext) -> None:
    from medwsol.engine.train import train

    ctx.results["train"] = train(ctx)


def stage_evaluate(ctx: RunContext) -> None:
    from medwsol.engine.evaluate import evaluate

    ctx.results["evaluate"] = evaluate(ctx)


def stage_infer(ctx: RunContext) -> None:
    try:
        from medwsol.engine.slides_stage import infer_stage
    except ModuleNotFoundError as err:  # pragma: no cover
        raise NotAvailableError(f"stage 'infer' is not available yet ({err}); fix: remove it from stages") from None
    ctx.results["infer"] = infer_stage(ctx)


def stage_export(ctx: RunContext) -> None:
    try:
        from medwsol.engine.slides_stage import export_stage
    except ModuleNotFoundError as err:  # pragma: no cover
        raise NotAvailableError(f"stage 'export' is not available yet ({err}); fix: remove it from stages") from None
    ctx.results["export"] = export_stage(ctx)


STAGE_FUNCS: dict[str, Callable[[RunContext], None]] = {
    "prepare": stage_prepare,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "infer": stage_infer,
    "export": stage_export,
}


def run_pipeline(
    cfg: PipelineConfig,
    config_path: Path | None = None,
    run_dir: Path | None = None,
    stages: list[str] | None = None,
    resume: bool = False,
    model: str | None = None,
    tracker: Any = None,
) -> RunContext:
    """Run ``stages`` (default: the YAML's) into a run directory and one tracking run."""
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
    try:
        for s in stages:
            t0 = time.perf_counter()
            console.rule(f"[bold]{s}")
            STAGE_FUNCS[s](ctx)
            dt = time.perf_counter() - t0
            tracker.log_metrics({f"stage_seconds.{s}": dt})
            console.print(f"[green]✓[/] {s} in {dt:.1f} s")
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
