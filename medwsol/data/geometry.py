"""Level-0 geometry helpers shared by tile extraction, slide scoring and the synthetic slides.

Example:
    >>> from shapely.geometry import box
    >>> from medwsol.data.geometry import rasterize_geometry
    >>> int(rasterize_geometry(box(0, 0, 4, 2), 0, 0, 4, 4).sum())
    8
"""

from __future__ import annotations

import numpy as np
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

__all__ = ["rasterize_geometry", "polygons"]


def rasterize_geometry(
    geom: BaseGeometry | None,
    x0: float,
    y0: float,
    width: int,
    height: int,
    scale: float = 1.0,
) -> np.ndarray:
    """Rasterise (Multi)Polygon(s) in level-0 pixels onto a grid; a pixel is inside when its centre is.

    Output pixel ``(i, j)`` covers level-0 ``[x0 + j*scale, x0 + (j+1)*scale) x [y0 + i*scale, ...)``.
    Holes are kept. The geometry is clipped to the grid first, so rasterising a small window of a
    large polygon is cheap.

    Args:
        geom: shapely geometry (Polygon, MultiPolygon or GeometryCollection); None or empty gives zeros.
        x0: level-0 x of the grid's left edge.
        y0: level-0 y of the grid's top edge.
        width: grid width in pixels.
        height: grid height in pixels.
        scale: level-0 pixels per grid pixel (the downsample).

    Returns:
        bool array ``[height, width]``.

    Example:
        >>> from shapely.geometry import box
        >>> rasterize_geometry(box(2, 2, 6, 4), 0, 0, 8, 6).sum()
        np.int64(8)
    """
    out = np.zeros((int(height), int(width)), bool)
    if geom is None or geom.is_empty or width <= 0 or height <= 0:
        return out
    window = box(x0 - scale, y0 - scale, x0 + (width + 1) * scale, y0 + (height + 1) * scale)
    if not geom.intersects(window):
        return out
    if not geom.within(window):
        geom = geom.intersection(window)
    rings = [np.asarray(r.coords, np.float64) for p in polygons(geom) for r in (p.exterior, *p.interiors)]
    rings = [r for r in rings if len(r) >= 4]
    if not rings:
        return out
    # even-odd scanline fill sampled at pixel centres (holes and multi-part shapes included)
    p0 = np.concatenate([r[:-1] for r in rings])
    p1 = np.concatenate([r[1:] for r in rings])
    ex0, ey0 = (p0[:, 0] - x0) / scale, (p0[:, 1] - y0) / scale
    ex1, ey1 = (p1[:, 0] - x0) / scale, (p1[:, 1] - y0) / scale
    keep = ey0 != ey1
    ex0, ey0, ex1, ey1 = ex0[keep], ey0[keep], ex1[keep], ey1[keep]
    lo, hi = np.minimum(ey0, ey1), np.maximum(ey0, ey1)
    toggles = np.zeros((out.shape[0], out.shape[1] + 1), np.int32)
    for e0 in range(0, len(ex0), 2048):  # bounded temporaries: edges x rows
        sl = slice(e0, e0 + 2048)
        r_lo = np.clip(np.ceil(lo[sl] - 0.5), 0, out.shape[0]).astype(np.int64)
        r_hi = np.clip(np.ceil(hi[sl] - 0.5), 0, out.shape[0]).astype(np.int64)  # rows with lo <= yc < hi
        n_rows = r_hi - r_lo
        if n_rows.sum() == 0:
            continue
        edge = np.repeat(np.arange(len(n_rows)), n_rows)
        row = np.arange(n_rows.sum()) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows) + r_lo[edge]
        yc = row + 0.5
        a0, b0, a1, b1 = ex0[sl][edge], ey0[sl][edge], ex1[sl][edge], ey1[sl][edge]
        xc = a0 + (yc - b0) * (a1 - a0) / (b1 - b0)
        col = np.clip(np.ceil(xc - 0.5), 0, out.shape[1]).astype(np.int64)  # first pixel centre right of xc
        np.add.at(toggles, (row, col), 1)
    return (np.cumsum(toggles, axis=1)[:, :-1] & 1).astype(bool)


def polygons(geom: BaseGeometry) -> list[Polygon]:
    """The polygons of a (Multi)Polygon or GeometryCollection, flattened."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in polygons(g)]
    return []
