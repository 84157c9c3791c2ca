"""The ``medwsol`` command line (Typer). Heavy imports live inside the commands.

Known errors (``MedwsolError``) become one red line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer

__all__ = ["app", "main"]

F = TypeVar("F", bound=Callable)

app = typer.Typer(
    name="medwsol",
    help="Weakly-supervised object localization for histology: prepare, train, evaluate, infer, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
prepare_app = typer.Typer(help="Build manifests: synthetic data, GlaS, slide tiles, or a pipeline's prepare stage.",
                          no_args_is_help=True)
benchmark_app = typer.Typer(help="Benchmarks that print tables measured in one run.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
app.add_typer(benchmark_app, name="benchmark")

def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"medwsol {version('medwsol')}")
        except PackageNotFoundError:  # a source tree that was never installed
            typer.echo("medwsol (not installed; run: pip install -e .)")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version_callback,
                                 help="Print the installed medwsol version and exit."),
) -> None:
    """Weakly-supervised object localization for histology: prepare, train, evaluate, infer, export."""


SetOpt = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable).")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (default: new for prepare/train/run, latest otherwise).")


def _fail(msg: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {msg}", markup=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn known errors into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from medwsol.errors import MedwsolError

        try:
            return fn(*args, **kwargs)
        except MedwsolError as err:
            _fail(str(err).replace("\n", " "))
        except KeyboardInterrupt:
            _fail("interrupted; outputs written so far are complete, partial ones were discarded", code=130)

    return wrapper  # type: ignore[return-value]


def _load(config: Path, overrides: list[str] | None, stages: list[str] | None = None):
    from medwsol.config import load_config

    return load_config(config, overrides=overrides, stages=stages)


@app.command()
@handle_errors
def validate(
    configs: List[Path] = typer.Argument(..., help="Pipeline YAML files."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Check pipeline YAMLs (keys, types, registry names, files) without doing any work."""
    from medwsol.config import load_config

    for c in configs:
        notes: list[str] = []
        load_config(c, overrides=overrides, notes=notes)
        typer.echo(f"ok: {c}" + "".join(f"\n  note: {n}" for n in notes))


@app.command()
@handle_errors
def run(
    config: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/demo.yaml"),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue training from the run's last checkpoint."),
) -> None:
    """Run the stages the YAML lists, in order, into one run directory."""
    from medwsol.pipeline import run_pipeline

    cfg = _load(config, overrides)
    run_pipeline(cfg, config_path=config, run_dir=run_dir, resume=resume)


def _stage(stage: str, config: Path, overrides, run_dir, **kw) -> None:
    from medwsol.pipeline import run_pipeline

    cfg = _load(config, overrides, stages=[stage])
    run_pipeline(cfg, config_path=config, run_dir=run_dir, stages=[stage], **kw)


@app.command()
@handle_errors
def train(
    config: Path = typer.Argument(...),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from <run-dir>/checkpoints/last.pt."),
) -> None:
    """Train the configured method (stage 'train')."""
    _stage("train", config, overrides, run_dir, resume=resume)


@app.command()
@handle_errors
def evaluate(
    config: Path = typer.Argument(...),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
    model: Optional[str] = typer.Option(None, "--model", help="Checkpoint path or models:/<name>@<alias>|/<version>."),
) -> None:
    """Evaluate a model with the protocol of Choe et al. (stage 'evaluate')."""
    _stage("evaluate", config, overrides, run_dir, model=model)


def _explicit_overrides(overrides: list[str] | None, prefix: str) -> set[str]:
    """Keys under ``prefix.`` that ``--set`` names (e.g. ``slides.tile_size=...`` -> ``tile_size``)."""
    out = set()
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        if key.startswith(prefix + "."):
            out.add(key[len(prefix) + 1 :].split(".")[0])
    return out


@app.command()
@handle_errors
def infer(
    slides: Optional[List[Path]] = typer.Argument(None, help="Slide files (any format OpenSlide reads)."),
    model: Optional[str] = typer.Option(
        None, "--model", help="models:/<name>@<alias>, models:/<name>/<version>, or a model package folder "
        "(<run>/package). Classes, tile size, mpp, score and tau come from it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (one sub-folder per slide, slides.csv)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="CSV with a 'slide' column."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="Where models:/ URIs live (default: $MLFLOW_TRACKING_URI, the config's "
        "tracking.uri, else sqlite:///mlflow.db)."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="Optional pipeline YAML: its slides/export settings, and a run directory and "
        "MLflow run for the outputs (default model: that pipeline's latest run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides even when their outputs are current."),
    export: bool = typer.Option(True, "--export/--no-export", help="Also export (TIFF, GeoJSON, PNG, ...)."),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
) -> None:
    """Stitched heatmaps on whole slides from a model package, then exports for QuPath and people."""
    from medwsol.config import apply_overrides, load_config, parse_config

    overrides = list(overrides or [])
    typed: dict = {}
    if slides:
        typed["inputs"] = list(slides)
    if manifest is not None:
        typed["manifest"] = manifest
    if out is not None:
        typed["out_dir"] = out
    if overwrite:
        typed["overwrite"] = True
    stages = ["infer", "export"] if export else ["infer"]
    if config is not None:
        cfg = load_config(config, overrides=overrides, stages=[])
        if tracking_uri:
            cfg.tracking.uri = tracking_uri
        cfg.slides = cfg.slides.model_copy(update=typed)
        from medwsol.pipeline import run_pipeline

        run_pipeline(cfg, config_path=config, run_dir=run_dir, stages=stages, model=model)
        return
    if run_dir is not None:
        raise _usage("--run-dir needs --config (a pipeline's run); fix: use --out DIR for the outputs")
    if model is None:
        raise _usage("--model: no model given; fix: pass --model models:/<name>@champion or a package folder "
                     "(<run>/package), or --config pipelines/X.yaml to use that pipeline's latest run")
    if out is None:
        raise _usage("--out: no output folder given; fix: pass --out DIR")
    cfg = parse_config(apply_overrides({"name": "infer"}, overrides), "--set")
    explicit = _explicit_overrides(overrides, "slides")
    classes = list(cfg.data.classes) if "classes" in _explicit_overrides(overrides, "data") else None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    _infer_direct(cfg, model, uri, cfg.slides.model_copy(update=typed), explicit, classes, export)


def _usage(msg: str):
    from medwsol.errors import ConfigError

    return ConfigError(msg)


def _infer_direct(cfg, model: str, tracking_uri: str, slides_cfg, explicit: set[str], classes, export: bool) -> None:
    """``medwsol infer`` with no pipeline: the package decides; outputs in ``slides.out_dir``."""
    from medwsol.engine.runtime import select_device
    from medwsol.errors import DataError, SlideError
    from medwsol.stages import collect_slides, export_slides, infer_from_package, resolve_package, serving_setup

    out = Path(slides_cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a folder; fix: pass a folder")
    cfg.slides = slides_cfg
    slide_list = collect_slides(cfg)
    pkg = resolve_package(model, tracking_uri)
    served, settings = serving_setup(pkg, slides_cfg, explicit=explicit, classes=classes)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out}: cannot create the folder ({err.strerror}); fix: choose a writable folder") from None
    device = select_device(cfg.train.device)
    df = infer_from_package(pkg, slide_list, settings, out, device, amp=cfg.train.amp, served=served)
    failed = int((df.status == "failed").sum())
    if export:
        ex = export_slides(df, out, cfg.export, cfg.data.tiles.annotations)
        failed += int((ex.status == "failed").sum()) if len(ex) else 0
    if failed:
        raise SlideError(f"{failed} slide(s) failed (the others finished); see {out / 'slides.csv'} for each error; "
                         "fix: correct or remove those slides and re-run (finished ones are skipped)")


@app.command()
@handle_errors
def export(
    config: Path = typer.Argument(...),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
) -> None:
    """Export the run's slide heatmaps (TIFF, QuPath GeoJSON, PNG, NIfTI/MHA)."""
    _stage("export", config, overrides, run_dir)


@prepare_app.command("pipeline")
@handle_errors
def prepare_pipeline(
    config: Path = typer.Argument(...),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
) -> None:
    """Run a pipeline's prepare stage (writes data.manifest)."""
    _stage("prepare", config, overrides, run_dir)


@prepare_app.command("synthetic")
@handle_errors
def prepare_synthetic(
    out: Path = typer.Option(..., "--out", help="Output folder (gets images/, masks/, manifest.csv)."),
    n_images: int = typer.Option(120, "--n-images", min=8),
    size: int = typer.Option(192, "--size", min=64),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write the seeded synthetic H&E gland dataset with masks and a manifest."""
    from medwsol.data.synthetic import make_synthetic_dataset

    manifest = make_synthetic_dataset(out, n_images=n_images, size=size, seed=seed)
    typer.echo(f"wrote {manifest}")


@prepare_app.command("synthetic-slide")
@handle_errors
def prepare_synthetic_slide(
    out: Path = typer.Option(..., "--out", help="Output .tif (GeoJSON and mask PNG are written beside it)."),
    width: int = typer.Option(8192, "--width", min=256),
    height: int = typer.Option(6144, "--height", min=256),
    mpp: float = typer.Option(0.5, "--mpp"),
    seed: int = typer.Option(0, "--seed"),
    tumour: bool = typer.Option(True, "--tumour/--no-tumour"),
) -> None:
    """Write a pyramidal tiled TIFF slide with tumour regions and their ground truth."""
    from medwsol.data.synthetic_slide import make_synthetic_slide

    paths = make_synthetic_slide(out, width=width, height=height, mpp=mpp, seed=seed, tumour=tumour, progress=True)
    for k, v in paths.items():
        if isinstance(v, (str, Path)):
            typer.echo(f"{k}: {v}")


@prepare_app.command("glas")
@handle_errors
def prepare_glas_cmd(
    root: Path = typer.Option(..., "--root", help="The unzipped 'Warwick QU Dataset (Released 2016_07_08)' folder."),
    out: Path = typer.Option(Path("data_manifests/glas.csv"), "--out", help="Manifest to write."),
) -> None:
    """Import the GlaS (Warwick-QU) release with the published split."""
    from medwsol.data.glas import prepare_glas

    typer.echo(f"wrote {prepare_glas(root, out)}")


@prepare_app.command("slides")
@handle_errors
def prepare_slides_cmd(
    slides: Path = typer.Option(..., "--slides", help="slides.csv with columns slide, label, group[, split]."),
    annotations: Path = typer.Option(..., "--annotations", help="Folder of QuPath GeoJSON, <slide stem>.geojson."),
    out: Path = typer.Option(..., "--out", help="Output folder for tiles, masks and manifest.csv."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Pipeline YAML for data.tiles settings."),
    overrides: Optional[List[str]] = SetOpt,
) -> None:
    """Build a CAMELYON16-style tile manifest from slides and polygon annotations."""
    from medwsol.config import PipelineConfig, apply_overrides, parse_config, read_yaml
    from medwsol.data.slide_tiles import prepare_slide_tiles

    if config is not None:
        cfg = parse_config(apply_overrides(read_yaml(config), overrides), str(config))
    else:
        cfg = parse_config(apply_overrides({"name": "slides"}, overrides), "--set")
    assert isinstance(cfg, PipelineConfig)
    manifest = prepare_slide_tiles(slides, annotations, out, cfg.data.tiles, cfg.data.classes, cfg.seed)
    typer.echo(f"wrote {manifest}")


@benchmark_app.command("methods")
@handle_errors
def benchmark_methods(
    config: Path = typer.Argument(Path("pipelines/demo.yaml")),
    methods: Optional[List[str]] = typer.Option(None, "--method", help="Methods to compare (default: all)."),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Comma-separated training seeds, e.g. 0,1,2: each method is trained once per seed and "
        "the table shows mean ± sd (default: the pipeline's seed)."),
    overrides: Optional[List[str]] = SetOpt,
    out: Path = typer.Option(Path("docs/benchmarks.md"), "--out", help="Markdown file whose methods table is updated."),
) -> None:
    """Train every method on the same split (and seeds); print one comparison table."""
    from medwsol.benchmark import parse_seeds, run_methods_benchmark

    try:
        seed_list = parse_seeds(seeds) if seeds is not None else None
    except ValueError as err:
        _fail(str(err))
    cfg = _load(config, overrides, stages=["prepare", "train", "evaluate"])
    run_methods_benchmark(cfg, config_path=config, methods=methods or None, out_md=out, seeds=seed_list)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        app()
    except SystemExit as e:  # typer raises SystemExit for --help etc.
        raise e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
