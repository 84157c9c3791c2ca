"""Whole-slide access at an explicit resolution: open, pixel size, regions, tissue mask, tile grid.

Coordinates: every public function takes and returns **level-0** ``(x, y)`` top-left pixel
coordinates (x = column, y = row, origin top-left, as OpenSlide and QuPath use them) together with
an explicit resolution in µm/px (``mpp``). Sizes ``(w, h)`` are given at the resolution named next
to them. Arrays are indexed ``[row, col]`` = ``[y, x]``.

Slides are read with OpenSlide (MONAI's tifffile backend decodes a whole level per patch; OpenSlide
decodes only the tiles a region touches). Only top-level TIFF pages are pyramid levels for OpenSlide.

Example:
    >>> from medwsol.data.slides import open_slide, slide_mpp, tissue_mask, tile_grid  # doctest: +SKIP
    >>> slide = open_slide("slide.tif")  # doctest: +SKIP
    >>> mpp, source = slide_mpp(slide, fallback_mpp=0.5)  # doctest: +SKIP
    >>> mask, mask_mpp = tissue_mask(slide, mpp=16.0, base_mpp=mpp)  # doctest: +SKIP
    >>> xy = tile_grid(slide.dimensions, mpp, 1.0, 256, 0, mask, mask_mpp, 0.1)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from medwsol.errors import SlideError

__all__ = [
    "open_slide",
    "slide_mpp",
    "slide_name",
    "best_level_for_mpp",
    "read_region_at_mpp",
    "saturation",
    "tissue_mask",
    "tile_grid",
]

#: Relative tolerance when matching a requested downsample to a pyramid level (level sizes are rounded).
LEVEL_TOLERANCE = 0.01
#: Largest region (level pixels) read in one OpenSlide call; bigger reads are done block by block.
MAX_READ_PX = 2048 * 2048
#: Default limit on the pixels (millions) the tissue mask may read: a slide without a pyramid level near
#: the mask's resolution fails at once with a reason instead of decoding its whole level 0 for minutes.
MAX_TISSUE_READ_MPX = 500.0


def slide_name(slide) -> str:
    """The file a slide was opened from (for error messages)."""
    return str(getattr(slide, "_medwsol_path", None) or getattr(slide, "_filename", None) or "<slide>")


def open_slide(path: str | os.PathLike[str]):
    """Open a whole-slide image with OpenSlide and check that its pixels decode.

    Args:
        path: a slide file OpenSlide reads (pyramidal TIFF, SVS, NDPI, MRXS, ...).

    Returns:
        An ``openslide.OpenSlide``.

    Raises:
        SlideError: the file is missing, not a slide, of an unsupported format, or truncated.

    Example:
        >>> from medwsol.data.slides import open_slide
        >>> open_slide("missing.tif")
        Traceback (most recent call last):
        ...
        medwsol.errors.SlideError: missing.tif: slide file not found; fix: check the path
    """
    import openslide

    p = Path(path)
    if not p.exists():
        raise SlideError(f"{p}: slide file not found; fix: check the path")
    if p.is_dir():
        raise SlideError(f"{p}: is a folder, not a slide file; fix: give the slide file itself (e.g. the .mrxs)")
    try:
        slide = openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"{p}: not a whole-slide image OpenSlide can read; fix: convert it to a pyramidal tiled TIFF "
            "(e.g. with vips tiffsave --tile --pyramid)"
        ) from None
    except openslide.OpenSlideError as err:
        raise SlideError(f"{p}: corrupt or truncated slide ({_first_line(err)}); fix: re-copy or re-export the file") from None
    slide._medwsol_path = str(p)
    try:
        # Decode a little of the smallest level (written last by most writers, so truncation shows).
        lvl = slide.level_count - 1
        lw, lh = slide.level_dimensions[lvl]
        ds = slide.level_downsamples[lvl]
        slide.read_region((0, 0), lvl, (min(lw, 512), min(lh, 512)))
        slide.read_region((int((lw - 1) * ds), int((lh - 1) * ds)), lvl, (1, 1))
    except openslide.OpenSlideError as err:
        slide.close()
        raise SlideError(f"{p}: corrupt or truncated slide ({_first_line(err)}); fix: re-copy or re-export the file") from None
    return slide


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def slide_mpp(slide, fallback_mpp: float | None = None) -> tuple[float, str]:
    """The slide's level-0 pixel size in µm/px and where it came from.

    Order: ``openslide.mpp-x`` (vendor metadata, or TIFF resolution tags in centimetres); else
    the objective power (10 / power µm/px, an approximation: warns); else ``fallback_mpp`` (warns);
    else a SlideError.

    Args:
        slide: an open ``openslide.OpenSlide``.
        fallback_mpp: the pixel size to assume when the slide says nothing (``slides.fallback_mpp``).

    Returns:
        ``(mpp, source)`` with source ``"openslide.mpp-x"``, ``"objective-power"`` or ``"fallback"``.

    Example:
        >>> from medwsol.data.slides import open_slide, slide_mpp
        >>> slide_mpp(open_slide("slide.tif"), fallback_mpp=0.5)  # doctest: +SKIP
        (0.5, 'openslide.mpp-x')
    """
    props = slide.properties
    mpp_x = _positive_float(props.get("openslide.mpp-x"))
    if mpp_x is not None:
        mpp_y = _positive_float(props.get("openslide.mpp-y"))
        if mpp_y is not None and abs(mpp_y - mpp_x) > 0.01 * mpp_x:
            warnings.warn(
                f"{slide_name(slide)}: non-square pixels (mpp-x {mpp_x}, mpp-y {mpp_y}); using mpp-x", stacklevel=2
            )
        return mpp_x, "openslide.mpp-x"
    power = _positive_float(props.get("openslide.objective-power"))
    if power is not None:
        mpp = 10.0 / power
        warnings.warn(
            f"{slide_name(slide)}: no pixel size in the metadata; assuming {mpp:g} µm/px from objective power "
            f"{power:g}x (an approximation; set slides.fallback_mpp only if the slide has no objective power)",
            stacklevel=2,
        )
        return mpp, "objective-power"
    if fallback_mpp is not None:
        if not fallback_mpp > 0:
            raise SlideError(f"{slide_name(slide)}: fallback_mpp must be > 0, got {fallback_mpp}; fix: set slides.fallback_mpp")
        warnings.warn(
            f"{slide_name(slide)}: no pixel size and no objective power in the metadata; "
            f"using slides.fallback_mpp = {fallback_mpp:g} µm/px",
            stacklevel=2,
        )
        return float(fallback_mpp), "fallback"
    raise SlideError(
        f"{slide_name(slide)}: no pixel size (no openslide.mpp-x, no objective power) in the slide metadata; "
        "fix: set slides.fallback_mpp to the scanner's µm/px (e.g. 0.25 at 40x, 0.5 at 20x)"
    )


def _positive_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _base_mpp(slide, base_mpp: float | None) -> float:
    return float(base_mpp) if base_mpp is not None else slide_mpp(slide)[0]


def best_level_for_mpp(slide, mpp: float, base_mpp: float | None = None) -> tuple[int, float]:
    """The pyramid level to read for a target resolution.

    Args:
        slide: an open slide.
        mpp: the target resolution (µm/px).
        base_mpp: the slide's level-0 mpp (default: :func:`slide_mpp`).

    Returns:
        ``(level, downsample_within_level)``: the finest level not finer than needed (1 % tolerance for
        rounded level sizes) and the factor still to apply to that level's pixels (< 1 upsamples).
    """
    ds = mpp / _base_mpp(slide, base_mpp)
    level = int(slide.get_best_level_for_downsample(ds * (1 + LEVEL_TOLERANCE)))
    return level, ds / float(slide.level_downsamples[level])


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (transparent outside the slide) onto white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def read_region_at_mpp(
    slide,
    x: int,
    y: int,
    w: int,
    h: int,
    mpp: float,
    base_mpp: float | None = None,
    max_read_px: int = MAX_READ_PX,
    workers: int | None = None,
) -> np.ndarray:
    """Read a region at a target resolution from the best pyramid level, resized to ``(w, h)``.

    Args:
        slide: an open slide.
        x: left edge, level-0 pixels.
        y: top edge, level-0 pixels.
        w: width at ``mpp``.
        h: height at ``mpp``.
        mpp: target resolution (µm/px).
        base_mpp: the slide's level-0 mpp (default: :func:`slide_mpp`).
        max_read_px: larger level reads are done block by block (bounded memory: ``workers`` blocks of at
            most this many level pixels at a time).
        workers: threads reading those blocks side by side (OpenSlide is thread-safe and releases the GIL
            while it decodes); default: the CPUs this process may use, at most 4.

    Returns:
        RGB ``uint8`` array ``[h, w, 3]``; pixels outside the slide are white (padding).
    """
    base = _base_mpp(slide, base_mpp)
    level, within = best_level_for_mpp(slide, mpp, base)
    if round(w * within) * round(h * within) <= max_read_px:
        return _read_once(slide, x, y, w, h, level, within)
    ds0 = mpp / base  # level-0 px per output px
    out = np.empty((h, w, 3), np.uint8)
    side = max(1, int(math.sqrt(max_read_px) / max(within, 1e-9)))
    # blocks of equal size (a 1280-px-wide read is two 640-px blocks, not 1024 + 256), read in parallel
    n_rows, n_cols = math.ceil(h / side), math.ceil(w / side)
    sh, sw = math.ceil(h / n_rows), math.ceil(w / n_cols)
    blocks = [(oy, ox, min(sw, w - ox), min(sh, h - oy)) for oy in range(0, h, sh) for ox in range(0, w, sw)]

    def read(block: tuple[int, int, int, int]) -> None:
        oy, ox, bw, bh = block
        out[oy : oy + bh, ox : ox + bw] = _read_once(
            slide, x + round(ox * ds0), y + round(oy * ds0), bw, bh, level, within
        )

    if not workers:
        from medwsol.engine.runtime import cores

        workers = min(4, cores())
    n = max(1, min(len(blocks), int(workers)))
    if n == 1:
        for b in blocks:
            read(b)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n, thread_name_prefix="medwsol-read") as pool:
            list(pool.map(read, blocks))
    return out


def _read_once(slide, x: int, y: int, w: int, h: int, level: int, within: float) -> np.ndarray:
    from PIL import Image

    lw, lh = max(1, round(w * within)), max(1, round(h * within))
    region = slide.read_region((int(x), int(y)), level, (lw, lh))
    if (lw, lh) != (w, h):
        region = region.resize((w, h), Image.BOX if within > 1 else Image.BILINEAR)
    return _rgba_to_rgb(np.asarray(region))


def saturation(rgb: np.ndarray, rows_per_chunk: int = 1024) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` (0 where max is 0) of uint8 RGB, as float32.

    The same values as ``skimage.color.rgb2hsv(rgb)[..., 1]``, computed without its three float64
    planes (a 100k x 100k slide's mask image is ~10 MPix: 0.5 GB for rgb2hsv, 40 MB here).

    Example:
        >>> import numpy as np
        >>> from medwsol.data.slides import saturation
        >>> saturation(np.array([[[200, 100, 150], [0, 0, 0]]], np.uint8)).tolist()
        [[0.5, 0.0]]
    """
    out = np.empty(rgb.shape[:2], np.float32)
    for r in range(0, rgb.shape[0], rows_per_chunk):
        block = rgb[r : r + rows_per_chunk]
        c0, c1, c2 = block[..., 0], block[..., 1], block[..., 2]
        # elementwise max/min of the three planes: ~20x faster than a reduction over a length-3 axis
        hi = np.maximum(np.maximum(c0, c1), c2)
        lo = np.minimum(np.minimum(c0, c1), c2)
        o = out[r : r + rows_per_chunk]
        np.subtract(hi, lo, out=o, dtype=np.float32, casting="unsafe")  # 0 where hi is 0 (then lo is too)
        np.divide(o, hi, out=o, where=hi > 0)
    return out


def tissue_mask(
    slide,
    mpp: float = 16.0,
    base_mpp: float | None = None,
    min_saturation: float = 0.05,
    max_saturation: float = 0.2,
    min_object_um2: float = 5000.0,
    max_hole_um2: float = 5000.0,
    closing_um: float = 32.0,
    max_read_mpx: float | None = MAX_TISSUE_READ_MPX,
) -> tuple[np.ndarray, float]:
    """Tissue mask from a low-resolution image: Otsu on HSV saturation plus morphological clean-up.

    The saturation (S of HSV) separates stained tissue from white glass, as in CLAM, TIAToolbox and
    MONAI. The Otsu threshold is clipped into ``[min_saturation, max_saturation]``: an all-background
    slide (no second mode) then gives an empty mask, and an all-tissue slide a full one. Clean-up:
    binary closing, small holes filled, small objects removed (skimage).

    Args:
        slide: an open slide.
        mpp: resolution of the mask (µm/px).
        base_mpp: the slide's level-0 mpp (default: :func:`slide_mpp`).
        min_saturation: lowest allowed threshold (JPEG noise on glass stays below it).
        max_saturation: highest allowed threshold (pale tissue stays above it).
        min_object_um2: tissue islands smaller than this (µm², at most a tenth of the slide) are dropped.
        max_hole_um2: holes smaller than this (µm²) are filled.
        closing_um: radius of the closing disk (µm).
        max_read_mpx: refuse to read more than this many million pixels from the pyramid level
            chosen for the mask (None: no limit); a slide with no level near ``mpp`` would otherwise
            be decoded at full resolution.

    Returns:
        ``(mask, mask_mpp)``: bool array ``[rows, cols]`` covering the whole slide and its actual µm/px.

    Raises:
        SlideError: the read would exceed ``max_read_mpx``.

    Example:
        >>> from medwsol.data.slides import open_slide, tissue_mask  # doctest: +SKIP
        >>> mask, mask_mpp = tissue_mask(open_slide("slide.tif"), mpp=16.0)  # doctest: +SKIP
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import closing, disk, remove_small_holes, remove_small_objects

    base = _base_mpp(slide, base_mpp)
    w0, h0 = slide.dimensions
    mw = max(1, round(w0 * base / mpp))
    mh = max(1, round(h0 * base / mpp))
    mask_mpp = w0 * base / mw
    if max_read_mpx is not None:
        level, within = best_level_for_mpp(slide, mask_mpp, base)
        n = round(mw * within) * round(mh * within)
        if n > max_read_mpx * 1e6:
            lw, lh = slide.level_dimensions[level]
            raise SlideError(
                f"{slide_name(slide)}: tissue detection would decode {n / 1e6:,.3g} Mpx from pyramid level {level} "
                f"({lw}x{lh} px; the slide has no level near {mask_mpp:.3g} µm/px), over the {max_read_mpx:g} Mpx "
                "limit; fix: convert it to a pyramidal TIFF (e.g. vips tiffsave SLIDE OUT.tif --tile --pyramid "
                "--compression jpeg) or raise max_tissue_read_mpx"
            )
    rgb = read_region_at_mpp(slide, 0, 0, mw, mh, mask_mpp, base)
    sat = saturation(rgb)
    del rgb
    if float(sat.max()) - float(sat.min()) < 1e-6:
        t = float(sat.max())
    else:
        t = float(threshold_otsu(sat))
    t = min(max(t, min_saturation), max_saturation)
    mask = sat > t
    if not mask.any():
        return mask, mask_mpp
    px_area = mask_mpp * mask_mpp
    radius = int(round(closing_um / mask_mpp))
    if radius >= 1:
        padded = np.pad(mask, radius, mode="constant")
        mask = closing(padded, disk(radius))[radius:-radius, radius:-radius].astype(bool)
    hole = int(max_hole_um2 / px_area)
    if hole >= 1:
        mask = remove_small_holes(mask, max_size=hole)
    obj = min(int(min_object_um2 / px_area), mask.size // 10)  # a tiny slide keeps its tissue
    if obj >= 1:
        mask = remove_small_objects(mask, max_size=obj)
    return mask.astype(bool, copy=False), mask_mpp


def tile_grid(
    slide_dims_level0: tuple[int, int],
    slide_mpp: float,
    target_mpp: float,
    tile_size: int,
    overlap: int,
    tissue_mask: np.ndarray | None,
    mask_mpp: float | None,
    min_tissue: float,
    return_fraction: bool = False,
    rows_per_chunk: int = 256,
):
    """Level-0 top-left ``(x, y)`` of the tiles whose tissue fraction is at least ``min_tissue``.

    The grid is laid out at ``target_mpp``: tiles of ``tile_size`` px every ``tile_size - overlap``
    px, from the top-left corner, until the slide is covered (the last row/column may extend past
    the slide and is padded with white when read; a slide smaller than one tile gets one tile).
    A tile's tissue fraction is the mean of the mask over its footprint (from an integral image,
    rows of tiles processed in chunks so memory stays bounded), over the part of the tile inside
    the slide (edge tiles are judged by what they contain; their padding is white).

    Args:
        slide_dims_level0: ``(width, height)`` of level 0.
        slide_mpp: level-0 µm/px.
        target_mpp: resolution the model sees (µm/px).
        tile_size: tile side at ``target_mpp``.
        overlap: overlap between neighbouring tiles at ``target_mpp`` (< tile_size).
        tissue_mask: bool ``[rows, cols]`` covering the slide, or None (every tile, fraction 1).
        mask_mpp: the mask's µm/px.
        min_tissue: keep tiles with fraction >= this.
        return_fraction: also return each kept tile's tissue fraction.
        rows_per_chunk: grid rows processed at once.

    Returns:
        int64 array ``[N, 2]`` of level-0 ``(x, y)``, sorted by row then column; with
        ``return_fraction`` a tuple ``(xy, fraction float32 [N])``.

    Example:
        >>> import numpy as np
        >>> from medwsol.data.slides import tile_grid
        >>> mask = np.zeros((8, 8), bool); mask[:, :4] = True   # left half is tissue
        >>> tile_grid((1024, 1024), 0.5, 1.0, 128, 0, mask, 64.0, 0.5)[:4].tolist()
        [[0, 0], [256, 0], [0, 256], [256, 256]]
    """
    if overlap < 0 or overlap >= tile_size:
        raise ValueError(f"overlap ({overlap}) must be in [0, tile_size={tile_size})")
    w0, h0 = int(slide_dims_level0[0]), int(slide_dims_level0[1])
    scale = target_mpp / slide_mpp  # level-0 px per target px
    stride = tile_size - overlap
    tile0 = tile_size * scale  # tile side in level-0 px (float)

    def axis(n0: int) -> np.ndarray:
        nt = n0 / scale
        n = max(1, math.ceil((nt - overlap) / stride))
        return np.rint(np.arange(n, dtype=np.float64) * stride * scale).astype(np.int64)

    xs, ys = axis(w0), axis(h0)
    if tissue_mask is None:
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        xy = np.stack([xx.ravel(), yy.ravel()], 1)
        frac = np.ones(len(xy), np.float32)
        return (xy, frac) if return_fraction else xy

    mask = np.asarray(tissue_mask, dtype=bool)
    mh, mw = mask.shape
    s = slide_mpp / float(mask_mpp)  # mask px per level-0 px
    ii = np.zeros((mh + 1, mw + 1), np.int64)
    np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1, out=ii[1:, 1:])

    def bounds(starts: np.ndarray, limit: int):
        a = np.clip(np.rint(starts * s).astype(np.int64), 0, limit - 1)
        b = np.clip(np.maximum(a + 1, np.rint((starts + tile0) * s).astype(np.int64)), a + 1, limit)
        return a, b, (b - a)

    c0, c1, cw = bounds(xs.astype(np.float64), mw)
    keep_xy, keep_f = [], []
    for i in range(0, len(ys), rows_per_chunk):
        ysub = ys[i : i + rows_per_chunk]
        r0, r1, rh = bounds(ysub.astype(np.float64), mh)
        tot = ii[r1][:, c1] - ii[r0][:, c1] - ii[r1][:, c0] + ii[r0][:, c0]
        frac = tot / (rh[:, None] * cw[None, :])
        sel = np.nonzero(frac >= min_tissue)
        if sel[0].size:
            keep_xy.append(np.stack([xs[sel[1]], ysub[sel[0]]], 1))
            keep_f.append(frac[sel].astype(np.float32))
    xy = np.concatenate(keep_xy) if keep_xy else np.zeros((0, 2), np.int64)
    frac = np.concatenate(keep_f) if keep_f else np.zeros(0, np.float32)
    return (xy, frac) if return_fraction else xy
