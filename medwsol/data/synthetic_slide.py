"""Synthetic H&E-like whole slides: a pyramidal tiled TIFF that OpenSlide opens, plus ground truth.

The slide is written tile by tile (the full level-0 image is never held in memory): a 50k x 50k
slide needs well under 1 GB of RAM (``benchmarks/synthetic_slide_rss.py``).

Layout of the TIFF (what OpenSlide's *generic-tiff* reader needs):

* one **top-level page per pyramid level** (no SubIFDs: OpenSlide ignores SubIFD pyramids),
  downsample 1, 4, 16, ... until the level is smaller than ~1k px, at least 3 levels;
* 256 x 256 JPEG tiles (RGB stored as YCbCr 4:2:0, the TIFF norm; OpenSlide decodes it back to RGB);
* ``ResolutionUnit = CENTIMETER`` and ``X/YResolution = 1e4 / mpp`` px/cm on level 0,
  so OpenSlide reports ``openslide.mpp-x``/``mpp-y``.

Content: a grey-white glass background with smooth tissue islands. Tissue is stroma (pink, fibrous,
sparse spindle nuclei) with benign glands (pale lumen, columnar epithelium with a ring of basal
nuclei); tumour regions (``tumour=True``) have a distinctly different morphology: crowded, large,
dark, pleomorphic nuclei in purple cytoplasm with small irregular lumens. Every pixel is a
deterministic function of its level-0 ``(x, y)``: two periodic texture atlases (benign, tumour; built
once per slide from the seed at the slide's mpp, so nuclei have a physical size in µm) are looked up
at ``(x mod P, y mod P)``, modulated by a slowly varying stain-intensity field, and composited with
the tissue/tumour polygons rasterised at pixel centres. Lower levels are 4x4 box means of the level
above, i.e. exact downsamples of level 0.

Ground truth (level-0 pixel coordinates, origin top-left):

* ``<stem>.geojson``: QuPath FeatureCollection with one ``annotation`` per tumour polygon,
  classification ``{"name": "Tumor", "color": [200, 0, 0]}`` (empty when ``tumour=False``);
* ``<stem>_tumour_mask_ds<D>.png``: binary mask (0/255) at downsample ``D``, and
  ``<stem>_tumour_mask.json`` with ``downsample``, ``mask_mpp``, slide size and mpp.

Example:
    >>> from medwsol.data.synthetic_slide import make_synthetic_slide
    >>> out = make_synthetic_slide("/tmp/medwsol_doc/slide.tif", width=1024, height=1024, mpp=1.0)
    >>> sorted(k for k in out if k in ("tif", "geojson", "mask_png"))
    ['geojson', 'mask_png', 'tif']
    >>> import openslide
    >>> openslide.OpenSlide(str(out["tif"])).properties["openslide.mpp-x"]
    '1'
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from medwsol.data.geometry import polygons as _polygons
from medwsol.data.geometry import rasterize_geometry
from medwsol.errors import DataError
from medwsol.io import atomic_path, write_json

__all__ = [
    "make_synthetic_slide",
    "pyramid_dims",
    "TUMOUR_CLASS",
    "TUMOUR_COLOUR",
]

TUMOUR_CLASS = "Tumor"
TUMOUR_COLOUR = (200, 0, 0)
BACKGROUND = np.array([243, 243, 241], np.float32)  # glass

# Stain optical-density vectors (per unit concentration); RGB = 255 * exp(-(H*h + E*e)).
_H_VEC = np.array([0.65, 0.70, 0.29], np.float32)
_E_VEC = np.array([0.17, 0.89, 0.41], np.float32)


# ----------------------------------------------------------------------------------------- geometry


def pyramid_dims(width: int, height: int, factor: int = 4, min_levels: int = 3, small: int = 1024) -> list[tuple[int, int]]:
    """Level sizes ``(w, h)``: downsample ``factor**k`` (ceil), until the longer side is below ``small``.

    Example:
        >>> pyramid_dims(8192, 6144)
        [(8192, 6144), (2048, 1536), (512, 384)]
    """
    dims = [(int(width), int(height))]
    while len(dims) < min_levels or max(dims[-1]) >= small:
        w, h = dims[-1]
        if max(w, h) <= 1:
            break
        dims.append((-(-w // factor), -(-h // factor)))
    return dims


def _blob(cx: float, cy: float, r: float, rng: np.random.Generator, amp: float, n_pts: int = 192) -> Polygon:
    """Smooth star-shaped blob: radius r * (1 + sum_k a_k cos(k theta + phi_k)), k = 2..6."""
    theta = np.linspace(0, 2 * np.pi, n_pts, endpoint=False)
    rad = np.ones_like(theta)
    for k in range(2, 7):
        rad += amp / k * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rad = r * np.clip(rad, 0.35, None)
    return Polygon(np.stack([cx + rad * np.cos(theta), cy + rad * np.sin(theta)], 1))


def _layout(width: int, height: int, seed: int, tumour: bool) -> tuple[BaseGeometry, BaseGeometry]:
    """Tissue islands and tumour regions (level-0 px). The tissue does not depend on ``tumour``."""
    rng = np.random.default_rng([seed, 11])
    side = min(width, height)
    n_islands = int(rng.integers(2, 5))
    placed: list[tuple[float, float, float]] = []
    for _ in range(200):
        if len(placed) == n_islands:
            break
        r = rng.uniform(0.2, 0.32) * side
        m = 1.3 * r + 0.02 * side
        if 2 * m >= width or 2 * m >= height:
            r = 0.3 * side
            m = 1.3 * r
        cx, cy = rng.uniform(m, width - m), rng.uniform(m, height - m)
        if all(math.hypot(cx - px, cy - py) > 0.85 * (r + pr) for px, py, pr in placed):
            placed.append((cx, cy, r))
    islands = [_blob(cx, cy, r, rng, amp=0.35) for cx, cy, r in placed]
    inner = box(0.01 * width, 0.01 * height, 0.99 * width, 0.99 * height)
    tissue = shapely.make_valid(shapely.unary_union(islands)).buffer(0).intersection(inner)
    if not tumour:
        return tissue, Polygon()
    # 1-3 irregular tumour blobs inside islands; more (up to 5) until tumour covers >= 15 % of the tissue
    trng = np.random.default_rng([seed, 23])
    n_tumour = int(trng.integers(1, 4))
    blobs: list[Polygon] = []
    tum: BaseGeometry = Polygon()
    for k in range(5):
        if k >= n_tumour and tum.area >= 0.15 * tissue.area:
            break
        cx, cy, r = placed[0] if k == 0 else placed[int(trng.integers(len(placed)))]
        ang, dist = trng.uniform(0, 2 * np.pi), trng.uniform(0, 0.45) * r
        blobs.append(_blob(cx + dist * np.cos(ang), cy + dist * np.sin(ang), trng.uniform(0.4, 0.65) * r, trng, amp=0.6))
        tum = shapely.make_valid(shapely.unary_union(blobs).intersection(tissue)).buffer(0)
    tum = MultiPolygon([p for p in _polygons(tum) if p.area > 0.002 * side * side])
    return tissue, tum


# ---------------------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float, sigma_y: float | None = None, angle: float = 0.0) -> np.ndarray:
    """Periodic Gaussian-filtered white noise (FFT), zero mean, unit std; optionally anisotropic."""
    import scipy.fft

    white = rng.standard_normal((n, n), dtype=np.float32)
    fy = np.fft.fftfreq(n).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(n).astype(np.float32)[None, :]
    sy = sigma if sigma_y is None else sigma_y
    u = fx * math.cos(angle) + fy * math.sin(angle)
    v = -fx * math.sin(angle) + fy * math.cos(angle)
    transfer = np.exp(-2 * np.pi**2 * (sigma**2 * u**2 + sy**2 * v**2)).astype(np.float32)
    out = scipy.fft.irfft2(scipy.fft.rfft2(white) * transfer, s=(n, n))
    return ((out - out.mean()) / (out.std() + 1e-8)).astype(np.float32)


def _cells(n: int, cell_px: float) -> tuple[int, float]:
    k = max(1, round(n / cell_px))
    return k, n / k


def _nuclei(
    rng: np.random.Generator,
    n: int,
    cell_px: float,
    prob: float,
    r_px: tuple[float, float],
    aspect: tuple[float, float],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Elliptical nuclei, one per occupied jittered-grid cell, stamped on a periodic n x n canvas.

    Returns coverage in [0, 1] (1 inside, soft rim), zeroed where ``mask`` is 0.
    """
    k, cs = _cells(n, cell_px)
    present = rng.random((k, k)) < prob
    ox, oy = rng.random((k, k)), rng.random((k, k))
    rad = rng.uniform(*r_px, (k, k))
    asp = rng.uniform(*aspect, (k, k))
    ang = rng.uniform(0, np.pi, (k, k))
    iy, ix = np.nonzero(present)
    cx = (ix + ox[iy, ix]) * cs
    cy = (iy + oy[iy, ix]) * cs
    r, a, t = rad[iy, ix], asp[iy, ix], ang[iy, ix]
    half = int(math.ceil(r_px[1])) + 1
    off = np.arange(-half, half + 1)
    out = np.zeros(n * n, np.float32)
    for c0 in range(0, len(cx), 4096):  # bounded temporaries
        sl = slice(c0, c0 + 4096)
        px = np.floor(cx[sl])[:, None, None] + off[None, None, :]
        py = np.floor(cy[sl])[:, None, None] + off[None, :, None]
        dx, dy = px + 0.5 - cx[sl, None, None], py + 0.5 - cy[sl, None, None]
        ca, sa = np.cos(t[sl])[:, None, None], np.sin(t[sl])[:, None, None]
        u = (dx * ca + dy * sa) / r[sl, None, None]
        v = (-dx * sa + dy * ca) / (r[sl, None, None] * a[sl, None, None])
        q = np.clip((1.0 - (u * u + v * v)) * 4.0, 0.0, 1.0).astype(np.float32)
        flat = (py.astype(np.int64) % n) * n + (px.astype(np.int64) % n)
        keep = q > 0
        np.maximum.at(out, flat[keep], q[keep])
    out = out.reshape(n, n)
    if mask is not None:
        out *= mask
    return out


def _glands(
    rng: np.random.Generator,
    n: int,
    cell_px: float,
    prob: float,
    r_px: tuple[float, float],
    lumen: float,
    irregular: float,
    nucleus_px: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One gland per occupied jittered cell (it fits in its cell): lumen, epithelium and epithelial-nuclei maps.

    Epithelial nuclei sit on a ring near the basement membrane, elongated radially (columnar cells).
    """
    k, cs = _cells(n, cell_px)
    present = rng.random((k, k)) < prob
    rad = np.minimum(rng.uniform(*r_px, (k, k)), 0.42 * cs / (1 + irregular))
    asp = rng.uniform(0.65, 1.0, (k, k))
    ang = rng.uniform(0, np.pi, (k, k))
    ox = rng.uniform(0, 1, (k, k)) * (cs - 2 * rad * (1 + irregular)) + rad * (1 + irregular)
    oy = rng.uniform(0, 1, (k, k)) * (cs - 2 * rad * (1 + irregular)) + rad * (1 + irregular)
    harm = rng.uniform(0, 2 * np.pi, (k, k, 3))
    rho_n = 0.5 * (lumen + 1.0) + 0.1 * (1 - lumen)
    lum = np.zeros((n, n), np.float32)
    epi = np.zeros((n, n), np.float32)
    nuc = np.zeros((n, n), np.float32)
    for gy, gx in zip(*np.nonzero(present)):
        cx, cy, R0 = gx * cs + ox[gy, gx], gy * cs + oy[gy, gx], rad[gy, gx]
        ext = R0 * (1 + irregular) + 1
        xs = np.arange(int(cx - ext), int(cx + ext) + 1)
        ys = np.arange(int(cy - ext), int(cy + ext) + 1)
        ddx, ddy = xs[None, :] + 0.5 - cx, ys[:, None] + 0.5 - cy
        ca, sa = math.cos(ang[gy, gx]), math.sin(ang[gy, gx])
        u = ddx * ca + ddy * sa
        v = (-ddx * sa + ddy * ca) / asp[gy, gx]
        theta = np.arctan2(v, u)
        h = harm[gy, gx]
        R = R0 * (1.0 + irregular * (0.5 * np.sin(3 * theta + h[0]) + 0.3 * np.sin(5 * theta + h[1]) + 0.2 * np.sin(2 * theta + h[2])))
        rho = np.sqrt(u * u + v * v) / R
        e = (rho >= lumen) & (rho < 1.0)
        m = max(6, round(2 * np.pi * rho_n * R0 / (2.6 * nucleus_px)))
        step = 2 * np.pi / m
        along = (theta - np.round(theta / step) * step) * rho_n * R
        radial = (rho - rho_n) * R
        q = (along / (0.9 * nucleus_px)) ** 2 + (radial / (1.6 * nucleus_px)) ** 2
        win = np.ix_(ys % n, xs % n)
        lum[win] = np.maximum(lum[win], rho < lumen)
        epi[win] = np.maximum(epi[win], e)
        nuc[win] = np.maximum(nuc[win], np.clip((1.0 - q) * 4.0, 0.0, 1.0) * e)
    return lum, epi, nuc


def _od_to_rgb(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    out = np.empty((*h.shape, 3), np.uint8)
    for r0 in range(0, h.shape[0], 256):  # bounded temporaries
        od = h[r0 : r0 + 256, :, None] * _H_VEC + e[r0 : r0 + 256, :, None] * _E_VEC
        out[r0 : r0 + 256] = np.clip(255.0 * np.exp(-od) + 0.5, 0, 255)
    return out


def _atlases(mpp: float, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Benign and tumour texture atlases, periodic n x n uint8 RGB, at ``mpp`` µm/px."""
    um = 1.0 / mpp  # px per µm
    rng = np.random.default_rng([seed, 37])
    # --- benign: fibrous stroma + sparse spindle nuclei + glands
    fib = _smooth_noise(rng, n, 14 * um, 2.0 * um, angle=rng.uniform(0, np.pi))
    fine = _smooth_noise(rng, n, 1.2 * um)
    coarse = _smooth_noise(rng, n, 40 * um)
    e = 0.50 + 0.12 * np.tanh(fib) + 0.05 * coarse + 0.03 * fine
    e = np.where(fib < -1.3, 0.12, e)  # loose clefts
    h = 0.10 + 0.02 * coarse
    lum, epi, gnuc = _glands(rng, n, 150 * um, 0.6, (42 * um, 62 * um), lumen=0.55, irregular=0.08, nucleus_px=3.0 * um)
    stroma_nuc = _nuclei(rng, n, 20 * um, 0.35, (2.0 * um, 3.2 * um), (0.3, 0.55), mask=1.0 - np.maximum(lum, epi))
    e = np.where(lum > 0, 0.05 + 0.02 * fine, e)
    h = np.where(lum > 0, 0.02, h)
    e = np.where(epi > 0, 0.38 + 0.04 * fine, e)
    h = np.where(epi > 0, 0.22 + 0.03 * fine, h)
    chrom = 0.8 + 0.2 * np.tanh(fine)
    nuc = np.maximum(stroma_nuc, gnuc)
    h = h + nuc * 1.25 * chrom
    e = e * (1 - 0.5 * nuc)
    benign = _od_to_rgb(h, e)
    del fib, fine, coarse, e, h, lum, epi, gnuc, stroma_nuc, chrom, nuc
    # --- tumour: crowded, large, dark pleomorphic nuclei; purple cytoplasm; small irregular lumens
    rng = np.random.default_rng([seed, 41])
    fine = _smooth_noise(rng, n, 1.0 * um)
    coarse = _smooth_noise(rng, n, 30 * um)
    e = 0.42 + 0.05 * coarse + 0.03 * fine
    h = 0.40 + 0.06 * coarse + 0.03 * fine
    lum, _, _ = _glands(rng, n, 70 * um, 0.55, (12 * um, 26 * um), lumen=1.0, irregular=0.35, nucleus_px=3.0 * um)
    nuc = _nuclei(rng, n, 9.5 * um, 0.9, (3.2 * um, 4.8 * um), (0.55, 1.0), mask=1.0 - lum)
    e = np.where(lum > 0, 0.08 + 0.03 * fine, e)
    h = np.where(lum > 0, 0.06, h)
    chrom = 0.75 + 0.25 * np.tanh(1.5 * fine)
    h = h + nuc * 1.9 * chrom
    e = e * (1 - 0.6 * nuc)
    tumour = _od_to_rgb(h, e)
    return benign, tumour


# ----------------------------------------------------------------------------------------- writer


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    import imagecodecs

    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))


def _down4(a: np.ndarray) -> np.ndarray:
    rows = a[0::4].astype(np.uint16) + a[1::4] + a[2::4] + a[3::4]
    s = rows[:, 0::4] + rows[:, 1::4] + rows[:, 2::4] + rows[:, 3::4]
    return ((s + 8) >> 4).astype(np.uint8)


class _TileSource:
    """Level-0 tile content as a deterministic function of level-0 coordinates."""

    def __init__(self, width: int, height: int, mpp: float, seed: int, tissue: BaseGeometry, tum: BaseGeometry, tile: int):
        self.width, self.height, self.tile = width, height, tile
        n = 1024 if max(width, height) <= 4096 else 2048
        n = max(n, tile)
        benign, tumour = _atlases(mpp, seed, n)
        # pad by one tile (wrapped) so any tile window is a plain slice
        self.n = n
        self.benign = np.pad(benign, ((0, tile), (0, tile), (0, 0)), mode="wrap")
        self.tumour = np.pad(tumour, ((0, tile), (0, tile), (0, 0)), mode="wrap")
        self.tissue = tissue
        self.tum = tum
        shapely.prepare(tissue)
        if not tum.is_empty:
            shapely.prepare(tum)
        # stain-intensity field: bilinear on a coarse random lattice (spacing ~1.5 mm)
        rng = np.random.default_rng([seed, 53])
        self.spacing = max(2.0 * tile, 1500.0 / mpp)
        ly, lx = int(height / self.spacing) + 3, int(width / self.spacing) + 3
        self.lattice = rng.uniform(0.82, 1.12, (ly, lx)).astype(np.float32)

    def _interp_weights(self, start: int) -> tuple[int, np.ndarray]:
        g = (start + np.arange(self.tile) + 0.5) / self.spacing
        i0 = int(np.floor(g[0]))
        k = int(np.floor(g[-1])) - i0 + 2
        w = np.zeros((self.tile, k), np.float32)
        idx = np.floor(g).astype(int) - i0
        f = (g - np.floor(g)).astype(np.float32)
        f = f * f * (3 - 2 * f)  # smoothstep: no visible creases
        w[np.arange(self.tile), idx] = 1 - f
        w[np.arange(self.tile), idx + 1] = f
        return i0, w

    def _mask(self, geom: BaseGeometry, b: Polygon, x0: int, y0: int) -> np.ndarray | bool:
        if geom.is_empty or shapely.disjoint(geom, b):
            return False
        if shapely.contains(geom, b):
            return True
        return rasterize_geometry(geom, x0, y0, self.tile, self.tile)

    def tile_at(self, x0: int, y0: int) -> np.ndarray | None:
        """RGB uint8 tile whose top-left is level-0 (x0, y0); None for a background-only tile."""
        t = self.tile
        b = box(x0, y0, x0 + t, y0 + t)
        tis = self._mask(self.tissue, b, x0, y0)
        if tis is False:
            return None
        tum = self._mask(self.tum, b, x0, y0)
        ax, ay = x0 % self.n, y0 % self.n
        a = self.benign[ay : ay + t, ax : ax + t]
        if tum is True:
            a = self.tumour[ay : ay + t, ax : ax + t]
        elif tum is not False:
            a = np.where(tum[..., None], self.tumour[ay : ay + t, ax : ax + t], a)
        iy, wy = self._interp_weights(y0)
        ix, wx = self._interp_weights(x0)
        lat = self.lattice[iy : iy + wy.shape[1], ix : ix + wx.shape[1]]
        f = wy @ lat @ wx.T
        out = 255.0 - (255.0 - a.astype(np.float32)) * f[..., None]
        if tis is not True:
            out = np.where(tis[..., None], out, BACKGROUND)
        if x0 + t > self.width or y0 + t > self.height:  # padding beyond the slide is glass
            out[max(0, self.height - y0) :, :] = BACKGROUND
            out[:, max(0, self.width - x0) :] = BACKGROUND
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class _Pyramid:
    """Streams level-0 tile rows; builds lower levels as 4x4 box means, kept as JPEG bytes."""

    def __init__(self, dims: list[tuple[int, int]], tile: int, quality: int):
        self.dims, self.tile, self.quality = dims, tile, quality
        self.ntx = [-(-w // tile) for w, _ in dims]
        self.nty = [-(-h // tile) for _, h in dims]
        self.encoded: list[list[bytes]] = [[] for _ in dims]
        self.acc = [None] + [np.empty((tile, self.ntx[k] * tile, 3), np.uint8) for k in range(1, len(dims))]
        self.fill = [0] * len(dims)
        self.rows_done = [0] * len(dims)
        for a in self.acc[1:]:
            a[:] = BACKGROUND.astype(np.uint8)
        self._bg_tile = np.broadcast_to(BACKGROUND.astype(np.uint8), (tile, tile, 3))
        self._bg_jpeg = _jpeg(np.ascontiguousarray(self._bg_tile), quality)
        self._bg_small = _down4(np.ascontiguousarray(self._bg_tile))

    def encode(self, tile_rgb: np.ndarray | None) -> bytes:
        return self._bg_jpeg if tile_rgb is None else _jpeg(tile_rgb, self.quality)

    def push_level0_tile(self, col: int, tile_rgb: np.ndarray | None) -> None:
        """Feed one level-0 tile's 4x downsample into level 1's strip."""
        if len(self.dims) < 2:
            return
        t4 = self.tile // 4
        small = self._bg_small if tile_rgb is None else _down4(tile_rgb)
        r = self.fill[1]
        self.acc[1][r : r + t4, col * t4 : (col + 1) * t4] = small

    def end_level0_row(self) -> None:
        self.rows_done[0] += 1
        if len(self.dims) >= 2:
            self._advance(1, self.tile // 4)

    def _advance(self, k: int, rows: int) -> None:
        self.fill[k] += rows
        if self.fill[k] >= self.tile:
            self._emit_row(k)

    def _emit_row(self, k: int) -> None:
        t, t4 = self.tile, self.tile // 4
        a = self.acc[k]
        nxt = k + 1 < len(self.dims)
        r = self.fill[k + 1] if nxt else 0
        for c in range(self.ntx[k]):
            tile_rgb = np.ascontiguousarray(a[:, c * t : (c + 1) * t])
            self.encoded[k].append(_jpeg(tile_rgb, self.quality))
            if nxt:
                self.acc[k + 1][r : r + t4, c * t4 : (c + 1) * t4] = _down4(tile_rgb)
        a[:] = BACKGROUND.astype(np.uint8)
        self.fill[k] = 0
        self.rows_done[k] += 1
        if nxt:
            self._advance(k + 1, t4)

    def finish(self) -> None:
        for k in range(1, len(self.dims)):
            while self.rows_done[k] < self.nty[k]:
                self._emit_row(k)
            if len(self.encoded[k]) != self.ntx[k] * self.nty[k]:  # pragma: no cover - internal invariant
                raise RuntimeError(f"level {k}: {len(self.encoded[k])} tiles, expected {self.ntx[k] * self.nty[k]}")


def _feature(geom: Polygon, rng: np.random.Generator) -> dict[str, Any]:
    geom = shapely.geometry.polygon.orient(geom, sign=1.0)
    coords = [[[round(float(x), 2), round(float(y), 2)] for x, y in ring.coords] for ring in [geom.exterior, *geom.interiors]]
    return {
        "type": "Feature",
        "id": str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4)),
        "geometry": {"type": "Polygon", "coordinates": coords},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": TUMOUR_CLASS, "color": list(TUMOUR_COLOUR)},
            "isLocked": False,
        },
    }


def make_synthetic_slide(
    out_tif: str | os.PathLike[str],
    width: int = 8192,
    height: int = 6144,
    mpp: float = 0.5,
    seed: int = 0,
    tumour: bool = True,
    tile: int = 256,
    quality: int = 85,
    progress: bool = False,
) -> dict[str, Any]:
    """Write a synthetic H&E-like pyramidal TIFF slide and its tumour ground truth.

    Args:
        out_tif: output ``.tif`` path; the GeoJSON, mask PNG and its JSON sidecar go beside it.
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        mpp: microns per level-0 pixel (written to the resolution tags, in centimetre units).
        seed: the same seed gives byte-identical files; the tissue layout does not depend on ``tumour``.
        tumour: add tumour regions (else the GeoJSON is an empty FeatureCollection and the mask empty).
        tile: TIFF tile side (multiple of 16).
        quality: JPEG quality.
        progress: show a rich progress bar over level-0 tile rows.

    Returns:
        dict with ``tif``, ``geojson``, ``mask_png``, ``mask_json`` (Paths), ``tumour`` and ``tissue``
        (shapely geometries in level-0 px), ``width``, ``height``, ``mpp``, ``levels`` (list of
        ``(w, h)``) and ``mask_downsample``.

    Raises:
        DataError: on an invalid size, mpp or tile.

    Example:
        >>> out = make_synthetic_slide("/tmp/medwsol_doc/s.tif", width=1024, height=768, mpp=1.0, seed=1)
        >>> out["levels"]
        [(1024, 768), (256, 192), (64, 48)]
        >>> out["tumour"].area > 0
        True
    """
    out_tif = Path(out_tif)
    if width < 256 or height < 256:
        raise DataError(f"{out_tif}: synthetic slide size {width}x{height} is too small; fix: use width, height >= 256")
    if tile % 16 or tile < 64:
        raise DataError(f"{out_tif}: tile {tile} must be a multiple of 16 and >= 64; fix: use tile=256")
    if not mpp > 0:
        raise DataError(f"{out_tif}: mpp must be > 0 (got {mpp}); fix: e.g. mpp=0.5")
    import tifffile

    tissue, tum = _layout(width, height, seed, tumour)
    dims = pyramid_dims(width, height)
    src = _TileSource(width, height, mpp, seed, tissue, tum, tile)
    pyr = _Pyramid(dims, tile, quality)
    ntx0, nty0 = pyr.ntx[0], pyr.nty[0]

    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"[bold]{out_tif.name}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                       TimeElapsedColumn(), TimeRemainingColumn())

    def level0() -> Iterator[bytes]:
        task = bar.add_task("rows", total=nty0) if bar else None
        # bookkeeping happens before the last yield: tifffile stops pulling after the last tile
        for r in range(nty0):
            for c in range(ntx0):
                rgb = src.tile_at(c * tile, r * tile)
                pyr.push_level0_tile(c, rgb)
                data = pyr.encode(rgb)
                if c == ntx0 - 1:
                    pyr.end_level0_row()
                    if bar:
                        bar.advance(task)
                    if r == nty0 - 1:
                        pyr.finish()
                yield data

    common = dict(
        dtype=np.uint8, tile=(tile, tile), compression="jpeg", photometric="rgb", subsampling=(2, 2),
        resolutionunit="CENTIMETER", metadata=None,
    )
    bigtiff = width * height * 3 > 2**31
    with atomic_path(out_tif) as tmp:
        if bar:
            bar.start()
        try:
            with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
                for k, (w, h) in enumerate(dims):
                    res = 1e4 / (mpp * (width / w))
                    data = level0() if k == 0 else iter(pyr.encoded[k])
                    tif.write(data, shape=(h, w, 3), resolution=(res, res), subfiletype=0 if k == 0 else 1,
                              software="medwsol synthetic_slide", **common)
                    if k:
                        pyr.encoded[k] = []
        finally:
            if bar:
                bar.stop()

    # ground truth
    stem = out_tif.with_suffix("")
    rng = np.random.default_rng([seed, 97])
    feats = [_feature(p, rng) for p in _polygons(tum)]
    geojson_path = stem.with_name(stem.name + ".geojson")
    with atomic_path(geojson_path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    ds = max(4, 2 ** math.ceil(math.log2(max(1.0, max(width, height) / 2048))))
    mw, mh = -(-width // ds), -(-height // ds)
    mask = rasterize_geometry(tum, 0, 0, mw, mh, scale=ds)
    mask_png = stem.with_name(f"{stem.name}_tumour_mask_ds{ds}.png")
    from PIL import Image

    with atomic_path(mask_png) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    mask_json = write_json(stem.with_name(f"{stem.name}_tumour_mask.json"), {
        "slide": out_tif.name, "mask": mask_png.name, "downsample": ds, "mask_mpp": mpp * ds,
        "width": width, "height": height, "mpp": mpp, "seed": seed, "tumour": bool(tumour),
        "tissue_area_px": float(tissue.area), "tumour_area_px": float(tum.area),
    })
    return {
        "tif": out_tif, "geojson": geojson_path, "mask_png": mask_png, "mask_json": Path(mask_json),
        "tumour": tum, "tissue": tissue, "width": width, "height": height, "mpp": mpp,
        "levels": dims, "mask_downsample": ds,
    }
