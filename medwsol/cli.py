"""The ``medwsol`` command line (Typer). Heavy imports live inside the commands.

The error contract (docs/errors.md): a user error (``MedwsolError``, an unusable file or folder, a
bad option) is one red line ``error: <file or key>: <what>; fix: <how>`` on stderr and exit code 2;
Ctrl-C exits with 130 and SIGTERM with 143 after the same clean-up; anything else is a bug: one
line, exit code 1, and the traceback only with ``MEDWSOL_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, TypeVar

import typer
from typer.core import TyperGroup

__all__ = ["app", "main"]

F = TypeVar("F", bound=Callable)


def _click_classes(name: str) -> tuple[type, ...]:
    """An exception class of click, from typer's vendored copy (typer >= 0.20) and/or click itself."""
    found = []
    for mod in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            cls = getattr(__import__(mod, fromlist=[name]), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_CLICK_ERROR = _click_classes("ClickException")
_NO_ARGS_HELP = _click_classes("NoArgsIsHelpError")
_ABORT = _click_classes("Abort")
_EXIT = _click_classes("Exit") + (typer.Exit,)


class _OneLineErrors(TyperGroup):
    """The top-level group: a usage error (unknown option, bad value) is one ``error:`` line too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _NO_ARGS_HELP as err:
            err.show()
            rv = err.exit_code
        except _CLICK_ERROR as err:
            cmd = err.ctx.command_path if getattr(err, "ctx", None) is not None else "medwsol"
            msg = " ".join(err.format_message().split()).rstrip(".")
            _print_error(f"{cmd}: {msg}; fix: see `{cmd} --help`")
            rv = err.exit_code
        except _ABORT:
            _print_error("aborted")
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="medwsol",
    cls=_OneLineErrors,
    help="Weakly-supervised object localization for histology: prepare, train, evaluate, infer, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
prepare_app = typer.Typer(help="Build manifests: synthetic data, GlaS, slide tiles, or a pipeline's prepare stage.",
                          no_args_is_help=True)
benchmark_app = typer.Typer(help="Benchmarks that print tables measured in one run.", no_args_is_help=True)
package_app = typer.Typer(help="Model packages: check how faithfully a runtime (ONNX, int8) serves one.",
                           no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
app.add_typer(benchmark_app, name="benchmark")
app.add_typer(package_app, name="package")

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
RunDirOpt = typer.Option(
    None, "--run-dir",
    help="An existing run folder of this pipeline (default: a new one for prepare/train/run, else the latest run "
    "that has what the stage needs).")
OverwriteOpt = typer.Option(
    False, "--overwrite",
    help="With --run-dir: retrain a run that already has a training (its previous training, evaluation and slide "
    "outputs are replaced; they come back if this invocation fails).")


def _print_error(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(msg)}", markup=True)


def _fail(msg: str, code: int = 2) -> None:
    _print_error(msg)
    raise typer.Exit(code)


#: An interrupt raised but not seen leaving the command this many seconds later was swallowed (CPython
#: reports an exception raised inside a finaliser or a C callback as "Exception ignored" and goes on,
#: and some libraries catch everything): it is raised again.
REARM_SECONDS = 10.0


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM (what ``timeout``, SLURM and Kubernetes send)
    ``Terminated`` in the main thread, and neither can be lost.

    ``Terminated`` is a ``KeyboardInterrupt``, so the clean-up written for Ctrl-C runs for it:
    temporary files and folders are removed, the run folder is tidied and the MLflow run is marked
    KILLED. A signal arriving while Python runs a finaliser is swallowed by the interpreter; an
    interval timer raises the interrupt again ``REARM_SECONDS`` later unless it has reached the
    clean-up by then (:func:`medwsol.errors.interrupt_reached_cleanup` disarms it). A second SIGTERM
    during the clean-up is ignored; a second Ctrl-C interrupts again. Forked workers (DataLoader)
    that inherit the handlers behave as Python's defaults do. The previous handlers are restored on
    the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from medwsol.errors import Terminated

    pid = os.getpid()
    pending: list[int] = []  # the signal whose interrupt is on its way out

    def interrupt(signum: int):
        pending[:] = [signum]
        signal.setitimer(signal.ITIMER_REAL, REARM_SECONDS)
        raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt()

    def on_signal(signum, frame):  # noqa: ARG001
        if os.getpid() != pid:  # a forked worker
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGTERM and pending:
            return  # already stopping: let the clean-up finish
        interrupt(signum)

    def on_alarm(signum, frame):  # noqa: ARG001
        if pending and os.getpid() == pid:
            interrupt(pending[0])  # the first one was swallowed somewhere

    hook = sys.unraisablehook

    def quiet_swallowed(unraisable):  # an interrupt raised inside a finaliser: re-raised by the timer, no traceback
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and pending:
            return
        hook(unraisable)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    sys.unraisablehook = quiet_swallowed
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)
        sys.unraisablehook = hook


def _settle_threads(timeout: float = 5.0) -> None:
    """Give worker threads still busy with the failed work (MONAI's caching ThreadPool, loaders) a moment to end.

    Leaving the interpreter while such a daemon thread is inside torch's C++ code aborts the process
    ('terminate called without an active exception', exit 134) after the error line was printed.
    """
    import time

    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is threading.current_thread() or not t.daemon or not t.is_alive():
            continue
        t.join(max(0.0, deadline - time.monotonic()))


def handle_errors(fn: F) -> F:
    """Turn errors into one red line and an exit code (2 user error, 130/143 signal, 1 bug); no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from medwsol.errors import Terminated, one_line, user_error

        try:
            try:
                with _signals_as_interrupts():
                    return fn(*args, **kwargs)
            except (*_EXIT, SystemExit):
                raise
            except BaseException:
                _settle_threads()
                raise
        except (*_EXIT, SystemExit):
            raise
        except Terminated as err:
            _fail("terminated (SIGTERM); outputs written so far are complete, partial ones were discarded",
                  code=128 + err.signum)
        except KeyboardInterrupt:
            _fail("interrupted; outputs written so far are complete, partial ones were discarded", code=130)
        except Exception as err:  # noqa: BLE001 - the one place where every error becomes one line
            found = user_error(err)
            if found is not None:  # under DDP, ranks other than 0 say which they are
                rank = os.environ.get("RANK") if "WORLD_SIZE" in os.environ else None
                _fail(("" if rank in (None, "0") else f"rank {rank}: ") + one_line(found))
            if isinstance(err, OSError):
                where = err.filename if err.filename is not None else "a file"
                _fail(f"{where}: {err.strerror or one_line(err)}; fix: check the path, its permissions and the "
                      "free disk space")
            if isinstance(err, MemoryError):
                _fail("out of memory; fix: lower the batch size, the tile size or the number of workers")
            if os.environ.get("MEDWSOL_DEBUG"):
                raise
            _fail(f"internal error ({type(err).__name__}: {one_line(err, 300)}); this is a bug, please report it "
                  "with the command; fix: MEDWSOL_DEBUG=1 shows the traceback", code=1)

    return wrapper  # type: ignore[return-value]


def _check_out(path: Path, label: str = "--out", kind: str = "dir") -> None:
    """An output location given on the command line must be writable before any work starts."""
    from medwsol.io import ensure_writable

    ensure_writable(path, label, kind, fix=f"choose another {label}")


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
    overwrite: bool = OverwriteOpt,
) -> None:
    """Run the stages the YAML lists, in order, into one run directory."""
    from medwsol.pipeline import run_pipeline

    cfg = _load(config, overrides)
    run_pipeline(cfg, config_path=config, run_dir=run_dir, resume=resume, overwrite=overwrite)


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
    resume: bool = typer.Option(
        False, "--resume", help="Continue from <run-dir>/checkpoints/last.pt (default: the latest resumable run)."),
    overwrite: bool = OverwriteOpt,
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Data-parallel training in N processes on this machine (DDP: gloo on CPU, "
        "nccl with one GPU each); data.batch_size is the global batch. Several machines: run this command under "
        "torchrun instead (docs/scaling.md)."),
) -> None:
    """Train the configured method (stage 'train')."""
    world = os.environ.get("WORLD_SIZE") if "RANK" in os.environ else None
    if world is not None:  # one rank of a group torchrun (or --nproc) started
        if nproc is not None and nproc != int(world):
            raise _usage(f"--nproc {nproc}: this process is one of {world} that torchrun started; fix: drop --nproc "
                         "under torchrun (its --nproc-per-node and --nnodes decide)")
        from medwsol.pipeline import run_distributed_train

        run_distributed_train(_load(config, overrides, stages=["train"]), config_path=config, run_dir=run_dir,
                              resume=resume, overwrite=overwrite)
        return
    if nproc is not None and nproc > 1:
        _launch_train(config, overrides, run_dir, resume, nproc, overwrite)
        return
    _stage("train", config, overrides, run_dir, resume=resume, overwrite=overwrite)


def _launch_train(config: Path, overrides, run_dir, resume: bool, nproc: int, overwrite: bool = False) -> None:
    """Check what can be checked here, then start ``nproc`` ranks with torch's elastic agent."""
    cfg = _load(config, overrides, stages=["train"])
    from medwsol.engine.distributed import launch, max_procs

    limit, what = max_procs(cfg.train.device)
    if nproc > limit:
        raise _usage(f"--nproc {nproc}: this machine has {limit} {what}; fix: --nproc {limit} or fewer "
                     "(more processes: several machines under torchrun --nnodes, see docs/scaling.md)")
    if cfg.data.batch_size % nproc:
        raise _usage(f"--nproc {nproc}: data.batch_size {cfg.data.batch_size} (the global batch) is not divisible by "
                     f"{nproc}; fix: --set data.batch_size={cfg.data.batch_size // nproc * nproc or nproc} or another "
                     "--nproc")
    argv = ["train", str(config), *[a for o in (overrides or []) for a in ("--set", o)]]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    if resume:
        argv.append("--resume")
    if overwrite:
        argv.append("--overwrite")
    threads = cfg.train.threads or max(1, max_procs("cpu")[0] // nproc)
    code = launch(argv, nproc, threads=threads)
    if code:
        raise typer.Exit(code)


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
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="Run the cohort on Dask, one task per slide: local:N (N worker processes here) or "
        "tcp://HOST:PORT (a running scheduler). Same as slides.cluster; see docs/scaling.md."),
    export: bool = typer.Option(True, "--export/--no-export", help="Also export (TIFF, GeoJSON, PNG, ...)."),
    runtime: Optional[str] = typer.Option(
        None, "--runtime", help="auto (default: torch on CUDA, onnx-int8 on a CPU), torch, onnx or onnx-int8 "
        "(slides.runtime; graphs cached by package digest, refused below slides.runtime_min_dice)."),
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = RunDirOpt,
) -> None:
    """Stitched heatmaps on whole slides from a model package, then exports for QuPath and people."""
    from medwsol.config import apply_overrides, load_config, parse_config

    overrides = list(overrides or [])
    if runtime is not None:
        overrides.append(f"slides.runtime={runtime}")  # validated with the other slides settings
    typed: dict = {}
    if slides:
        typed["inputs"] = list(slides)
    if manifest is not None:
        typed["manifest"] = manifest
    if out is not None:
        typed["out_dir"] = out
    if overwrite:
        typed["overwrite"] = True
    if cluster is not None:
        from medwsol.config import parse_cluster

        try:
            parse_cluster(cluster)
        except ValueError as err:
            raise _usage(f"--cluster: {err}; fix: pass e.g. --cluster local:2 or --cluster tcp://127.0.0.1:8786")
        typed["cluster"] = cluster
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


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _usage(msg: str):
    from medwsol.errors import ConfigError

    return ConfigError(msg)


def _infer_direct(cfg, model: str, tracking_uri: str, slides_cfg, explicit: set[str], classes, export: bool) -> None:
    """``medwsol infer`` with no pipeline: the package decides; outputs in ``slides.out_dir``."""
    from medwsol.engine.runtime import select_device
    from medwsol.errors import DataError
    from medwsol.stages import (cohort_error, collect_slides, export_slides, infer_from_package, resolve_package,
                                serving_setup)

    out = Path(slides_cfg.out_dir)
    _check_out(out)  # before any slide is read or any model downloaded
    cfg.slides = slides_cfg
    slide_list = collect_slides(cfg)
    pkg = resolve_package(model, tracking_uri)
    served, settings = serving_setup(pkg, slides_cfg, explicit=explicit, classes=classes)
    try:
        if not slides_cfg.cluster:  # a cluster run makes it only once the cluster and its workers are ready
            out.mkdir(parents=True, exist_ok=True)
        elif not out.exists() and not os.access(_existing_parent(out), os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise DataError(f"--out {out}: cannot create the folder ({err.strerror}); fix: choose a writable folder") from None
    device = select_device(cfg.train.device)
    df = infer_from_package(pkg, slide_list, settings, out, device, amp=cfg.train.amp, served=served)
    tables = [(df, out / "slides.csv")]
    if export:
        tables.append((export_slides(df, out, cfg.export, cfg.data.tiles.annotations), out / "exports.csv"))
    failed = cohort_error(tables)
    if failed is not None:
        raise failed


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

    _check_out(out)
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

    if out.suffix.lower() not in (".tif", ".tiff"):
        from medwsol.errors import ConfigError

        raise ConfigError(f"--out {str(out)!r}: a synthetic slide is a pyramidal TIFF; fix: end the name in .tif")
    _check_out(out, kind="file")
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

    _check_out(out, kind="file")
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
    from medwsol.errors import ConfigError

    if not slides.is_file():
        raise ConfigError(f"--slides {str(slides)!r}: file not found; fix: give slides.csv (columns slide, label[, "
                          "group, split])")
    if not annotations.is_dir():
        raise ConfigError(f"--annotations {str(annotations)!r}: folder not found; fix: give the folder of "
                          "<slide stem>.geojson files")
    _check_out(out)
    manifest = prepare_slide_tiles(slides, annotations, out, cfg.data.tiles, cfg.data.classes, cfg.seed)
    typer.echo(f"wrote {manifest}")


@package_app.command("check-runtime")
@handle_errors
def package_check_runtime(
    model: str = typer.Option(..., "--model", help="models:/<name>@<alias>, models:/<name>/<version>, or a package "
                              "folder (<run>/package)."),
    runtimes: Optional[List[str]] = typer.Option(None, "--runtime", help="onnx and/or onnx-int8 (repeatable; "
                                                 "default both)."),
    calibration_manifest: Optional[Path] = typer.Option(
        None, "--calibration-manifest", help="Manifest whose valid split calibrates and checks (default: the "
        "package's own data manifest)."),
    calibration_slides: Optional[List[Path]] = typer.Option(
        None, "--calibration-slides", help="Slides whose tissue tiles calibrate and check instead (repeatable)."),
    n_tiles: int = typer.Option(64, "--n-tiles", min=1, help="Validation tiles to calibrate and check on."),
    tile_size: Optional[int] = typer.Option(None, "--tile-size", min=8, help="Default: the package's tile size."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="ONNX Runtime threads."),
    min_dice: float = typer.Option(0.97, "--min-dice", min=0.0, max=1.0,
                                   help="Exit 2 when a runtime's Dice at tau is below this."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Re-export and re-quantize even when cached."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Where models:/ URIs live."),
) -> None:
    """Faithfulness of ONNX runtimes to the fp32 torch model on validation tiles: |d map|, Dice at tau, classes."""
    from medwsol.engine.runtimes import build_runtime, calibration_tiles, check_runtime
    from medwsol.engine.served import served_from_package
    from medwsol.errors import ConfigError
    from medwsol.stages import resolve_package

    names = list(runtimes or ["onnx", "onnx-int8"])
    bad = [r for r in names if r not in ("onnx", "onnx-int8")]
    if bad:
        raise ConfigError(f"--runtime {bad[0]}: not an ONNX runtime; fix: use onnx or onnx-int8")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    pkg = resolve_package(model, uri)
    served = served_from_package(pkg)
    t = int(tile_size or pkg.meta["input"]["tile_size"])
    cal = calibration_tiles(pkg, t, calibration_manifest, calibration_slides or [], n_tiles)
    typer.echo(f"model {pkg.source} ({pkg.digest[:19]}): {served.score_mode} score, tau {served.tau:.3f}; "
               f"check tiles: {cal.source}")
    rows = []
    for name in names:
        rt = build_runtime(pkg, served, name, t, threads=threads, calibration_manifest=calibration_manifest,
                           calibration_slides=calibration_slides or [], n_calibration=n_tiles, min_dice=None,
                           rebuild=rebuild, log=typer.echo)
        rows.append(check_runtime(served, rt, cal))
    typer.echo("\n| runtime | tiles | max abs d score | mean abs d score | max abs d weight | Dice at tau | "
               "class agreement | torch tiles/s | runtime tiles/s |")
    typer.echo("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        typer.echo(f"| {r['runtime']} | {r['n_tiles']} | {r['max_abs_score']:.4f} | {r['mean_abs_score']:.5f} | "
                   f"{r['max_abs_weight']:.4f} | {r['dice']:.4f} | {r['agreement']:.3f} | "
                   f"{r['torch_tiles_per_s']:.1f} | {r['runtime_tiles_per_s']:.1f} |")
    low = [r for r in rows if r["dice"] < min_dice]
    if low:
        raise ConfigError(f"runtime {low[0]['runtime']}: Dice {low[0]['dice']:.4f} at tau {low[0]['tau']:.3f} is below "
                          f"--min-dice {min_dice:g}; fix: serve with slides.runtime=torch or onnx")


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
    if methods:
        from medwsol.errors import ConfigError, RegistryError
        from medwsol.methods.catalog import METHODS

        for m in methods:
            try:
                METHODS.check(m)
            except RegistryError as err:
                raise ConfigError(f"--method {m!r}: {err}") from None
    _check_out(out, kind="file")
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
