"""Heatmap as a pyramidal tiled TIFF that OpenSlide (and QuPath) open, with the slide's physical extent.

Layout: one top-level page per level (OpenSlide ignores SubIFD pyramids), ``tile`` x ``tile`` tiles,
lossless deflate, level 0 at the heatmap's resolution and each further level a 2x2 mean of the one
above until it fits in one tile. Resolution tags are in centimetres (``1e4 / mpp`` px/cm), so
OpenSlide reports ``openslide.mpp-x`` = the heatmap's µm/px and the image covers the same physical
area as the slide (``W_out * heatmap_mpp`` = slide width in µm, up to one heatmap pixel of padding).

Pixel values: single-channel (``minisblack``) uint8 ``round(p * 255)`` by default — OpenSlide 4
decodes it (as grey RGBA), and QuPath shows it with any lookup table; or, with ``colormap``, the
colour-mapped RGB image (for viewers without LUTs).

Large heatmaps (memory-mapped ``.npy`` or zarr) are written band by band: level 0 is streamed
from the source; only the 2x-downsampled float level 1 (a quarter of the heatmap) is held in memory.

Example:
    >>> import numpy as np
    >>> from medwsol.export.tiff import write_heatmap_tiff
    >>> heat = np.random.default_rng(0).random((300, 500)).astype(np.float32)
    >>> p = write_heatmap_tiff(heat, "/tmp/medwsol_doc/heat.tif", mpp_x=8.0)
    >>> import openslide
    >>> s = openslide.OpenSlide(str(p)); s.dimensions, s.properties["openslide.mpp-x"]
    ((500, 300), '8')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from medwsol.errors import DataError
from medwsol.io import atomic_path

__all__ = ["write_heatmap_tiff", "heatmap_to_uint8"]

_BAND = 1024  # rows of the source read at once


def heatmap_to_uint8(heat: np.ndarray) -> np.ndarray:
    """``round(clip(p, 0, 1) * 255)`` as uint8; NaN becomes 0.

    Example:
        >>> heatmap_to_uint8(np.array([0.0, 0.5, 1.0, np.nan])).tolist()
        [0, 128, 255, 0]
    """
    a = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _down2(a: np.ndarray) -> np.ndarray:
    """2x2 mean (float32); an odd last row/column is averaged with itself (edge replicate)."""
    h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2)), mode="edge")
    return 0.25 * (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2])


def _lut(colormap: str) -> np.ndarray:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise DataError(f"colormap {colormap!r} is not a matplotlib colormap; fix: e.g. inferno, viridis, magma") from None
    return (cmap(np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def write_heatmap_tiff(
    heat: Any,
    out_path: str | os.PathLike[str],
    mpp_x: float,
    mpp_y: float | None = None,
    tile: int = 256,
    colormap: str | None = None,
    min_size: int | None = None,
) -> Path:
    """Write a [0, 1] heatmap as a pyramidal tiled TIFF (atomically).

    Args:
        heat: float ``[H, W]`` in [0, 1] (numpy, memory-mapped npy or zarr array); NaN is written as 0.
        out_path: the ``.tif`` to write.
        mpp_x: µm per heatmap pixel along x (``slide_mpp * level0_per_heatmap_px``).
        mpp_y: along y (default ``mpp_x``).
        tile: TIFF tile side (multiple of 16).
        colormap: None writes grey uint8 ``round(p*255)``; a matplotlib name writes that colour-mapped RGB.
        min_size: stop adding levels when the longer side is at most this (default ``tile``).

    Returns:
        The written path.

    Raises:
        DataError: a heatmap that is not 2-D, a bad mpp or tile size.
    """
    import tifffile

    out_path = Path(out_path)
    shape = tuple(getattr(heat, "shape", ()))
    if len(shape) != 2 or min(shape) < 1:
        raise DataError(f"{out_path}: heatmap must be a 2-D [H, W] array, got shape {shape}; fix: pass heatmap[:, :]")
    mpp_y = mpp_x if mpp_y is None else mpp_y
    if not (mpp_x > 0 and mpp_y > 0):
        raise DataError(f"{out_path}: mpp must be > 0 (got {mpp_x}, {mpp_y}); fix: pass slide_mpp * level0_per_heatmap_px")
    if tile % 16 or tile < 16:
        raise DataError(f"{out_path}: tile {tile} must be a positive multiple of 16; fix: use tile=256")
    min_size = tile if min_size is None else int(min_size)
    H, W = int(shape[0]), int(shape[1])
    lut = _lut(colormap) if colormap else None

    def encode(a_float: np.ndarray) -> np.ndarray:
        u8 = heatmap_to_uint8(a_float)
        return lut[u8] if lut is not None else u8

    # level 0 streamed band by band; level 1 (float) accumulated on the way
    band = max(_BAND // tile, 1) * tile
    level1: list[np.ndarray] = []

    def level0_tiles() -> Iterator[np.ndarray]:
        for r0 in range(0, H, band):
            rows = np.asarray(heat[r0 : min(H, r0 + band), :], dtype=np.float32)
            if H > 1 or W > 1:
                level1.append(_down2(np.nan_to_num(rows, nan=0.0)))
            yield from _tiles(encode(rows), tile)

    levels_shapes = [(H, W)]
    h, w = H, W
    while max(h, w) > min_size:
        h, w = -(-h // 2), -(-w // 2)
        levels_shapes.append((h, w))
    samples = 3 if lut is not None else 1
    photometric = "rgb" if lut is not None else "minisblack"
    common: dict[str, Any] = dict(
        dtype=np.uint8, tile=(tile, tile), compression="zlib", photometric=photometric,
        resolutionunit="CENTIMETER", metadata=None, software="medwsol heatmap",
    )
    bigtiff = H * W * samples > 2**31
    try:
        with atomic_path(out_path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            cur: np.ndarray | None = None
            for k, (h, w) in enumerate(levels_shapes):
                res = (1e4 / (mpp_x * W / w), 1e4 / (mpp_y * H / h))
                shp = (h, w, 3) if samples == 3 else (h, w)
                if k == 0:
                    data: Iterator[np.ndarray] = level0_tiles()
                else:
                    cur = np.concatenate(level1, 0) if k == 1 else _down2(cur)  # type: ignore[arg-type]
                    level1.clear()
                    cur = cur[:h, :w]
                    data = _tiles(encode(cur), tile)
                tif.write(data, shape=shp, resolution=res, subfiletype=0 if k == 0 else 1, **common)
    except OSError as err:
        raise DataError(f"{out_path}: cannot write ({err.strerror or err}); fix: make the folder writable "
                        "or choose another output folder") from None
    return out_path


def _tiles(a: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of ``a`` (2-D or HxWx3), the right/bottom ones zero-padded to full size."""
    h, w = a.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = a[y : y + tile, x : x + tile]
            if t.shape[0] != tile or t.shape[1] != tile:
                pad = [(0, tile - t.shape[0]), (0, tile - t.shape[1])] + [(0, 0)] * (a.ndim - 2)
                t = np.pad(t, pad)
            yield np.ascontiguousarray(t)
