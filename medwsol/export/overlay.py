"""Pictures people look at: heatmap blends, evaluation grids, slide thumbnails, curves.

Matplotlib is imported inside the functions and driven through its object API
(``matplotlib.figure.Figure`` with an explicit Agg canvas), so importing this
module is cheap and nothing touches pyplot's global state or the process-wide
backend. Every PNG is written atomically (:func:`medwsol.io.atomic_path`): a
failure leaves no partial file behind.

Images may be ``HxWx3`` uint8, ``HxWx3`` float in [0, 1], ``HxW`` grey, ``3xHxW``
(channel-first, as tensors come) or RGBA (alpha dropped). Heat and mask arrays
whose size differs from the image are resized to it by nearest neighbour, so a
coarse tile-level heatmap stays crisp over a thumbnail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medwsol.errors import DataError
from medwsol.io import atomic_path

__all__ = [
    "blend_heatmap",
    "overlay_grid",
    "slide_thumbnail",
    "plot_pr_curve",
    "plot_training_curves",
]

_GT_CONTOUR = "#00e5ff"  # cyan reads well over H&E pink/purple and over inferno
_MISMATCH = "#b2182b"


# --------------------------------------------------------------------------- array helpers


def _to_rgb_uint8(image: Any) -> np.ndarray:
    """Any supported image layout as ``HxWx3`` uint8."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channel-first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise DataError(f"image has shape {a.shape}; fix: pass HxWx3 RGB (uint8 or float in [0, 1])")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    if np.issubdtype(np.asarray(image).dtype, np.integer) or np.nanmax(a, initial=0.0) > 1.0:
        return np.clip(np.round(a), 0, 255).astype(np.uint8)  # already on a 0..255 scale
    return np.clip(np.round(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)


def _to_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim > 2:
        a = a.squeeze()
    if a.ndim != 2:
        raise DataError(f"{name} has shape {np.asarray(x).shape}; fix: pass a single HxW map")
    return a


def _resize_nearest(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``shape`` (pixel centres aligned)."""
    if a.shape == tuple(shape):
        return a
    h, w = shape
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
    return a[rows[:, None], cols[None, :]]


def _colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {name!r}; e.g. 'inferno', 'viridis', 'jet'") from None


def _new_figure(width_in: float, height_in: float, dpi: int, **kw: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_png: str | os.PathLike[str], dpi: int) -> Path:
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return out


def _no_ticks(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# --------------------------------------------------------------------------- blending


def blend_heatmap(
    rgb: Any,
    heat: Any,
    alpha: float = 0.5,
    cmap: str = "inferno",
    mask: Any = None,
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an RGB image.

    ``out = (1 - alpha) * rgb + alpha * cmap(heat)`` where ``heat`` is finite and
    ``mask`` is true; every other pixel keeps the image's colour exactly.

    Args:
        rgb: image (see the module docstring for accepted layouts).
        heat: ``HxW`` float map; values are clipped to [0, 1]; NaN means "no data".
            Resized to the image by nearest neighbour when its size differs.
        alpha: opacity of the heatmap in [0, 1].
        cmap: matplotlib colormap name.
        mask: optional ``HxW`` bool, where to draw the heat (e.g. the tissue).

    Returns:
        ``HxWx3`` uint8.

    Example:
        >>> import numpy as np
        >>> from medwsol.export.overlay import blend_heatmap
        >>> img = np.full((4, 4, 3), 200, np.uint8)
        >>> heat = np.linspace(0, 1, 16).reshape(4, 4); heat[0, 0] = np.nan
        >>> out = blend_heatmap(img, heat, alpha=0.5)
        >>> out.shape, out.dtype, out[0, 0].tolist()
        ((4, 4, 3), dtype('uint8'), [200, 200, 200])
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _to_rgb_uint8(rgb)
    h, w = base.shape[:2]
    hm = _resize_nearest(_to_2d(heat, "heat").astype(np.float64), (h, w))
    valid = np.isfinite(hm)
    if mask is not None:
        valid &= _resize_nearest(_to_2d(mask, "mask").astype(bool), (h, w))
    colours = _colormap(cmap)(np.clip(np.where(valid, hm, 0.0), 0.0, 1.0))[..., :3] * 255.0
    out = base.copy()
    mixed = (1.0 - alpha) * base[valid].astype(np.float64) + alpha * colours[valid]
    out[valid] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- evaluation grid


def overlay_grid(
    rows: Sequence[Mapping[str, Any]],
    out_png: str | os.PathLike[str],
    title: str | None = None,
    cmap: str = "inferno",
    dpi: int = 100,
    panel_inches: float = 3.0,
) -> Path:
    """Evaluation grid: one row per image, columns image | ground truth | weight map | mask.

    The weight-map panel has a colour bar (0..1). The last panel shows the image
    dimmed outside the thresholded mask (``weight >= threshold``) with the
    ground-truth outline in cyan, and its title gives the threshold and, when a
    ground truth exists, the image's F1+ / F1-. The row title holds the name,
    the true label and the prediction (red when they differ).

    Args:
        rows: dicts with keys ``image`` (required), ``weight_map`` (required, ``HxW`` in
            [0, 1]), ``gt`` (``HxW`` bool or None), ``threshold`` (default 0.5), ``name``,
            ``label``, ``pred`` (strings, optional). Pass a selection: every row is drawn.
        out_png: where to write the PNG (atomically).
        title: optional figure title.
        cmap: colormap of the weight map.
        dpi: resolution; the width is about ``4 * panel_inches * dpi`` pixels.
        panel_inches: width of one panel.

    Returns:
        The written path.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from medwsol.export.overlay import overlay_grid
        >>> img = np.zeros((32, 48, 3), np.uint8); gt = np.zeros((32, 48), bool); gt[8:24, 10:30] = True
        >>> row = dict(image=img, gt=gt, weight_map=gt * 0.8, threshold=0.5, name="a", label="benign", pred="benign")
        >>> overlay_grid([row], os.path.join(tempfile.mkdtemp(), "grid.png")).name
        'grid.png'
    """
    from medwsol.metrics import f1_scores

    if not rows:
        raise DataError("overlay_grid got no rows; fix: pass at least one image")
    prepared = []
    for i, row in enumerate(rows):
        if "image" not in row or "weight_map" not in row:
            raise DataError(f"overlay_grid row {i} lacks 'image' or 'weight_map' (keys: {sorted(row)})")
        img = _to_rgb_uint8(row["image"])
        h, w = img.shape[:2]
        wmap = _resize_nearest(_to_2d(row["weight_map"], "weight_map").astype(np.float64), (h, w))
        gt = row.get("gt")
        gt = None if gt is None else _resize_nearest(_to_2d(gt, "gt") > 0, (h, w))
        prepared.append((row, img, wmap, gt, float(row.get("threshold", 0.5))))

    ratios = [p[1].shape[0] / p[1].shape[1] for p in prepared]
    col_w = [1.0, 1.0, 1.0, 1.0]
    width = panel_inches * 4 + 1.2
    height = sum(panel_inches * r for r in ratios) + 0.45 * len(rows) + (0.6 if title else 0.2)
    fig = _new_figure(width, height, dpi, layout="constrained")
    axes = fig.subplots(len(rows), 4, squeeze=False, gridspec_kw={"height_ratios": ratios, "width_ratios": col_w})
    cm = _colormap(cmap).with_extremes(bad="#d0d0d0")

    for r, (row, img, wmap, gt, thr) in enumerate(prepared):
        ax_img, ax_gt, ax_w, ax_m = axes[r]
        for ax in axes[r]:
            _no_ticks(ax)
        ax_img.imshow(img, interpolation="nearest")
        name, label, pred = row.get("name"), row.get("label"), row.get("pred")
        lines = [str(name)] if name is not None else []
        tags = []
        if label is not None:
            tags.append(f"label: {label}")
        if pred is not None:
            tags.append(f"pred: {pred}")
        if tags:
            lines.append("  ".join(tags))
        wrong = label is not None and pred is not None and str(label) != str(pred)
        ax_img.set_ylabel("\n".join(lines), fontsize=10, color=_MISMATCH if wrong else "black")

        if gt is None:
            ax_gt.imshow(np.full(img.shape[:2], 0.85), cmap="gray", vmin=0, vmax=1)
            ax_gt.text(0.5, 0.5, "no pixel mask", ha="center", va="center", transform=ax_gt.transAxes, fontsize=9)
        else:
            ax_gt.imshow(gt, cmap="gray", vmin=0, vmax=1, interpolation="nearest")

        im = ax_w.imshow(np.ma.masked_invalid(wmap), cmap=cm, vmin=0.0, vmax=1.0, interpolation="nearest")
        cb = fig.colorbar(im, ax=ax_w, fraction=0.05, pad=0.02)
        cb.ax.tick_params(labelsize=7)

        pred_mask = np.nan_to_num(wmap, nan=-1.0) >= thr
        dimmed = np.where(pred_mask[..., None], img, (img * 0.3).astype(np.uint8))
        ax_m.imshow(dimmed, interpolation="nearest")
        m_title = f"weight ≥ {thr:.3g}"
        if gt is not None:
            if gt.any() and not gt.all():
                ax_m.contour(gt.astype(float), levels=[0.5], colors=_GT_CONTOUR, linewidths=1.0)
            f1p, f1n = f1_scores(pred_mask, gt)
            m_title += f"\nF1+ {f1p:.2f}  F1− {f1n:.2f}"
        if r == 0:
            ax_img.set_title("image", fontsize=10)
            ax_gt.set_title("ground truth", fontsize=10)
            ax_w.set_title("weight map", fontsize=10)
            m_title = "mask (GT outline in cyan)\n" + m_title
        ax_m.set_title(m_title, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, out_png, dpi)


# --------------------------------------------------------------------------- slides


def slide_thumbnail(
    thumb_rgb: Any,
    heat: Any,
    out_png: str | os.PathLike[str],
    cmap: str = "inferno",
    alpha: float = 0.5,
    title: str | None = None,
    tissue_mask: Any = None,
    dpi: int = 100,
    max_inches: float = 16.0,
    label: str = "weight",
) -> Path:
    """A whole-slide heatmap blended over the slide thumbnail, with a 0..1 colour bar named ``label``.

    Args:
        thumb_rgb: low-resolution slide image.
        heat: heatmap at any resolution (resized by nearest neighbour); NaN = not computed.
        out_png: where to write the PNG (atomically).
        cmap: colormap.
        alpha: heat opacity.
        title: optional title (e.g. slide name and method).
        tissue_mask: optional bool mask; the heat is drawn only on tissue.
        dpi: resolution.
        max_inches: the longer side of the figure is capped at this many inches.

    Returns:
        The written path.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from medwsol.export.overlay import slide_thumbnail
        >>> thumb = np.full((60, 90, 3), 230, np.uint8); heat = np.random.default_rng(0).random((6, 9))
        >>> slide_thumbnail(thumb, heat, os.path.join(tempfile.mkdtemp(), "slide.png"), title="demo").suffix
        '.png'
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    thumb = _to_rgb_uint8(thumb_rgb)
    h, w = thumb.shape[:2]
    max_px = int(max_inches * dpi)
    if max(h, w) > max_px:  # shrink before blending: never colour-map pixels that cannot be shown
        from PIL import Image

        scale = max_px / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX))
        h, w = thumb.shape[:2]
    blended = blend_heatmap(thumb, heat, alpha=alpha, cmap=cmap, mask=tissue_mask)
    img_w, img_h = max(w / dpi, 2.0), max(h / dpi, 2.0 * h / w)
    fig = _new_figure(img_w + 1.1, img_h + (0.5 if title else 0.15), dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(blended, interpolation="nearest")
    _no_ticks(ax)
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap(cmap)), ax=ax, fraction=0.05, pad=0.02)
    cb.set_label(label)
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, out_png, dpi)


# --------------------------------------------------------------------------- curves


def plot_pr_curve(
    precision: Any,
    recall: Any,
    out_png: str | os.PathLike[str],
    label: str | Sequence[str],
    title: str | None = None,
    baseline: float | None = None,
    dpi: int = 100,
) -> Path:
    """Pixel precision-recall curve(s) (recall on x, precision on y).

    Args:
        precision: one curve's precision array, or a list of them (then ``recall`` and
            ``label`` are lists of the same length); NaN points are dropped.
        recall: the matching recall array(s).
        out_png: where to write the PNG (atomically).
        label: legend entry (e.g. ``"CAM  PxAP 61.1"``), or one per curve.
        title: optional title.
        baseline: optional foreground fraction, drawn as the chance level (a map with
            no information has precision equal to it).
        dpi: resolution.

    Returns:
        The written path.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from medwsol.export.overlay import plot_pr_curve
        >>> r = np.linspace(1, 0, 50); p = 1 - 0.5 * r ** 2
        >>> plot_pr_curve(p, r, os.path.join(tempfile.mkdtemp(), "pr.png"), label="toy").exists()
        True
    """
    if isinstance(label, str):
        curves = [(np.asarray(precision, float), np.asarray(recall, float), label)]
    else:
        if not (len(precision) == len(recall) == len(label)):
            raise DataError("plot_pr_curve: give as many precision and recall arrays as labels")
        curves = [(np.asarray(p, float), np.asarray(r, float), lb) for p, r, lb in zip(precision, recall, label)]
    fig = _new_figure(5.0, 4.6, dpi, layout="constrained")
    ax = fig.add_subplot()
    for p, r, lb in curves:
        if p.shape != r.shape:
            raise DataError(f"precision has shape {p.shape} but recall {r.shape}; fix: pass matching arrays")
        ok = np.isfinite(p) & np.isfinite(r)
        order = np.argsort(r[ok], kind="stable")
        ax.plot(r[ok][order], p[ok][order], lw=1.6, label=str(lb))
    if baseline is not None:
        ax.axhline(float(baseline), color="gray", ls="--", lw=1, label=f"chance ({baseline:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    ax.set_title(title or "pixel precision-recall", fontsize=11)
    return _save(fig, out_png, dpi)


_X_COLUMNS = ("epoch", "step", "iteration")
_GROUP_COLUMNS = ("split", "phase", "stage")
_SKIP = ("time", "seconds", "duration", "elapsed", "timestamp", "per_s", "throughput", "its")
_BEST = ("best", "is_best", "improved")
_METRIC_WORDS = ("error", "acc", "pxap", "iou", "dice", "f1", "auc", "ap")


def _panel_of(col: str) -> str | None:
    """Which panel a numeric log column belongs to (None: not drawn)."""
    c = col.lower()
    words = c.replace("-", "_").split("_")
    if c in _BEST or any(s in c for s in _SKIP if len(s) > 3) or "its" in words:
        return None
    if c in ("lr", "learning_rate") or c.startswith("lr_"):
        return "learning rate"
    if words[-1] in ("tau", "threshold"):
        return "threshold"
    if "loss" in c or "total" in words:
        return "loss"
    if c.startswith("train_") and not any(w in words for w in _METRIC_WORDS):
        return "loss"  # the trainer logs each loss term as train_<term>
    return "metrics"


def plot_training_curves(
    log: Any,
    out_png: str | os.PathLike[str],
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Loss and metrics per epoch from a training log (the trainer's ``train_log.csv``).

    Columns are sorted into panels by name: the x axis is ``epoch`` (else ``step``,
    else the row number). Loss panel: names containing ``loss`` or ``total``, and
    ``train_<term>`` columns that are not metrics (the trainer's loss terms).
    Metrics panel: the other numeric columns (``val_error``, ``valpx_pxap``, ...).
    Threshold panel: ``*_tau``/``*_threshold``. Learning-rate panel (log scale):
    ``lr``, ``lr_*``. Timing/throughput columns are skipped. A ``best`` column
    (0/1 per epoch) is drawn as a dotted vertical line at the last best epoch. If
    a text column ``split``/``phase``/``stage`` exists, each of its values is drawn
    as its own series. Empty cells are skipped, so metrics logged every few epochs
    still draw.

    Args:
        log: path of a CSV file, or a pandas DataFrame.
        out_png: where to write the PNG (atomically).
        title: optional figure title.
        dpi: resolution.

    Returns:
        The written path.

    Example:
        >>> import pandas as pd, tempfile, os
        >>> from medwsol.export.overlay import plot_training_curves
        >>> df = pd.DataFrame({"epoch": [1, 2, 3], "train_total": [1.0, 0.7, 0.5], "valpx_pxap": [40, 50, 55]})
        >>> plot_training_curves(df, os.path.join(tempfile.mkdtemp(), "curves.png")).name
        'curves.png'
    """
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    if isinstance(log, pd.DataFrame):
        df = log.copy()
    else:
        path = Path(log)
        if not path.is_file():
            raise DataError(f"training log {path} does not exist; fix: train first or give the run's train_log.csv")
        try:
            df = pd.read_csv(path)
        except pd.errors.EmptyDataError:
            df = pd.DataFrame()
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise DataError("the training log has no rows; fix: plot after at least one epoch")
    x_col = next((c for c in _X_COLUMNS if c in df.columns), None)
    group_col = next((c for c in _GROUP_COLUMNS if c in df.columns and not pd.api.types.is_numeric_dtype(df[c])), None)
    order = ("loss", "metrics", "threshold", "learning rate")
    by_panel: dict[str, list[str]] = {name: [] for name in order}
    for c in df.columns:
        if c in (x_col, group_col, *_X_COLUMNS) or not pd.api.types.is_numeric_dtype(df[c]):
            continue
        panel = _panel_of(c)
        if panel is not None:
            by_panel[panel].append(c)
    panels = [(name, by_panel[name]) for name in order if by_panel[name]]
    if not panels:
        raise DataError(f"the training log has no numeric column to plot (columns: {list(df.columns)})")
    best_x = None
    best_col = next((c for c in df.columns if c.lower() in _BEST), None)
    if best_col is not None and x_col is not None:
        hits = df.loc[pd.to_numeric(df[best_col], errors="coerce") > 0, x_col]
        best_x = hits.iloc[-1] if len(hits) else None

    groups = [(None, df)] if group_col is None else list(df.groupby(group_col, sort=False))
    fig = _new_figure(4.6 * len(panels), 3.8, dpi, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, cols) in zip(axes, panels):
        for col in cols:
            for gname, g in groups:
                series = g[[col] + ([x_col] if x_col else [])].dropna(subset=[col])
                if series.empty:
                    continue
                xs = series[x_col].to_numpy() if x_col else series.index.to_numpy()
                lab = col if gname is None else f"{col} ({gname})"
                ax.plot(xs, series[col].to_numpy(), marker="o", ms=3, lw=1.4, label=lab)
        if best_x is not None:
            ax.axvline(best_x, color="gray", ls=":", lw=1.2, label=f"best ({x_col} {best_x})")
        if panel == "learning rate":
            ax.set_yscale("log")
        ax.set_title(panel, fontsize=11)
        ax.set_xlabel(x_col or "row")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, out_png, dpi)
