"""Exporters of a slide's heatmap: pyramidal TIFF, QuPath GeoJSON, PNG thumbnail, NIfTI/MHA.

Importing this package is light (no numpy-heavy, torch or matplotlib imports); the names below are
resolved lazily from their modules. :func:`export_slide` reads one per-slide folder written by
``medwsol.engine.infer`` (``meta.json``, ``heatmap.npy|zarr``, ``coverage.npy|zarr``, ``tiles.csv``)
and writes the formats ``ExportConfig.formats`` asks for, each file atomically.

Example:
    >>> from medwsol.config import ExportConfig
    >>> from medwsol.export import export_slide
    >>> paths = export_slide("runs/x/slides/slide1", ExportConfig(formats=["tiff", "geojson"]))  # doctest: +SKIP
    >>> sorted(paths)  # doctest: +SKIP
    ['geojson', 'tiff']
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

_LAZY = {
    "write_heatmap_tiff": "medwsol.export.tiff",
    "heatmap_to_uint8": "medwsol.export.tiff",
    "heatmap_geojson": "medwsol.export.qupath",
    "heatmap_regions": "medwsol.export.qupath",
    "write_geojson": "medwsol.export.qupath",
    "read_geojson": "medwsol.export.qupath",
    "validate_qupath_geojson": "medwsol.export.qupath",
    "geojson_geometry": "medwsol.export.qupath",
    "polygons_iou": "medwsol.export.qupath",
    "write_volume": "medwsol.export.volume",
    "read_volume": "medwsol.export.volume",
    "slide_thumbnail": "medwsol.export.overlay",
    "blend_heatmap": "medwsol.export.overlay",
    "overlay_grid": "medwsol.export.overlay",
}

__all__ = sorted([*_LAZY, "export_slide", "read_slide_outputs", "EXPORT_FILES"])

#: file name patterns of each format, ``{name}`` = the slide stem
EXPORT_FILES = {
    "tiff": "{name}_heatmap.tif",
    "geojson": "{name}.geojson",
    "png": "{name}_heatmap.png",
    "nifti": "{name}_heatmap.nii.gz",
    "mha": "{name}_heatmap.mha",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def read_slide_outputs(slide_out_dir: str | os.PathLike[str]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(heatmap, coverage, tiles DataFrame, meta)`` of one infer output folder (arrays lazy: mmap/zarr).

    Follows the contract of ``medwsol.engine.infer`` without importing it (it pulls in torch/MONAI).

    Raises:
        SlideError: no ``meta.json`` or a missing heatmap file.
    """
    import numpy as np
    import pandas as pd

    from medwsol.errors import SlideError

    from medwsol.errors import MedwsolError
    from medwsol.io import read_json_file

    folder = Path(slide_out_dir)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise SlideError(f"{folder}: no meta.json (not a finished slide output); fix: run the infer stage first")
    try:
        meta = read_json_file(meta_path, "meta.json")
    except MedwsolError as err:
        raise SlideError(f"{err}".replace("; fix:", "; fix: re-run the infer stage for this slide, or", 1)) from None
    if not isinstance(meta, dict):
        raise SlideError(f"{meta_path}: not a JSON object; fix: re-run the infer stage for this slide")
    missing = [k for k in ("width", "height", "slide_mpp", "level0_per_heatmap_px") if k not in meta]
    if missing:
        raise SlideError(f"{meta_path}: keys {missing} missing; fix: re-run the infer stage for this slide")
    bad = [k for k in ("width", "height", "slide_mpp", "level0_per_heatmap_px")
           if isinstance(meta[k], bool) or not isinstance(meta[k], (int, float)) or not meta[k] > 0]
    if bad:
        raise SlideError(f"{meta_path}: {', '.join(bad)} must be positive numbers; fix: re-run the infer stage for "
                         "this slide")
    fmt = meta.get("heatmap_format", "npy")
    hname, cname = meta.get("heatmap", f"heatmap.{fmt}"), meta.get("coverage", f"coverage.{fmt}")
    if not (folder / hname).exists():
        raise SlideError(f"{folder / hname}: heatmap missing; fix: re-run the infer stage for this slide")
    try:
        if fmt == "zarr":
            import zarr

            heat = zarr.open_array(str(folder / hname), mode="r")
            cov = zarr.open_array(str(folder / cname), mode="r") if (folder / cname).exists() else None
        else:
            heat = np.load(folder / hname, mmap_mode="r", allow_pickle=False)
            cov = np.load(folder / cname, mmap_mode="r", allow_pickle=False) if (folder / cname).exists() else None
        if getattr(heat, "ndim", 0) != 2 or (cov is not None and tuple(cov.shape) != tuple(heat.shape)):
            raise ValueError(f"heatmap shape {getattr(heat, 'shape', None)}, coverage shape "
                             f"{None if cov is None else cov.shape}")
        tiles_csv = folder / "tiles.csv"
        tiles = pd.read_csv(tiles_csv) if tiles_csv.is_file() and tiles_csv.stat().st_size else None
    except Exception as err:  # noqa: BLE001 - numpy/zarr/pandas raise many types on damaged files
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SlideError(f"{folder}: the heatmap outputs are damaged ({reason}); fix: re-run the infer stage for this "
                         "slide (with --overwrite)") from None
    return heat, cov, tiles, meta


def _thumbnail(meta: dict[str, Any], max_side: int) -> Any:
    """The slide's thumbnail via OpenSlide; a blank one (with a warning) when the slide is gone."""
    import numpy as np

    w, h = int(meta["width"]), int(meta["height"])
    slide = meta.get("slide")
    if slide and Path(slide).is_file():
        try:
            import openslide

            with openslide.OpenSlide(str(slide)) as s:
                return np.asarray(s.get_thumbnail((max_side, max_side)).convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any reader failure falls back to a blank thumbnail
            warnings.warn(f"{slide}: thumbnail unreadable ({str(err).splitlines()[0][:100]}); using a blank one",
                          stacklevel=3)
    else:
        warnings.warn(f"{slide}: slide not found for the PNG thumbnail; using a blank background", stacklevel=3)
    s = max_side / max(w, h)
    return np.full((max(1, round(h * s)), max(1, round(w * s)), 3), 255, np.uint8)


def _strided(a: Any, max_side: int) -> Any:
    import numpy as np

    h, w = a.shape
    step = max(1, -(-max(h, w) // max_side))
    return np.asarray(a[::step, ::step])


def export_slide(
    slide_out_dir: str | os.PathLike[str],
    export_cfg: Any = None,
    threshold: float | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    thumbnail_size: int = 1024,
) -> dict[str, Path]:
    """Write the configured exports of one slide's heatmap.

    Files (``name`` = slide stem, in ``out_dir``, default the slide folder itself): ``tiff`` ->
    ``{name}_heatmap.tif`` (grey uint8 pyramid, heatmap mpp), ``geojson`` -> ``{name}.geojson``
    (``.geojson.gz`` when ``geojson_gzip``; tiles + region annotations), ``png`` ->
    ``{name}_heatmap.png`` (heat over the OpenSlide thumbnail, :func:`slide_thumbnail`), ``nifti`` ->
    ``{name}_heatmap.nii.gz``, ``mha`` -> ``{name}_heatmap.mha`` (spacing = heatmap mpp in mm).

    Args:
        slide_out_dir: ``<infer out>/<slide stem>/`` (see ``medwsol.engine.infer``).
        export_cfg: an ``ExportConfig`` (default: its defaults).
        threshold: region threshold for the GeoJSON (default ``meta["threshold"]``, else 0.5).
        out_dir: where to write (default ``slide_out_dir``).
        thumbnail_size: longer side of the slide thumbnail read for the PNG.

    Returns:
        ``{format: path}`` for each format written.

    Raises:
        SlideError: not a finished slide output folder.
        DataError: the output folder cannot be written (nothing is left half-written).
    """
    import numpy as np

    from medwsol.config import ExportConfig
    from medwsol.errors import DataError

    cfg = export_cfg if export_cfg is not None else ExportConfig()
    heat, cov, tiles, meta = read_slide_outputs(slide_out_dir)
    out = Path(out_dir) if out_dir is not None else Path(slide_out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the export folder ({err.strerror}); fix: choose a writable folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"{out}: export folder is not writable; fix: make it writable or pass another out_dir")
    name = str(meta.get("name") or Path(slide_out_dir).name)
    k = float(meta["level0_per_heatmap_px"])
    heat_mpp = float(meta["slide_mpp"]) * k
    thr = float(threshold if threshold is not None else (meta.get("threshold") or 0.5))
    paths: dict[str, Path] = {}
    try:
        for fmt in cfg.formats:
            target = out / EXPORT_FILES[fmt].format(name=name)
            if fmt == "tiff":
                from medwsol.export.tiff import write_heatmap_tiff

                paths[fmt] = write_heatmap_tiff(heat, target, mpp_x=heat_mpp)
            elif fmt == "geojson":
                from medwsol.export.qupath import heatmap_geojson, write_geojson

                gj = heatmap_geojson(tiles, meta, np.asarray(heat[:, :]), thr, cfg.class_name, cfg.colour, cfg.simplify,
                                     cfg.min_region_area, coverage=None if cov is None else np.asarray(cov[:, :]))
                paths[fmt] = write_geojson(gj, target, gzip=cfg.geojson_gzip)
            elif fmt == "png":
                from medwsol.export.overlay import slide_thumbnail

                small = _strided(heat, 2 * thumbnail_size).astype(np.float32)
                mask = None if cov is None else _strided(cov, 2 * thumbnail_size).astype(bool)
                paths[fmt] = slide_thumbnail(_thumbnail(meta, thumbnail_size), small, target, cmap=cfg.colormap,
                                             title=f"{name}  (threshold {thr:.3g})", tissue_mask=mask,
                                             label=_score_label(meta))
            elif fmt in ("nifti", "mha"):
                from medwsol.export.volume import write_volume

                paths[fmt] = write_volume(heat, target, spacing_mm=heat_mpp / 1000.0)
    except OSError as err:
        raise DataError(f"{out}: cannot write {err.filename or 'the exports'} ({err.strerror or err}); "
                        "fix: make the folder writable or pass another out_dir") from None
    return paths


def _score_label(meta: dict) -> str:
    """What the heatmap values are, for a colour bar: the served score named in ``meta.json``."""
    if meta.get("score") == "weight_x_prob":
        return f"weight x P({meta.get('positive_class') or 'positive'})"
    return "weight"
