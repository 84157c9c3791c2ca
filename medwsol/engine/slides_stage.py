"""The ``infer`` and ``export`` stages: which slides, which model, which threshold; cohort bookkeeping.

The work itself is in :mod:`medwsol.engine.infer` (tiles, batched inference, stitching) and
:mod:`medwsol.export` (pyramidal TIFF, QuPath GeoJSON, PNG, NIfTI/MHA). When a slide has a
ground-truth GeoJSON (``<stem>.geojson`` beside it, or in ``data.tiles.annotations``), the
stitched heatmap is scored against it: Dice at the threshold, and the IoU of the exported
QuPath polygons with the true regions (``slide_eval.json`` in the slide's folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from medwsol.errors import ConfigError, SlideError
from medwsol.io import write_json

__all__ = ["infer_stage", "export_stage", "collect_slides", "stage_threshold", "score_slide"]


def collect_slides(ctx) -> list[Path]:
    """``slides.inputs`` + the ``slide`` column of ``slides.manifest`` (+ held-out synthetic slides)."""
    cfg = ctx.cfg
    slides = [Path(p) for p in cfg.slides.inputs]
    if cfg.slides.manifest is not None:
        man = Path(cfg.slides.manifest)
        df = pd.read_csv(man)
        if "slide" not in df.columns:
            raise ConfigError(f"{man}: no 'slide' column; fix: add one with slide paths (relative to the CSV)")
        slides += [(man.parent / str(s)) if not Path(str(s)).is_absolute() else Path(str(s)) for s in df["slide"]]
    if not slides and cfg.data.source == "slides" and cfg.data.tiles.slides is None:
        cohort = cfg.data.manifest.parent.with_name(cfg.data.manifest.parent.name + "_cohort")
        test_csv = cohort / "test_slides.csv"
        if test_csv.is_file():
            df = pd.read_csv(test_csv)
            slides += [(test_csv.parent / str(s)) if not Path(str(s)).is_absolute() else Path(str(s))
                       for s in df["slide"]]
    if not slides:
        raise ConfigError("slides.inputs: no slides to infer on; fix: pass slide files, --manifest, "
                          "or set slides.inputs / slides.manifest")
    return slides


def stage_threshold(ctx) -> tuple[float, str]:
    """``slides.threshold``, else tau chosen at evaluation (eval/metrics.json), else 0.5."""
    if ctx.cfg.slides.threshold is not None:
        return float(ctx.cfg.slides.threshold), "slides.threshold"
    m = ctx.run_dir / "eval" / "metrics.json"
    if m.is_file():
        tau = json.loads(m.read_text()).get("threshold", {}).get("tau")
        if tau is not None:
            return float(tau), f"tau from {m}"
    return 0.5, "default 0.5"


def infer_stage(ctx) -> pd.DataFrame:
    """Stitched heatmaps for every slide; the summary is ``<slides dir>/slides.csv``."""
    from medwsol.engine.infer import infer_cohort
    from medwsol.engine.models import load_model
    from medwsol.engine.runtime import select_device

    cfg = ctx.cfg
    console = Console(stderr=True)
    slides = collect_slides(ctx)
    device = select_device(cfg.train.device)
    model = load_model(ctx.model_ref, ctx.run_dir, cfg.tracking.uri, list(cfg.data.classes), device)
    thr, src = stage_threshold(ctx)
    console.print(f"{len(slides)} slide(s); threshold {thr:.3f} ({src}); output {ctx.slides_dir}")
    df = infer_cohort(model, slides, cfg.slides, ctx.slides_dir, device, list(cfg.data.classes), thr,
                      tracker=ctx.tracker, amp=cfg.train.amp)
    failed = df[df.status == "failed"]
    for _, r in failed.iterrows():
        console.print(f"[red]failed:[/] {r['error']}")
    ctx.results["failed_slides"] = len(failed)
    console.print(df.drop(columns=["outputs"], errors="ignore").to_string(index=False))
    return df


def _truth_geojson(ctx, slide: Path) -> Path | None:
    cands = [slide.with_suffix(".geojson")]
    ann = ctx.cfg.data.tiles.annotations
    if ann is not None:
        cands.append(Path(ann) / f"{slide.stem}.geojson")
    cands.append(slide.parent.parent / "annotations" / f"{slide.stem}.geojson")
    return next((c for c in cands if c.is_file()), None)


def score_slide(folder: Path, truth: Path, threshold: float, exported_geojson: Path | None) -> dict[str, Any]:
    """Dice of the thresholded heatmap with rasterised true polygons; IoU of exported polygons."""
    from shapely.geometry import shape
    from shapely.ops import unary_union

    from medwsol.data.synthetic_slide import rasterize_geometry
    from medwsol.engine.infer import load_heatmap

    heat, _cov, meta = load_heatmap(folder)
    gj = json.loads(truth.read_text())
    geoms = [shape(f["geometry"]) for f in gj.get("features", []) if f.get("geometry")]
    true = unary_union(geoms) if geoms else None
    H, W = meta["heatmap_shape"]
    k = float(meta["level0_per_heatmap_px"])
    gt = rasterize_geometry(true, 0, 0, W, H, scale=k)
    pred = np.asarray(heat[:, :]) >= threshold
    inter = float(np.logical_and(pred, gt).sum())
    denom = float(pred.sum() + gt.sum())
    out: dict[str, Any] = {
        "truth": str(truth), "threshold": threshold,
        "dice": (2 * inter / denom) if denom else 1.0,
        "true_fraction": float(gt.mean()), "pred_fraction": float(pred.mean()),
    }
    if exported_geojson is not None and exported_geojson.is_file():
        from medwsol.export.qupath import polygons_iou, read_geojson

        out["polygon_iou"] = float(polygons_iou(read_geojson(exported_geojson), gj))
    return out


def export_stage(ctx) -> pd.DataFrame:
    """Export every finished slide folder; score against ground truth when it exists."""
    from medwsol.export import export_slide

    cfg = ctx.cfg
    console = Console(stderr=True)
    root = ctx.slides_dir
    summary_csv = root / "slides.csv"
    if not summary_csv.is_file():
        raise SlideError(f"{summary_csv}: no inference summary; fix: run the infer stage first")
    df = pd.read_csv(summary_csv, keep_default_na=False)
    thr, _ = stage_threshold(ctx)
    rows = []
    for _, r in df.iterrows():
        slide = Path(str(r["slide"]))
        folder = root / slide.stem
        if r["status"] not in ("ok", "skipped", "empty") or not (folder / "meta.json").is_file():
            continue
        try:
            paths = export_slide(folder, cfg.export, threshold=thr)
        except Exception as err:  # noqa: BLE001 - one slide never stops the cohort
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            console.print(f"[red]export failed:[/] {slide}: {msg}")
            ctx.results["failed_slides"] = ctx.results.get("failed_slides", 0) + 1
            rows.append({"slide": str(slide), "status": "failed", "error": msg})
            continue
        row: dict[str, Any] = {"slide": str(slide), "status": "ok", **{k: str(v) for k, v in paths.items()}}
        truth = _truth_geojson(ctx, slide)
        if truth is not None:
            gj = paths.get("geojson")
            score = score_slide(folder, truth, thr, Path(gj) if gj else None)
            write_json(folder / "slide_eval.json", score)
            row.update({"dice": score["dice"], "polygon_iou": score.get("polygon_iou")})
            ctx.tracker.log_metrics({f"slide.{slide.stem}.dice": score["dice"],
                                     **({f"slide.{slide.stem}.polygon_iou": score["polygon_iou"]}
                                        if "polygon_iou" in score else {})})
            console.print(f"{slide.stem}: Dice {score['dice']:.3f} vs {truth.name}"
                          + (f", polygon IoU {score['polygon_iou']:.3f}" if "polygon_iou" in score else ""))
        for p in paths.values():
            ctx.tracker.log_artifact(p, f"slides/{slide.stem}")
        rows.append(row)
    out = pd.DataFrame(rows)
    from medwsol.io import atomic_path

    with atomic_path(root / "exports.csv") as tmp:
        out.to_csv(tmp, index=False)
    ctx.tracker.log_artifact(root / "exports.csv", "slides")
    ctx.tracker.log_artifact(summary_csv, "slides")
    return out
