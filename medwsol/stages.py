"""Stage wiring: what each pipeline stage does with the engines, exporters and the tracker.

Engines (:mod:`medwsol.engine`) take explicit arguments and know neither the exporters nor the
tracking backend; this module is where they meet: it runs an engine, draws its pictures
(:mod:`medwsol.export.overlay`), logs to the tracker, builds the model package and registers it.
:mod:`medwsol.pipeline` calls these functions in stage order inside one run directory; ``medwsol
infer`` calls :func:`infer_from_package` directly, with no pipeline at all.

The model a run produces goes through exactly one path: ``train`` writes ``checkpoints/best.pt``;
``evaluate`` fits the served calibration on validation (:func:`medwsol.engine.evaluate.calibrate`) and
measures both the protocol and the served view; then :func:`package_run` writes ``<run>/package``
(:mod:`medwsol.package`), logs it as an MLflow pyfunc and registers it. ``infer`` and ``export`` of the
same run - and every later ``medwsol infer --model models:/...`` - load that package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from medwsol.errors import CheckpointError, ConfigError, DataError, SlideError
from medwsol.io import write_json

__all__ = [
    "stage_prepare",
    "stage_train",
    "stage_evaluate",
    "stage_infer",
    "stage_export",
    "package_run",
    "resolve_package",
    "serving_setup",
    "collect_slides",
    "infer_from_package",
    "infer_on_cluster",
    "copy_package",
    "serving_runtime",
    "export_slides",
    "score_slide",
    "model_card",
    "cohort_error",
]

#: Where a run keeps its model package.
PACKAGE_DIR = "package"


def _console() -> Console:
    return Console(stderr=True, highlight=False)


# ----------------------------------------------------------------------------------------- prepare


def stage_prepare(ctx) -> None:
    """Write ``data.manifest`` from the configured source."""
    cfg = ctx.cfg
    d = cfg.data
    if d.source == "synthetic":
        from medwsol.data.synthetic import make_synthetic_dataset

        s = d.synthetic
        out = d.manifest.parent
        if d.manifest.is_file() and (out / ".medwsol-synthetic.json").is_file():
            from medwsol.errors import MedwsolError
            from medwsol.io import read_json_file

            try:
                same = read_json_file(out / ".medwsol-synthetic.json", "synthetic data stamp") == s.model_dump()
            except MedwsolError:
                same = False  # an unreadable stamp: make the data again
            if same:
                ctx.results["manifest"] = d.manifest
                return  # same seed and sizes: the files are already there
        made = make_synthetic_dataset(
            out, n_images=s.n_images, size=s.size, seed=s.seed, classes=tuple(d.classes),
            valid_fraction=s.valid_fraction, test_fraction=s.test_fraction, n_valpx=s.n_valpx,
        )
        if Path(made) != d.manifest:
            raise DataError(f"data.manifest: synthetic data writes {made}; fix: set data.manifest to {made}")
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


# ------------------------------------------------------------------------------------------- train


def stage_train(ctx) -> None:
    """Train, then draw the training curves and log the run's training files."""
    from medwsol.engine.train import train
    from medwsol.export.overlay import plot_training_curves

    from medwsol.engine.distributed import current

    summary = train(ctx.cfg, ctx.run_dir, tracker=ctx.tracker, resume=ctx.resume, dist=current())
    ctx.results["train"] = summary
    log = ctx.run_dir / "train_log.csv"
    if log.is_file():
        curves = plot_training_curves(log, ctx.run_dir / "train_curves.png")
        for p in (curves, log, ctx.run_dir / "config.yaml"):
            ctx.tracker.log_artifact(p)
    best = ctx.run_dir / "checkpoints" / "best.pt"
    if best.is_file():
        ctx.tracker.log_artifact(best, "checkpoints")


# ---------------------------------------------------------------------------------------- the model


def _positive_class(cfg) -> str:
    pc = cfg.slides.positive_class or cfg.data.classes[-1]
    if pc not in cfg.data.classes:
        raise ConfigError(f"slides.positive_class: {pc!r} is not in data.classes {list(cfg.data.classes)}; "
                          "fix: name one of data.classes")
    return pc


def _download_dir(root: Path | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="medwsol-model-", dir=root))


def resolve_package(ref: str, tracking_uri: str | None, work: Path | None = None):
    """Load the package ``ref`` names: ``models:/name@alias``, ``models:/name/N``, ``runs:/id/model``, or a folder.

    Registry packages are downloaded (artifacts only: nothing is unpickled or executed) into a
    temporary folder under ``work``, removed when the returned package is released (or at exit), so
    ``pkg.path`` stays readable while it is in use (a Dask cohort copies it for its workers).

    Returns:
        A :class:`medwsol.package.Package`.
    """
    from medwsol.package import is_package_dir, load_package

    if ref.startswith(("models:/", "runs:/")):
        from medwsol.tracking import download_package

        if not tracking_uri:
            raise ConfigError(f"--model {ref}: no tracking URI to resolve it; fix: pass --tracking-uri "
                              "(e.g. sqlite:///path/to/mlflow.db) or set MLFLOW_TRACKING_URI")
        import weakref

        tmp = _download_dir(work)
        try:
            pkg = load_package(download_package(ref, tracking_uri, tmp), source=ref)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(pkg, shutil.rmtree, tmp, True)
        return pkg
    p = Path(ref)
    if p.is_dir() and not is_package_dir(p) and is_package_dir(p / PACKAGE_DIR):
        p = p / PACKAGE_DIR  # a run directory
    if p.is_file() and p.suffix in (".pt", ".pth", ".ckpt"):
        raise CheckpointError(f"{p}: a checkpoint carries no calibration (classes, tau, map range); fix: pass the run's "
                              f"package folder ({p.parent.parent / PACKAGE_DIR}) or a models:/<name>@<alias> URI")
    return load_package(p, source=str(ref))


def _run_network(ctx, device):
    """The network to evaluate/package in this run: the package of a finished run, or the checkpoint just trained."""
    from medwsol.checkpoint import model_from_checkpoint, read_checkpoint
    from medwsol.package import is_package_dir

    ref = ctx.model_ref
    if ref is not None and Path(ref).suffix in (".pt", ".pth", ".ckpt") and not ref.startswith(("models:/", "runs:/")):
        net = model_from_checkpoint(read_checkpoint(ref), source=ref)  # a bare checkpoint: calibrated here
        net.classes = list(ctx.cfg.data.classes)
        return net.to(device), None
    if ref is not None:
        pkg = resolve_package(ref, ctx.cfg.tracking.uri, ctx.run_dir)
        return pkg.network.to(device), pkg
    pkg_dir = ctx.run_dir / PACKAGE_DIR
    if "train" not in ctx.results and is_package_dir(pkg_dir):
        from medwsol.package import load_package

        pkg = load_package(pkg_dir)
        return pkg.network.to(device), pkg
    best = ctx.run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        raise CheckpointError(f"{best}: no trained model in this run; fix: run the train stage or pass --model")
    net = model_from_checkpoint(read_checkpoint(best), source=str(best))
    net.classes = list(ctx.cfg.data.classes)
    return net.to(device), None


def _check_classes(pkg, classes: list[str], what: str = "data.classes") -> None:
    if pkg is not None and pkg.classes != list(classes):
        raise ConfigError(f"{what} {list(classes)} conflicts with the classes of the model package {pkg.source} "
                          f"({pkg.classes}); fix: set {what} to {pkg.classes} or use a model trained on yours")


def stage_evaluate(ctx) -> None:
    """The protocol and the served view on the configured splits; pictures, metrics to the tracker."""
    import torch

    from medwsol.data.manifest import load_manifest
    from medwsol.engine.evaluate import calibrate, evaluate_model, flat_metrics, metrics_table
    from medwsol.engine.runtime import select_device
    from medwsol.engine.served import ServedModel, served_from_package
    from medwsol.export.overlay import overlay_grid, plot_pr_curve

    cfg = ctx.cfg
    console = _console()
    device = select_device(cfg.train.device)
    network, pkg = _run_network(ctx, device)
    _check_classes(pkg, list(cfg.data.classes))
    if cfg.train.channels_last:
        network = network.to(memory_format=torch.channels_last)
    df = load_manifest(cfg.data.manifest, list(cfg.data.classes))
    if pkg is not None:
        served = served_from_package(pkg)
        calibration = pkg.calibration
    else:
        calibration = calibrate(network, cfg, df, device, cfg.slides.score, _positive_class(cfg), cfg.slides.map_class)
        served = ServedModel(network, list(cfg.data.classes), calibration["positive_class"], calibration["score"],
                             map_range=calibration["map_range"], tau=calibration["tau"],
                             tau_source=calibration["tau_chosen_on"], map_class=calibration["map_class"])
        ctx.results["calibration"] = calibration
    out_dir = ctx.run_dir / "eval"
    res = evaluate_model(network, cfg, df, device, served=served, console=console)
    metrics = res.metrics
    metrics["served"]["calibration"] = calibration
    metrics["model"] = ctx.model_ref or (str(pkg.path) if pkg is not None else str(ctx.run_dir / "checkpoints/best.pt"))
    write_json(out_dir / "metrics.json", metrics)
    from medwsol.io import write_text

    write_text(out_dir / "table.md", metrics_table(metrics))
    for name, (p, r, label) in res.pr_curves.items():
        plot_pr_curve(p, r, out_dir / f"pr_curve_{name}.png", label=label)
    if res.overlay_rows:
        tau = metrics["threshold"]["tau"]
        overlay_grid(res.overlay_rows, out_dir / "overlays.png",
                     title=f"{cfg.model.method}: weight maps (tau={tau:.3f})")
    ctx.results["evaluate"] = metrics
    ctx.tracker.log_metrics(flat_metrics(metrics))
    for f in sorted(out_dir.iterdir()):
        ctx.tracker.log_artifact(f, "eval")
    console.print(metrics_table(metrics))


def _input_contract(cfg) -> dict[str, Any]:
    d = cfg.data
    if d.source == "slides":
        out = {"tile_size": int(d.tiles.tile_size), "target_mpp": float(d.tiles.mpp), "mpp_source": "data.tiles.mpp"}
    elif d.source == "glas":
        out = {"tile_size": int(d.patch_size), "target_mpp": 0.62005,
               "mpp_source": "GlaS: Warwick-QU images at 20x, 0.62005 um/px"}
    else:
        out = {"tile_size": int(d.patch_size), "target_mpp": float(cfg.slides.target_mpp),
               "mpp_source": "slides.target_mpp (the training images carry no pixel size)"}
    # how the pipeline that made the package stitches slides: `medwsol infer --model` without a config
    # stitches the same way (the overlap as a fraction of the tile, so another tile size keeps it)
    from medwsol.engine.infer import effective_overlap

    s = cfg.slides
    out["stitching"] = {"overlap_fraction": effective_overlap(s) / int(s.tile_size), "blend": s.blend,
                        "blend_sigma": float(s.blend_sigma)}
    return out


def _sha256_json(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_card(meta: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Model-version tags and a description a person can read in the MLflow UI."""
    cal, inp, prov = meta["calibration"], meta["input"], meta.get("provenance", {})
    served = (prov.get("metrics") or {}).get("served_test") or {}
    at_tau = served.get("tau") or {}
    m = meta["model"]

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    tags = {
        "method": m["method"], "backbone": m["backbone"], "classes": ",".join(meta["classes"]),
        "positive_class": meta["positive_class"], "tau": f"{cal['tau']:.4f}", "score": cal["score"],
        "mpp": fmt(inp.get("target_mpp")), "tile_size": str(inp.get("tile_size")),
        "test_dice": fmt(at_tau.get("dice_fg", "n/a")), "test_pxap": fmt(served.get("pxap", "n/a")),
        "test_f1_pos": fmt(at_tau.get("f1_pos", "n/a")), "test_f1_neg": fmt(at_tau.get("f1_neg", "n/a")),
        "data_manifest_sha256": str(prov.get("data_manifest_sha256")), "guard_met": str(prov.get("guard_met", True)),
        "package_digest": meta["digest"], "medwsol_schema": str(meta["schema_version"]),
    }
    desc = (f"{m['method']} ({m['backbone']}, output stride {m['output_stride']}) for {' / '.join(meta['classes'])}; "
            f"heatmap score: {cal['score']} of class {meta['positive_class']!r}, threshold tau = {cal['tau']:.3f} "
            f"({cal.get('tau_chosen_on')}); tiles of {inp.get('tile_size')} px at {inp.get('target_mpp')} um/px. "
            f"Test (served): Dice {tags['test_dice']}, PxAP {tags['test_pxap']}, F1+ {tags['test_f1_pos']}, "
            f"F1- {tags['test_f1_neg']}. Data manifest sha256 {str(prov.get('data_manifest_sha256'))[:12]}; "
            f"run {prov.get('run_id')}; commit {prov.get('git_commit')}.")
    return tags, desc


def package_run(ctx) -> Path | None:
    """Build ``<run>/package`` from the best checkpoint, the calibration and the metrics; log and register it."""
    from medwsol.checkpoint import model_from_checkpoint, read_checkpoint
    from medwsol.data.manifest import load_manifest
    from medwsol.engine.evaluate import calibrate
    from medwsol.engine.runtime import select_device
    from medwsol.engine.train import SELECT
    from medwsol.package import build_package, git_commit, read_package_meta, sha256_file

    cfg, rd = ctx.cfg, ctx.run_dir
    summary = ctx.results.get("train") or {}
    if "stopped_after" in summary:
        return None  # a time-boxed slice of training: package when it finishes (--resume)
    console = _console()
    ck = read_checkpoint(rd / "checkpoints" / "best.pt")
    calibration = ctx.results.get("calibration")
    if calibration is None:
        device = select_device(cfg.train.device)
        network = model_from_checkpoint(ck, source=str(rd / "checkpoints" / "best.pt")).to(device)
        network.classes = list(cfg.data.classes)
        df = load_manifest(cfg.data.manifest, list(cfg.data.classes))
        calibration = calibrate(network, cfg, df, device, cfg.slides.score, _positive_class(cfg), cfg.slides.map_class)
    history = ck.get("history") or []
    best_row = next((r for r in history if r.get("epoch") == ck.get("best_epoch")), {})
    metrics = ctx.results.get("evaluate") or {}
    tc = cfg.train
    key, higher = SELECT[tc.select_metric]
    select_value = float(best_row.get(key, ck.get("best_value") or 0.0)) if best_row else float(ck.get("best_value") or 0)
    guard_met = bool(summary.get("guard_met", tc.select_max_val_error is None
                                 or (best_row.get("val_error", 0.0) <= tc.select_max_val_error)))
    provenance = {
        "run_id": getattr(ctx.tracker, "run_id", None), "run_dir": str(rd.resolve()), "pipeline": cfg.name,
        "config_sha256": _sha256_json(cfg.model_dump(mode="json")),
        "data_manifest": str(cfg.data.manifest), "data_manifest_sha256": sha256_file(cfg.data.manifest),
        "git_commit": git_commit(), "medwsol_version": _version(),
        "select_metric": tc.select_metric, "select_value": select_value, "guard_met": guard_met,
        "best_epoch": ck.get("best_epoch"),
        "metrics": {"valid": {k: v for k, v in best_row.items() if k.startswith(("val_", "valpx_"))},
                    "test": metrics.get("test"), "served_test": (metrics.get("served") or {}).get("test")},
    }
    model = {**ck["model"], "extra_state": ck.get("extra_state") or {}}
    pkg_dir = build_package(rd / PACKAGE_DIR, ck["state_dict"], model, list(cfg.data.classes),
                            calibration["positive_class"], _input_contract(cfg), calibration, provenance)
    meta = read_package_meta(pkg_dir)
    console.print(f"model package {pkg_dir} ({meta['digest'][:19]}): tau {calibration['tau']:.3f} on the "
                  f"{calibration['score']} score ({calibration['tau_chosen_on']})")
    ctx.results["package"] = pkg_dir
    uri = ctx.tracker.log_package(pkg_dir)
    if uri and cfg.tracking.register_as:
        tags, desc = model_card(meta)
        reg = ctx.tracker.register(uri, cfg.tracking.register_as, tc.select_metric, select_value, higher,
                                   tags=tags, description=desc)
        ctx.results["registry"] = reg
        line = (f"registered {reg['registered_model']} v{reg['version']} ({reg['select_metric']}={reg['value']:.4g}); "
                f"champion: v{reg['champion_version']}")
        if not reg["champion_moved"]:
            line += f" (alias not moved: {reg['reason']})"
        console.print(line)
    return pkg_dir


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medwsol")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


# -------------------------------------------------------------------------------------------- slides


def serving_setup(pkg, slides_cfg, explicit: set[str] | None = None, classes: list[str] | None = None):
    """The :class:`~medwsol.engine.served.ServedModel` and the slide settings a package asks for.

    The package decides classes, tile size, target mpp, score, positive class and ``tau``. Settings the
    user set explicitly (``explicit``: names of ``slides.*`` fields set in the YAML or with ``--set``)
    override the package where that is sound - tile geometry, overlap, resolutions, batch size - and
    fail with one line where it would make the threshold meaningless (another score or positive class
    without an explicit ``slides.threshold``) or contradict the model (other ``classes``).

    Returns:
        ``(served, settings)``: the ServedModel and a copy of ``slides_cfg`` with the package's values.
    """
    from medwsol.engine.served import served_from_package

    explicit = set(explicit or ())
    if classes is not None:
        _check_classes(pkg, classes, "data.classes")
    cal, inp = pkg.calibration, pkg.meta["input"]
    updates: dict[str, Any] = {}
    if "tile_size" not in explicit:
        updates["tile_size"] = int(inp["tile_size"])
    if "target_mpp" not in explicit and inp.get("target_mpp"):
        updates["target_mpp"] = float(inp["target_mpp"])
    positive = slides_cfg.positive_class if "positive_class" in explicit and slides_cfg.positive_class else None
    if positive is not None and positive not in pkg.classes:
        raise ConfigError(f"slides.positive_class: {positive!r} is not one of the model package's classes "
                          f"{pkg.classes}; fix: name one of them")
    score = slides_cfg.score if "score" in explicit else None
    tau = None
    source = None
    changed = (score not in (None, cal["score"])) or (positive not in (None, pkg.meta["positive_class"]))
    # (a class-agnostic weight map, as the weight-map methods make, is the same map either way)
    if ("map_class" in explicit and slides_cfg.map_class != cal.get("map_class", "predicted")
            and getattr(pkg.network, "supports_target_class", False)):
        raise ConfigError(f"slides.map_class: the package serves the {cal.get('map_class', 'predicted')} map (its map "
                          "range and tau were fitted on it); fix: drop the override, or re-package the model")
    if "threshold" in explicit and slides_cfg.threshold is not None:
        tau, source = float(slides_cfg.threshold), "slides.threshold (set explicitly)"
    elif changed:
        raise ConfigError(
            f"slides.score/positive_class: the package's tau ({cal['tau']:.3f}) was chosen for the {cal['score']} "
            f"score of {pkg.meta['positive_class']!r}; fix: drop the override, or also set slides.threshold")
    stitching = inp.get("stitching") or {}  # packages made before it was recorded: the slides defaults
    for key in ("blend", "blend_sigma"):
        if key not in explicit and stitching.get(key) is not None:
            updates[key] = stitching[key]
    if "overlap" not in explicit and stitching.get("overlap_fraction") is not None:
        tile = int(updates.get("tile_size", slides_cfg.tile_size))
        updates["overlap"] = min(tile - 1, int(round(float(stitching["overlap_fraction"]) * tile)))
    settings = slides_cfg.model_copy(update=updates)
    if "overlap" in explicit and settings.overlap is not None and settings.overlap >= settings.tile_size:
        raise ConfigError(f"slides.overlap: {settings.overlap} must be smaller than the tile size {settings.tile_size}; "
                          "fix: lower slides.overlap")
    served = served_from_package(pkg, score=score, positive_class=positive, tau=tau, tau_source=source)
    return served, settings


def collect_slides(cfg) -> list[Path]:
    """``slides.inputs`` + the ``slide`` column of ``slides.manifest`` (+ held-out synthetic slides)."""
    from medwsol.io import read_csv_table

    slides = [Path(p) for p in cfg.slides.inputs]
    if cfg.slides.manifest is not None:
        man = Path(cfg.slides.manifest)
        df = read_csv_table(man, "slides manifest", ConfigError, empty_fix="add a header line 'slide' and one slide "
                            "path per line")
        if "slide" not in df.columns:
            raise ConfigError(f"{man}: no 'slide' column; fix: add one with slide paths (relative to the CSV)")
        slides += [(man.parent / str(s).strip()) if not Path(str(s).strip()).is_absolute() else Path(str(s).strip())
                   for s in df["slide"] if str(s).strip()]
    if not slides and cfg.data.source == "slides" and cfg.data.tiles.slides is None:
        cohort = cfg.data.manifest.parent.with_name(cfg.data.manifest.parent.name + "_cohort")
        test_csv = cohort / "test_slides.csv"
        if test_csv.is_file():
            df = read_csv_table(test_csv, "test_slides.csv", DataError)
            slides += [(test_csv.parent / str(s)) if not Path(str(s)).is_absolute() else Path(str(s))
                       for s in df["slide"]]
    if not slides:
        raise ConfigError("slides.inputs: no slides to infer on; fix: pass slide files, --manifest, "
                          "or set slides.inputs / slides.manifest")
    return slides


def serving_runtime(pkg, served, settings, device, console: Console | None = None):
    """What runs the served model on slides: ``slides.runtime`` resolved for ``device`` (see :mod:`medwsol.engine.runtimes`).

    ``torch`` returns ``served`` itself; ``onnx`` / ``onnx-int8`` an ONNX Runtime drop-in, built or reused
    from the package's runtime cache and refused (one line) when its faithfulness check is below
    ``slides.runtime_min_dice``. With ``slides.runtime: auto`` on a CPU, an int8 runtime that cannot be
    built (no validation tiles here) or is refused falls back to ``onnx`` (fp32), and says so.
    """
    from medwsol.engine.runtimes import build_runtime, resolve_runtime
    from medwsol.errors import MedwsolError

    console = console or _console()
    name = resolve_runtime(getattr(settings, "runtime", "torch"), device)
    if name == "torch":
        return served
    cal = list(getattr(settings, "runtime_calibration", []) or [])
    manifest = cal[0] if len(cal) == 1 and Path(cal[0]).suffix.lower() == ".csv" else None
    kw = dict(tile_size=settings.tile_size, threads=settings.runtime_threads, calibration_manifest=manifest,
              calibration_slides=[] if manifest is not None else cal, min_dice=settings.runtime_min_dice,
              fallback_mpp=settings.fallback_mpp, log=console.print)
    try:
        return build_runtime(pkg, served, name, **kw)
    except MedwsolError as err:
        if settings.runtime != "auto" or name == "onnx":
            raise
        console.print(f"[yellow]note:[/] slides.runtime auto: {name} not used ({str(err).splitlines()[0]}); "
                      "running onnx (fp32)")
        return build_runtime(pkg, served, "onnx", **kw)


def infer_from_package(pkg, slides: list[Path], settings, out_dir: Path, device, tracker=None,
                       amp: str = "auto", served=None, console: Console | None = None) -> pd.DataFrame:
    """Run the cohort with a package's served model; print where tau came from and each failure."""
    from medwsol.engine.infer import effective_overlap, infer_cohort

    console = console or _console()
    if served is None:
        served, settings = serving_setup(pkg, settings)
    if settings.cluster:
        return infer_on_cluster(pkg, slides, settings, out_dir, device, tracker=tracker, amp=amp, served=served,
                                console=console)
    served = serving_runtime(pkg, served, settings, device, console)
    score = ("weight map x P(" + served.positive_class + ")") if served.score_mode == "weight_x_prob" else "weight map"
    console.print(f"{len(slides)} slide(s); model {pkg.source} ({pkg.digest[:19]}); score: {score}; "
                  f"tau {served.tau:.3f} from {served.tau_source}; tiles {settings.tile_size} px at "
                  f"{settings.target_mpp} um/px, overlap {effective_overlap(settings)} px ({settings.blend}); "
                  f"output {out_dir}")
    df = infer_cohort(served, slides, settings, out_dir, device, tracker=tracker, amp=amp)
    for _, r in df[df.status == "failed"].iterrows():
        console.print(f"[red]failed:[/] {r['error']}")
    console.print(df.drop(columns=["outputs"], errors="ignore").to_string(index=False))
    return df


def copy_package(pkg, dst: Path) -> Path:
    """``pkg``'s folder copied to ``dst`` (atomically; kept when ``dst`` already holds the same digest)."""
    from medwsol.io import atomic_dir
    from medwsol.package import PACKAGE_FILE, read_package_meta

    dst = Path(dst)
    if (dst / PACKAGE_FILE).is_file():
        try:
            if read_package_meta(dst)["digest"] == pkg.digest:
                return dst
        except Exception:  # noqa: BLE001 - anything else there is replaced
            pass
    with atomic_dir(dst) as tmp:
        for f in sorted(Path(pkg.path).iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return dst


def infer_on_cluster(pkg, slides: list[Path], settings, out_dir: Path, device, tracker=None, amp: str = "auto",
                     served=None, console: Console | None = None, handle=None) -> pd.DataFrame:
    """The cohort on Dask (``settings.cluster``): one task per slide, the driver writes records and slides.csv.

    Order, so that a bad cluster leaves nothing behind: connect (an unreachable scheduler fails here),
    copy the package into ``<out>/package/`` for the workers, check that every worker loads it (else the
    copy - and an output folder this call made - is removed), then run.
    """
    from medwsol.engine.cohort import check_workers, connect, run_cohort, serve_kwargs
    from medwsol.engine.infer import log_cohort, output_names

    console = console or _console()
    if served is None:
        served, settings = serving_setup(pkg, settings)
    own = handle is None
    if own:
        handle = connect(settings.cluster, settings.worker_threads, setting="slides.cluster (--cluster)")
    try:
        out_dir = Path(out_dir)
        made_out = not out_dir.exists()
        pkg_dir = out_dir / PACKAGE_DIR
        had_pkg = pkg_dir.exists()
        copy_package(pkg, pkg_dir)
        try:
            # slides.runtime: built (or reused) here beside the workers' copy, so workers load the same graph
            import dataclasses

            served = serving_runtime(dataclasses.replace(pkg, path=pkg_dir.resolve(), source=str(pkg_dir.resolve())),
                                     served, settings, device, console)
            check_workers(handle, pkg_dir.resolve(), pkg.digest, serve_kwargs(served))
        except BaseException:
            if not had_pkg:
                shutil.rmtree(pkg_dir, ignore_errors=True)
            if made_out and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
        console.print(f"{len(slides)} slide(s) on {handle.describe()}; model {pkg.source} ({pkg.digest[:19]}); "
                      f"{served.score_mode} score of {served.positive_class!r}; tau {served.tau:.3f} from "
                      f"{served.tau_source}; tiles {settings.tile_size} px at {settings.target_mpp} um/px; "
                      f"output {out_dir}")
        names = output_names(slides, out_dir)
        df = run_cohort(handle, pkg_dir.resolve(), served, [Path(s).resolve() for s in slides], names, settings,
                        out_dir.resolve(), str(device), amp, console=console)
    finally:
        if own:
            handle.close()
    if tracker is not None:
        log_cohort(tracker, df, out_dir / "slides.csv")
    for _, r in df[df.status == "failed"].iterrows():
        console.print(f"[red]failed:[/] {r['error']}")
    console.print(df.drop(columns=["outputs"], errors="ignore").to_string(index=False))
    return df


def stage_infer(ctx) -> pd.DataFrame:
    """Stitched heatmaps for every slide with the run's package (or ``--model``)."""
    from medwsol.engine.runtime import select_device

    cfg = ctx.cfg
    slides = collect_slides(cfg)
    device = select_device(cfg.train.device)
    if ctx.model_ref is not None:
        pkg = resolve_package(ctx.model_ref, cfg.tracking.uri, ctx.run_dir)
    else:
        from medwsol.package import is_package_dir, load_package

        pkg_dir = ctx.run_dir / PACKAGE_DIR
        if not is_package_dir(pkg_dir):
            raise CheckpointError(f"{pkg_dir}: this run has no model package; fix: run train/evaluate first, "
                                  "or pass --model models:/<name>@<alias>")
        pkg = load_package(pkg_dir)
    served, settings = serving_setup(pkg, cfg.slides, explicit=set(cfg.slides.model_fields_set))
    df = infer_from_package(pkg, slides, settings, ctx.slides_dir, device, tracker=ctx.tracker, amp=cfg.train.amp,
                            served=served)
    ctx.results["failed_slides"] = int((df.status == "failed").sum())
    return df


def _truth_geojson(slide: Path, annotations: Path | None) -> Path | None:
    cands = [slide.with_suffix(".geojson")]
    if annotations is not None:
        cands.append(Path(annotations) / f"{slide.stem}.geojson")
    cands.append(slide.parent.parent / "annotations" / f"{slide.stem}.geojson")
    return next((c for c in cands if c.is_file()), None)


def score_slide(folder: Path, truth: Path, threshold: float | None, exported_geojson: Path | None) -> dict[str, Any]:
    """Dice of the thresholded heatmap with rasterised true polygons; IoU of exported polygons; seam ratio."""
    import numpy as np
    from shapely.geometry import shape
    from shapely.ops import unary_union

    from medwsol.data.geometry import rasterize_geometry
    from medwsol.engine.infer import load_heatmap, tile_boxes
    from medwsol.metrics import seam_ratio

    heat, cov, meta = load_heatmap(folder)
    threshold = float(meta["threshold"] if threshold is None else threshold)
    try:
        gj = json.loads(truth.read_text(encoding="utf-8"))
        geoms = [shape(f["geometry"]) for f in gj.get("features", []) if f.get("geometry")]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{truth}: not a readable GeoJSON ({type(err).__name__}: {str(err)[:100]}); fix: re-export the "
                        "annotation from QuPath, or remove it") from None
    true = unary_union(geoms) if geoms else None
    H, W = meta["heatmap_shape"]
    k = float(meta["level0_per_heatmap_px"])
    gt = rasterize_geometry(true, 0, 0, W, H, scale=k)
    heat = np.asarray(heat[:, :])
    pred = heat >= threshold
    inter = float(np.logical_and(pred, gt).sum())
    denom = float(pred.sum() + gt.sum())
    out: dict[str, Any] = {
        "truth": str(truth), "threshold": threshold,
        "dice": (2 * inter / denom) if denom else 1.0,
        "true_fraction": float(gt.mean()), "pred_fraction": float(pred.mean()),
    }
    tiles = pd.read_csv(folder / "tiles.csv")
    if len(tiles):
        # seams where one tile hands over to the next: the stitch lines halfway into each overlap (the tile
        # edges themselves when tiles do not overlap); and, for reference, at the tiles' own edges
        xy, t0 = tiles[["x", "y"]].to_numpy(), float(meta["level0_tile_size"])
        half = 0.5 * float(meta.get("overlap") or 0) * float(meta["target_mpp"]) / float(meta["slide_mpp"])
        covered = np.asarray(cov[:, :])
        out.update(seam_ratio(heat, covered, tile_boxes(xy, k, t0, inset=half)))
        out["seam_ratio_tile_edges"] = seam_ratio(heat, covered, tile_boxes(xy, k, t0))["seam_ratio"]
    if exported_geojson is not None and exported_geojson.is_file():
        from medwsol.export.qupath import polygons_iou, read_geojson

        out["polygon_iou"] = float(polygons_iou(read_geojson(exported_geojson), gj))
    return out


def export_slides(summary: pd.DataFrame, out_root: Path, export_cfg, annotations: Path | None = None,
                  tracker=None, console: Console | None = None) -> pd.DataFrame:
    """Export every finished slide folder; score it against ground truth when there is one.

    A slide whose export or scoring fails gets a ``failed`` row with its one-line error; the others go on.
    """
    from medwsol.engine.infer import slide_error_line
    from medwsol.export import export_slide

    console = console or _console()
    rows = []
    for _, r in summary.iterrows():
        slide = Path(str(r["slide"]))
        folder = Path(str(r["outputs"])) if str(r.get("outputs", "")) else out_root / slide.stem
        if r["status"] not in ("ok", "skipped", "empty") or not (folder / "meta.json").is_file():
            continue
        try:
            paths = export_slide(folder, export_cfg)
            row: dict[str, Any] = {"slide": str(slide), "status": "ok", "error": "", **{k: str(v) for k, v in paths.items()}}
            truth = _truth_geojson(slide, annotations)
            if truth is not None:
                gj = paths.get("geojson")
                score = score_slide(folder, truth, None, Path(gj) if gj else None)
                write_json(folder / "slide_eval.json", score)
                row.update({"dice": score["dice"], "polygon_iou": score.get("polygon_iou"),
                            "seam_ratio": score.get("seam_ratio")})
                if tracker is not None:
                    tracker.log_metrics({f"slide.{folder.name}.{k}": score[k] for k in ("dice", "polygon_iou",
                                                                                        "seam_ratio") if k in score})
                console.print(f"{folder.name}: Dice {score['dice']:.3f} vs {truth.name}"
                              + (f", polygon IoU {score['polygon_iou']:.3f}" if "polygon_iou" in score else "")
                              + (f", seam ratio {score['seam_ratio']:.2f}" if "seam_ratio" in score else ""))
        except Exception as err:  # noqa: BLE001 - one slide never stops the cohort
            msg = slide_error_line(slide, err)
            console.print(f"[red]export failed:[/] {msg}")
            rows.append({"slide": str(slide), "status": "failed", "error": msg})
            continue
        if tracker is not None:
            for p in paths.values():
                tracker.log_artifact(p, f"slides/{folder.name}")
        rows.append(row)
    out = pd.DataFrame(rows)
    from medwsol.io import atomic_path

    with atomic_path(out_root / "exports.csv") as tmp:
        out.to_csv(tmp, index=False)
    if tracker is not None:
        tracker.log_artifact(out_root / "exports.csv", "slides")
    return out


def stage_export(ctx) -> pd.DataFrame:
    """Export every finished slide folder of the run (thresholds from each slide's meta.json)."""
    cfg = ctx.cfg
    root = ctx.slides_dir
    summary_csv = root / "slides.csv"
    if not summary_csv.is_file():
        raise SlideError(f"{summary_csv}: no inference summary; fix: run the infer stage first")
    df = pd.read_csv(summary_csv, keep_default_na=False)
    out = export_slides(df, root, cfg.export, cfg.data.tiles.annotations, tracker=ctx.tracker)
    n_failed = int((out.status == "failed").sum()) if len(out) else 0
    ctx.results["failed_slides"] = ctx.results.get("failed_slides", 0) + n_failed
    ctx.tracker.log_artifact(summary_csv, "slides")
    return out


def cohort_error(tables) -> SlideError | None:
    """The one-line error of a cohort whose slides failed (None when none did): how many, the first, where.

    Args:
        tables: ``(table, csv path)`` pairs: the infer summary (``slides.csv``), the exports (``exports.csv``).
    """
    failed = [(r, path) for t, path in tables if t is not None and len(t) and "status" in t.columns
              for _, r in t[t.status == "failed"].iterrows()]
    if not failed:
        return None
    first = str(failed[0][0].get("error", "") or "").split("; fix:")[0].strip()
    where = " and ".join(dict.fromkeys(str(path) for _, path in failed))
    return SlideError(f"{len(failed)} slide(s) failed (the others finished); first: {first}; see {where} for each "
                      "error; fix: correct or remove those slides and re-run (finished ones are skipped)")
