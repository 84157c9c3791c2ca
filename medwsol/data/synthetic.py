"""The built-in synthetic H&E-like gland dataset (the embedded default dataset).

Every image is a square field of colon-like tissue: pink, fibrous stroma with
scattered stromal nuclei, and glands that cover 30-50 % of the field. Only the
glands' morphology tells the two classes apart:

* **benign (label 0)**: round or elliptical, regular glands with an even
  epithelium, a clear pale lumen, pale goblet-cell vacuoles and a single row of
  small, uniform basal nuclei;
* **malignant (label 1)**: irregular, fused, budding and crowded glands, often
  cribriform (several small lumens inside one gland), sometimes with necrotic
  debris, lined by enlarged, darker, pleomorphic, stratified nuclei with lost
  polarity and nucleoli.

The stroma is drawn from the rng *before* anything label-dependent and by the
same code for both classes, so its pixel statistics do not depend on the label:
a localization map that merely finds "tissue" learns nothing about the class,
and a map that finds "glands" is not class-discriminative either (both classes
have similar gland area); the class evidence lies inside the glands, which is
what the pixel masks mark (mask 1 = gland = epithelium + lumen).

Colour is rendered in optical-density (OD) space with the Beer-Lambert law:
``RGB = white * exp(-(H * h_vector + E * e_vector))`` from per-pixel haematoxylin
and eosin concentration maps. Each synthetic patient has its own stain matrix
(:func:`sample_patient_stain`: perturbed stain directions and strengths around
Macenko's reference H&E vectors) and each image jitters it a little more; mild
blur and sensor noise finish the image.

Example:
    >>> import numpy as np
    >>> from medwsol.data.synthetic import synth_gland_image
    >>> rgb, mask = synth_gland_image(np.random.default_rng(0), label=1, size=128)
    >>> rgb.shape, rgb.dtype, mask.shape, sorted(np.unique(mask).tolist())
    ((128, 128, 3), dtype('uint8'), (128, 128), [0, 1])
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from medwsol.errors import DataError
from medwsol.io import atomic_dir

__all__ = [
    "REFERENCE_STAIN",
    "MANIFEST_COLUMNS",
    "sample_patient_stain",
    "synth_gland_image",
    "make_synthetic_dataset",
]

#: OD per unit concentration, rows = haematoxylin, eosin (Macenko et al. 2009 reference vectors, RGB order).
REFERENCE_STAIN = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], dtype=np.float64)

#: Columns of the manifest written by :func:`make_synthetic_dataset`.
MANIFEST_COLUMNS = ("image", "mask", "label", "split", "group", "valpx")

# Files and folders make_synthetic_dataset may replace in an existing out_dir (anything else: refuse).
_OWN_ENTRIES = {"images", "masks", "manifest.csv", ".medwsol-synthetic.json"}

# Stain concentrations (arbitrary OD units) of the tissue compartments.
_STROMA_E, _STROMA_H = 0.62, 0.10
_EPI = {0: (0.40, 0.15), 1: (0.46, 0.38)}  # label -> (E, H) of epithelial cytoplasm
_LUMEN_E, _LUMEN_H = 0.05, 0.025


# -- random fields -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _freqs(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequency grids (cycles per pixel) of an ``rfft2`` of a size x size image."""
    fy = np.fft.fftfreq(size)[:, None].astype(np.float32)
    fx = np.fft.rfftfreq(size)[None, :].astype(np.float32)
    return fy, fx


@functools.lru_cache(maxsize=64)
def _gauss_transfer(size: int, sigma: float) -> np.ndarray:
    fy, fx = _freqs(size)
    return np.exp(-2.0 * (math.pi * sigma) ** 2 * (fy**2 + fx**2)).astype(np.float32)


_N_ORIENT = 6
_ORIENT = np.arange(_N_ORIENT) * math.pi / _N_ORIENT


@functools.lru_cache(maxsize=16)
def _fibre_bank(size: int, len_along: float, len_across: float) -> np.ndarray:
    """Oriented anisotropic Gaussian transfer functions ``[n_orient, size, size // 2 + 1]``."""
    fy, fx = _freqs(size)
    bank = []
    for a in _ORIENT:
        # spatial direction (row, col) = (sin a, cos a); project frequencies on it and its normal
        f_along = fy * math.sin(a) + fx * math.cos(a)
        f_across = -fy * math.cos(a) + fx * math.sin(a)
        bank.append(np.exp(-2.0 * math.pi**2 * ((len_along * f_along) ** 2 + (len_across * f_across) ** 2)))
    return np.stack(bank).astype(np.float32)


def _smooth_fields(rng: np.random.Generator, size: int, sigmas: Sequence[float]) -> np.ndarray:
    """Independent Gaussian-filtered white-noise fields (periodic), each scaled to zero mean, unit std.

    Filtering is done in the Fourier domain so large sigmas cost the same as small ones.
    """
    noise = rng.standard_normal((len(sigmas), size, size), dtype=np.float32)
    transfer = np.stack([_gauss_transfer(size, float(s)) for s in sigmas])
    out = sfft.irfft2(sfft.rfft2(noise) * transfer, s=(size, size))
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-12
    return out


def _fibre_texture(
    rng: np.random.Generator, size: int, f: float, swirl: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Wavy collagen-fibre texture (unit std) and its local fibre direction (radians).

    White noise is filtered by a bank of oriented anisotropic Gaussians (long along the
    fibre, thin across it) and the bank is blended per pixel by a direction field that
    wanders with the smooth unit-std field ``swirl``.
    """
    phi = rng.uniform(0, math.pi) + 0.6 * swirl
    spec = sfft.rfft2(rng.standard_normal((size, size), dtype=np.float32))
    tex = sfft.irfft2(spec[None] * _fibre_bank(size, round(5.0 * f, 3), round(0.9 * f, 3)), s=(size, size))
    tex /= tex.std(axis=(1, 2), keepdims=True) + 1e-12
    c2, s2 = np.cos(2 * phi), np.sin(2 * phi)
    out = np.zeros((size, size), dtype=np.float32)
    wsum = np.zeros_like(out)
    for k, a in enumerate(_ORIENT):
        w = np.maximum(c2 * math.cos(2 * a) + s2 * math.sin(2 * a), 0.0) ** 2  # cos^2-like lobe around phi
        out += w * tex[k]
        wsum += w * w
    out /= np.sqrt(wsum) + 1e-6
    out /= out.std() + 1e-12
    return out, phi


# -- stains ------------------------------------------------------------------------------------


def sample_patient_stain(rng: np.random.Generator) -> np.ndarray:
    """Sample one patient's stain matrix around :data:`REFERENCE_STAIN`.

    Args:
        rng: random generator.

    Returns:
        float array ``[2, 3]``: rows are the haematoxylin and eosin OD vectors per unit
        concentration (RGB order); a row's direction is the stain hue and its norm the
        staining strength (0.8-1.2 times the reference).

    Example:
        >>> import numpy as np
        >>> from medwsol.data.synthetic import sample_patient_stain
        >>> sample_patient_stain(np.random.default_rng(0)).shape
        (2, 3)
    """
    rows = []
    for ref, jitter in zip(REFERENCE_STAIN, (0.05, 0.05)):
        v = ref + rng.normal(0.0, jitter, 3)
        v = np.clip(v, 0.05, None)
        v /= np.linalg.norm(v)
        rows.append(v * rng.uniform(0.8, 1.2))
    return np.stack(rows)


def _image_stain(rng: np.random.Generator, stain: np.ndarray | None) -> np.ndarray:
    """The per-image stain matrix: the patient's (or a fresh one) with a small per-image jitter."""
    if stain is None:
        stain = sample_patient_stain(rng)
    stain = np.asarray(stain, dtype=np.float64)
    if stain.shape != (2, 3) or not np.all(np.isfinite(stain)) or np.any(stain < 0):
        raise DataError(
            f"stain: expected a non-negative [2, 3] OD matrix (rows H, E), got shape {stain.shape}; "
            "fix: pass sample_patient_stain(rng) or None"
        )
    v = np.clip(stain + rng.normal(0.0, 0.012, (2, 3)), 1e-3, None)
    return v * rng.uniform(0.95, 1.05, (2, 1))


# -- shapes ------------------------------------------------------------------------------------


class _Blob:
    """A star-shaped blob: ``r(theta) = R * (1 + sum_k a_k cos(k theta + p_k))``, k = 2, 3, ..."""

    __slots__ = ("cy", "cx", "r", "amps", "phases")

    def __init__(self, cy: float, cx: float, r: float, amps: np.ndarray, phases: np.ndarray) -> None:
        self.cy, self.cx, self.r = float(cy), float(cx), float(r)
        # python floats keep float32 grids in float32 (NEP 50)
        self.amps = [float(a) for a in np.ravel(amps)]
        self.phases = [float(p) for p in np.ravel(phases)]

    @classmethod
    def sample(cls, rng: np.random.Generator, cy: float, cx: float, r: float, amp: Sequence[float]) -> "_Blob":
        amps = rng.normal(0.0, 1.0, len(amp)) * np.asarray(amp)
        return cls(cy, cx, r, amps, rng.uniform(0, 2 * math.pi, len(amp)))

    def extent(self) -> float:
        return self.r * (1.0 + sum(abs(a) for a in self.amps)) + 1.0

    def radius_cs(self, c: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``r(theta)`` from ``cos(theta)`` and ``sin(theta)`` (Chebyshev recurrence, no trig calls)."""
        harm = np.zeros(np.broadcast_shapes(c.shape, s.shape), dtype=c.dtype)
        ck, sk = c, s  # cos(k theta), sin(k theta) for k = 1
        for k, (a, p) in enumerate(zip(self.amps, self.phases), start=2):
            ck, sk = ck * c - sk * s, sk * c + ck * s
            harm += a * math.cos(p) * ck - a * math.sin(p) * sk
        return self.r * np.clip(1.0 + harm, 0.35, None)

    def radius(self, theta: np.ndarray) -> np.ndarray:
        return self.radius_cs(np.cos(theta), np.sin(theta))

    def paint_max(self, target: np.ndarray, y0: int, x0: int) -> None:
        """Max-merge this blob's coverage into ``target`` whose pixel ``[0, 0]`` sits at ``(y0, x0)``."""
        e = self.extent()
        ya, yb = max(int(self.cy - e) - y0, 0), min(int(self.cy + e) + 2 - y0, target.shape[0])
        xa, xb = max(int(self.cx - e) - x0, 0), min(int(self.cx + e) + 2 - x0, target.shape[1])
        if ya >= yb or xa >= xb:
            return
        yy = np.arange(y0 + ya, y0 + yb, dtype=np.float32)[:, None]
        xx = np.arange(x0 + xa, x0 + xb, dtype=np.float32)[None, :]
        np.maximum(target[ya:yb, xa:xb], self.coverage(yy, xx), out=target[ya:yb, xa:xb])

    def radial_depth(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """``r(theta) - rho`` at pixel centres ``(yy, xx)``: > 0 inside, about the distance to the contour."""
        dy, dx = yy - self.cy, xx - self.cx
        rho = np.hypot(dy, dx)
        inv = 1.0 / np.maximum(rho, 1e-9)
        return self.radius_cs(dx * inv, dy * inv) - rho

    def coverage(self, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """Anti-aliased inside-ness in [0, 1] at pixel centres ``(yy, xx)`` (broadcastable)."""
        return np.clip(self.radial_depth(yy, xx) + 0.5, 0.0, 1.0)


class _Nuclei:
    """Accumulates ellipse parameters of nuclei (or any small dark/pale ellipse) for one splat."""

    def __init__(self) -> None:
        keys = ("cy", "cx", "a", "b", "ang", "val", "irr", "rim", "nuc")
        self.cols: dict[str, list[np.ndarray]] = {k: [] for k in keys}

    def add(self, cy, cx, a, b, ang, val, irr=0.0, rim=0.0, nuc=0.0) -> None:
        n = np.size(cy)
        for k, v in zip(self.cols, (cy, cx, a, b, ang, val, irr, rim, nuc)):
            self.cols[k].append(np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self.cols.items()}


def _splat(shape: tuple[int, int], nuc: _Nuclei, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render all ellipses; returns (intensity max-map, coverage max-map).

    Each ellipse gets an irregular contour (``irr``), a darker rim (``rim``: vesicular
    chromatin) and an optional nucleolus (``nuc``: its strength). Ellipses are rendered
    in buckets of similar size, each bucket as one vectorised ``[n, P, P]`` block.
    """
    p = {k: v.astype(np.float32) for k, v in nuc.arrays().items()}
    val_map = np.zeros(shape, dtype=np.float32)
    cov_map = np.zeros(shape, dtype=np.float32)
    n_all = p["cy"].size
    if n_all == 0:
        return val_map, cov_map
    extra = rng.uniform(0.0, 1.0, (4, n_all)).astype(np.float32)  # wobble phases and nucleolus offset
    half_all = np.ceil(p["a"] * (1.0 + p["irr"])).astype(int) + 1
    h, w = shape
    for half in np.unique(half_all):
        sel = half_all == half
        q = {k: v[sel][:, None, None] for k, v in p.items()}
        ph2, ph3 = 2 * math.pi * extra[0, sel][:, None, None], 2 * math.pi * extra[1, sel][:, None, None]
        off = np.arange(-half, half + 1, dtype=np.float32)
        iy = np.rint(q["cy"]) + off[None, :, None]  # [n, P, 1]
        ix = np.rint(q["cx"]) + off[None, None, :]  # [n, 1, P]
        dy, dx = iy - q["cy"], ix - q["cx"]
        c, s_ = np.cos(q["ang"]), np.sin(q["ang"])  # long axis a along (row, col) = (sin, cos)
        u = (dx * c + dy * s_) / q["a"]
        v = (-dx * s_ + dy * c) / q["b"]
        rho = np.sqrt(u * u + v * v)
        inv = 1.0 / np.maximum(rho, 1e-9)
        cu, sv = u * inv, v * inv  # cos, sin of the polar angle
        c2, s2 = cu * cu - sv * sv, 2 * cu * sv
        c3, s3 = c2 * cu - s2 * sv, s2 * cu + c2 * sv
        wob = 1.0 + q["irr"] * (
            0.6 * (c2 * np.cos(ph2) - s2 * np.sin(ph2)) + 0.4 * (c3 * np.cos(ph3) - s3 * np.sin(ph3))
        )
        rho = rho / wob
        cov = np.clip((1.0 - rho) * q["b"] + 0.5, 0.0, 1.0)
        inner = 1.0 + q["rim"] * (np.minimum(rho, 1.0) ** 2 - 0.45)
        ou = 0.7 * extra[2, sel][:, None, None] - 0.35
        ov = 0.7 * extra[3, sel][:, None, None] - 0.35
        nucleolus = q["nuc"] * np.exp(-((u - ou) ** 2 + (v - ov) ** 2) * (1.0 / (2 * 0.16**2)))
        val = q["val"] * cov * (inner + nucleolus)
        iy_b, ix_b = np.broadcast_to(iy, cov.shape), np.broadcast_to(ix, cov.shape)
        ok = (iy_b >= 0) & (iy_b < h) & (ix_b >= 0) & (ix_b < w) & (cov > 0)
        flat = iy_b[ok].astype(np.int64) * w + ix_b[ok].astype(np.int64)
        np.maximum.at(val_map.ravel(), flat, val[ok])
        np.maximum.at(cov_map.ravel(), flat, cov[ok])
    return val_map, cov_map


# -- glands ------------------------------------------------------------------------------------


def _sample_radius(rng: np.random.Generator, label: int, f: float) -> float:
    """Nominal radius of a gland (malignant glands are larger)."""
    return f * (rng.uniform(17.0, 27.0) if label == 0 else rng.uniform(20.0, 34.0))


def _sample_outline(rng: np.random.Generator, label: int, cy: float, cx: float, r: float) -> list[_Blob]:
    """The outer contour of one candidate gland as a union of blobs."""
    if label == 0:  # regular ellipse with a faint wobble
        blob = _Blob.sample(rng, cy, cx, r, [0.0, 0.015, 0.012, 0.008])
        blob.amps[0] = float(rng.uniform(0.03, 0.22))  # k = 2: ellipticity
        return [blob]
    blobs = [_Blob.sample(rng, cy, cx, r, [0.16, 0.12, 0.09, 0.07, 0.05, 0.04])]
    for _ in range(rng.integers(0, 4)):  # fused / budding glands
        t = rng.uniform(0, 2 * math.pi)
        d = r * rng.uniform(0.6, 1.0)
        blobs.append(_Blob.sample(rng, cy + d * math.sin(t), cx + d * math.cos(t), r * rng.uniform(0.35, 0.65),
                                  [0.12, 0.08, 0.05]))
    return blobs


def _outline_raster(blobs: list[_Blob], pad: int) -> tuple[int, int, np.ndarray]:
    """Radial depth of a union of blobs on its (unclipped) bounding box; returns (y0, x0, depth).

    ``depth`` is the largest :meth:`_Blob.radial_depth` over the blobs (> 0 inside);
    ``clip(depth + 0.5, 0, 1)`` is the anti-aliased coverage.
    """
    y0 = int(math.floor(min(b.cy - b.extent() for b in blobs))) - pad
    y1 = int(math.ceil(max(b.cy + b.extent() for b in blobs))) + pad
    x0 = int(math.floor(min(b.cx - b.extent() for b in blobs))) - pad
    x1 = int(math.ceil(max(b.cx + b.extent() for b in blobs))) + pad
    yy = np.arange(y0, y1 + 1, dtype=np.float32)[:, None]
    xx = np.arange(x0, x1 + 1, dtype=np.float32)[None, :]
    depth = blobs[0].radial_depth(yy, xx)
    for b in blobs[1:]:
        depth = np.maximum(depth, b.radial_depth(yy, xx))
    return y0, x0, depth


def _clip_box(y0: int, x0: int, h: int, w: int, size: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices (global rows, global cols, local rows, local cols) of a box's overlap with the image."""
    gy0, gx0, gy1, gx1 = max(y0, 0), max(x0, 0), min(y0 + h, size), min(x0 + w, size)
    if gy0 >= gy1 or gx0 >= gx1:
        return None
    return slice(gy0, gy1), slice(gx0, gx1), slice(gy0 - y0, gy1 - y0), slice(gx0 - x0, gx1 - x0)


def _benign_interior(
    rng: np.random.Generator, f: float, blob: _Blob, depth: np.ndarray, nuclei: _Nuclei, mucin: _Nuclei
) -> np.ndarray:
    """Lumen (soft map on the gland's box) plus basal nuclei and goblet vacuoles of a benign gland."""
    t = blob.r * rng.uniform(0.40, 0.50)  # epithelium height
    lumen = np.clip(depth - t + 0.5, 0.0, 1.0)
    # one row of nuclei along the contour, evenly spaced, at the base of the epithelium
    spacing = f * rng.uniform(3.1, 3.6)  # tightly packed columnar cells
    n = max(int(2 * math.pi * blob.r / spacing), 6)
    th = (np.arange(n) + rng.uniform(-0.12, 0.12, n)) * 2 * math.pi / n + rng.uniform(0, 2 * math.pi)
    r_out = blob.radius(th)
    r_n = r_out - t * rng.uniform(0.18, 0.26, n)
    cy, cx = blob.cy + r_n * np.sin(th), blob.cx + r_n * np.cos(th)
    nuclei.add(cy, cx, f * rng.uniform(2.1, 2.6, n), f * rng.uniform(0.95, 1.2, n), th + rng.normal(0, 0.08, n),
               rng.uniform(1.3, 1.5, n) * rng.uniform(0.95, 1.05), irr=0.03)
    # goblet cells: pale mucin vacuoles between nuclei, towards the lumen
    keep = (np.arange(n) % 2 == 0) & (rng.random(n) < 0.8)
    thg = th[keep] + math.pi / n
    r_g = blob.radius(thg) - t * rng.uniform(0.55, 0.65, thg.size)
    mucin.add(blob.cy + r_g * np.sin(thg), blob.cx + r_g * np.cos(thg), 0.3 * t * rng.uniform(0.85, 1.1, thg.size),
              0.7 * spacing * rng.uniform(0.85, 1.1, thg.size), thg, 1.0, irr=0.08)
    return lumen


def _malignant_interior(
    rng: np.random.Generator,
    f: float,
    r: float,
    y0: int,
    x0: int,
    hard: np.ndarray,
    depth: np.ndarray,
    nuclei: _Nuclei,
    fields: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Lumens (cribriform or one irregular lumen), debris, and crowded pleomorphic nuclei.

    Returns the lumen and necrotic-debris soft maps on the gland's box ``hard`` (top-left
    ``(y0, x0)``); ``depth`` is the distance to the contour, ``fields`` two periodic
    unit-std noise fields (wall thickness, debris), ``r`` the gland's nominal radius.
    """
    h, w = hard.shape
    lumen = np.zeros(depth.shape, dtype=np.float32)
    if rng.random() < 0.6:  # cribriform: several punched-out lumens in a solid gland
        n_l = int(rng.integers(3, 9))
        cand = np.flatnonzero(depth.ravel() > f * 8.0)
        centres: list[tuple[float, float, float]] = []
        if cand.size:
            for i in rng.choice(cand, size=min(4 * n_l, cand.size), replace=False):
                if len(centres) >= n_l:
                    break
                ly, lx = divmod(int(i), w)
                lr = min(f * rng.uniform(2.5, 6.5), depth.flat[i] - f * 3.5)
                if lr < 1.5 * f or any(math.hypot(ly - a, lx - b) < lr + c + 2.5 * f for a, b, c in centres):
                    continue
                centres.append((ly, lx, lr))
                _Blob.sample(rng, y0 + ly, x0 + lx, lr, [0.12, 0.08]).paint_max(lumen, y0, x0)
    else:  # one irregular lumen, variable thick stratified epithelium
        t = r * rng.uniform(0.3, 0.45) * (1.0 + 0.35 * _window(fields[0], y0, x0, hard.shape))
        lumen = np.clip(depth - np.maximum(t, 4.0 * f) + 0.5, 0.0, 1.0)
    debris = np.zeros_like(depth)
    if lumen.max() > 0 and rng.random() < 0.4:  # dirty necrosis
        debris = lumen * np.clip(0.5 + _window(fields[1], y0, x0, hard.shape), 0.0, 1.0)
        dots = np.flatnonzero((debris.ravel() > 0.5))
        if dots.size:
            k = rng.choice(dots, size=min(dots.size, max(1, dots.size // int(25 * f * f + 1))), replace=False)
            dy, dx = np.divmod(k, w)
            nuclei.add(y0 + dy, x0 + dx, f * rng.uniform(0.7, 1.1, k.size), f * rng.uniform(0.6, 0.9, k.size),
                       0.0, rng.uniform(1.4, 1.9, k.size))
    # crowded, enlarged, pleomorphic, stratified nuclei over the whole epithelium
    epi = (hard > 0.5) & (lumen < 0.3) & (depth > 1.2 * f)
    area = int(epi.sum())
    n = int(area / (f * f * rng.uniform(13.0, 18.0)))
    if n > 0:
        pos = rng.choice(np.flatnonzero(epi.ravel()), size=n, replace=area < n)
        py, px = np.divmod(pos, w)
        gy, gx = np.gradient(depth)
        polarity = np.arctan2(gy.flat[pos], gx.flat[pos])
        ang = polarity + rng.normal(0.0, 0.7, n)  # polarity partly lost
        a = f * 2.3 * np.exp(rng.normal(0.0, 0.22, n))
        b = a * rng.uniform(0.55, 0.9, n)
        val, irr, rim = rng.uniform(1.35, 1.9, n), rng.uniform(0.04, 0.16, n), rng.uniform(0.0, 0.6, n)
        nucleolus = np.where(rng.random(n) < 0.4, rng.uniform(0.3, 0.6, n), 0.0)
        jy, jx = rng.uniform(-0.5, 0.5, (2, n))
        k = depth.flat[pos] > 0.6 * a  # keep nuclei inside the gland
        nuclei.add(y0 + py[k] + jy[k], x0 + px[k] + jx[k], a[k], b[k], ang[k], val[k], irr=irr[k], rim=rim[k],
                   nuc=nucleolus[k])
    return lumen, debris


def _window(field: np.ndarray, y0: int, x0: int, shape: tuple[int, int]) -> np.ndarray:
    """A window of a periodic field at ``(y0, x0)`` (may reach outside the image: wraps around)."""
    n = field.shape[0]
    return field[np.ix_(np.arange(y0, y0 + shape[0]) % n, np.arange(x0, x0 + shape[1]) % n)]


# -- images ------------------------------------------------------------------------------------


def synth_gland_image(
    rng: np.random.Generator, label: int, size: int, stain: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic H&E field of glands in stroma.

    The stroma (fibres, stromal nuclei, stain jitter) is drawn first and by the same
    code for both labels, so its statistics are label-independent; the glands are then
    placed until they cover a target fraction drawn from U(0.30, 0.46) (same for both
    labels). Lengths are tuned for ``size = 192`` and scale with ``size / 192`` (clipped
    to [0.6, 2]), so larger images show more, larger glands.

    Args:
        rng: random generator; the result is a pure function of its state and the arguments.
        label: 0 = benign (regular glands, basal nuclei), 1 = malignant (irregular,
            cribriform glands, crowded pleomorphic nuclei).
        size: side of the square image, in pixels (>= 32).
        stain: the patient's ``[2, 3]`` stain matrix (rows: H and E OD vectors, see
            :func:`sample_patient_stain`); a small per-image jitter is added. ``None``
            samples a fresh patient stain from ``rng``.

    Returns:
        ``(rgb, mask)``: RGB ``uint8 [size, size, 3]`` and the gland mask ``uint8
        [size, size]`` with 1 = gland (epithelium and lumen), 0 = stroma.

    Raises:
        DataError: for a label other than 0/1, a size below 32 or a malformed stain.

    Example:
        >>> import numpy as np
        >>> from medwsol.data.synthetic import synth_gland_image
        >>> rgb, mask = synth_gland_image(np.random.default_rng(1), label=0, size=96)
        >>> bool(0.1 < mask.mean() < 0.7)
        True
    """
    if label not in (0, 1):
        raise DataError(f"label: synthetic images are 0 (benign) or 1 (malignant), got {label!r}; fix: pass 0 or 1")
    if int(size) != size or size < 32:
        raise DataError(f"size: must be an integer >= 32, got {size!r}; fix: use e.g. 192")
    size = int(size)
    f = float(np.clip(size / 192.0, 0.6, 2.0))

    # ---- label-independent part: stain, stroma, stromal nuclei, noise fields -----------------
    od_stain = _image_stain(rng, stain)
    swirl, low, fine, chrom, epi_tex, wall, necro = _smooth_fields(
        rng, size, [size / 3.0, size / 5.0, 1.2 * f, 0.6, 1.5 * f, 4.0 * f, 2.0 * f]
    )
    fibres, phi = _fibre_texture(rng, size, f, swirl)
    stroma_e = _STROMA_E * (0.78 + 0.2 * np.tanh(fibres) + 0.05 * fine) * (1.0 + 0.10 * low)
    gaps = np.clip((-fibres - 1.5) / 0.5, 0.0, 1.0)  # small clear clefts along the fibres
    stroma_e = stroma_e * (1.0 - 0.75 * gaps)
    stroma_h = _STROMA_H * (1.0 + 0.15 * fine) * (1.0 - 0.6 * gaps)
    n_str = rng.poisson(size * size / (95.0 * f * f))
    sy, sx = rng.uniform(0, size, (2, n_str))
    spindle = rng.random(n_str) < 0.6
    s_a = np.where(spindle, f * rng.uniform(2.6, 3.6, n_str), f * rng.uniform(1.3, 1.7, n_str))
    s_b = np.where(spindle, f * rng.uniform(0.8, 1.1, n_str), s_a * rng.uniform(0.85, 1.0, n_str))
    s_ang = phi[np.clip(sy.astype(int), 0, size - 1), np.clip(sx.astype(int), 0, size - 1)] + rng.normal(0, 0.15, n_str)
    s_val = np.where(spindle, rng.uniform(1.1, 1.5, n_str), rng.uniform(1.6, 2.0, n_str))
    target = rng.uniform(0.30, 0.46)
    white = (rng.uniform(238.0, 252.0) * rng.uniform(0.985, 1.0, 3)).astype(np.float32)  # illumination

    # ---- glands -------------------------------------------------------------------------------
    gland = np.zeros((size, size), dtype=np.float32)  # soft outline coverage
    lumen = np.zeros_like(gland)
    debris = np.zeros_like(gland)
    exclusion = np.zeros((size, size), dtype=bool)  # glands dilated by their (label-dependent) gap
    halo = np.zeros((size, size), dtype=bool)  # glands dilated by a fixed margin: no stromal nuclei there
    circles = np.zeros((0, 3))  # (cy, cx, extent + gap) of accepted blobs, to propose free centres
    nuclei, mucin = _Nuclei(), _Nuclei()
    fg, shrink, area_total = 0.0, 1.0, float(size * size)
    for _ in range(60):
        if fg >= target:
            break
        r = _sample_radius(rng, label, f) * shrink
        gap = f * (rng.uniform(4.0, 9.0) if label == 0 else rng.uniform(1.5, 4.0))
        cand = rng.uniform(-0.3 * r, size + 0.3 * r, (128, 2))
        free = np.min(np.hypot(cand[:, None, 0] - circles[None, :, 0], cand[:, None, 1] - circles[None, :, 1])
                      - circles[None, :, 2], axis=1, initial=np.inf)
        ok = np.flatnonzero(free > 0.8 * r)
        if ok.size == 0:
            shrink = max(0.5, shrink * 0.88)
            continue
        blobs = _sample_outline(rng, label, *cand[ok[0]], r)
        pad = int(math.ceil(gap)) + 2
        y0, x0, rdepth = _outline_raster(blobs, pad)
        cov = np.clip(rdepth + 0.5, 0.0, 1.0)
        box = _clip_box(y0, x0, *cov.shape, size)
        if box is None:
            continue
        gsl_y, gsl_x, lsl_y, lsl_x = box
        hard = cov > 0.5
        vis = hard[lsl_y, lsl_x]
        add = int(vis.sum())
        if add < 0.15 * hard.sum() or add == 0:  # mostly outside the field
            continue
        if np.any(exclusion[gsl_y, gsl_x] & vis):
            continue
        if fg + add / area_total > target + 0.06:
            shrink = max(0.5, shrink * 0.88)
            continue
        # accept: interior, then paste
        if label == 0:  # radial depth is close to the distance to the contour for near-ellipses
            lum, deb = _benign_interior(rng, f, blobs[0], rdepth, nuclei, mucin), None
        else:  # irregular, fused outlines: exact distance to the contour
            depth = ndi.distance_transform_edt(hard).astype(np.float32)
            lum, deb = _malignant_interior(rng, f, r, y0, x0, hard, depth, nuclei, (wall, necro))
        near = rdepth > -gap
        exclusion[gsl_y, gsl_x] |= near[lsl_y, lsl_x]
        halo[gsl_y, gsl_x] |= rdepth[lsl_y, lsl_x] > -2.0 * f
        gland[gsl_y, gsl_x] = np.maximum(gland[gsl_y, gsl_x], cov[lsl_y, lsl_x])
        lumen[gsl_y, gsl_x] = np.maximum(lumen[gsl_y, gsl_x], (lum * cov)[lsl_y, lsl_x])
        if deb is not None:
            debris[gsl_y, gsl_x] = np.maximum(debris[gsl_y, gsl_x], deb[lsl_y, lsl_x])
        fg += add / area_total
        circles = np.concatenate([circles, [[bl.cy, bl.cx, bl.extent() + gap] for bl in blobs]])

    mask = (gland > 0.5).astype(np.uint8)

    # stromal nuclei wherever there is stroma, with the same margin to the glands in both classes
    in_stroma = ~halo[np.clip(sy.astype(int), 0, size - 1), np.clip(sx.astype(int), 0, size - 1)]
    nuclei.add(sy[in_stroma], sx[in_stroma], s_a[in_stroma], s_b[in_stroma], s_ang[in_stroma], s_val[in_stroma],
               irr=0.05)

    # ---- compose concentration maps -----------------------------------------------------------
    epi_e, epi_h = _EPI[label]
    e_map = stroma_e * (1.0 - gland) + gland * epi_e * (1.0 + 0.08 * epi_tex)
    h_map = stroma_h * (1.0 - gland) + gland * epi_h * (1.0 + 0.10 * epi_tex)
    lum_e = _LUMEN_E * (1.0 + 0.6 * np.clip(fine, -1, 2))
    e_map = e_map * (1.0 - lumen) + lumen * lum_e
    h_map = h_map * (1.0 - lumen) + lumen * _LUMEN_H
    e_map = e_map * (1.0 - debris) + debris * 0.55 * (1.0 + 0.2 * fine)
    h_map = h_map * (1.0 - debris) + debris * 0.28
    muc_val, muc_cov = _splat((size, size), mucin, rng)
    e_map = e_map * (1.0 - 0.8 * muc_cov)
    h_map = h_map * (1.0 - muc_cov) + 0.11 * muc_cov
    nuc_val, nuc_cov = _splat((size, size), nuclei, rng)
    nuc_val = nuc_val * (1.0 + 0.12 * chrom)  # chromatin texture
    h_map = np.maximum(h_map, nuc_val)
    e_map = e_map * (1.0 - 0.45 * nuc_cov)

    # ---- Beer-Lambert to RGB, optics blur, sensor noise ---------------------------------------
    conc = np.stack([h_map, e_map]).astype(np.float32)
    conc = ndi.gaussian_filter(conc, (0, 0.6 * f, 0.6 * f))
    od = np.tensordot(conc, od_stain.astype(np.float32), axes=([0], [0]))  # [H, W, 3]
    rgb = white * np.exp(-od)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * 2.2
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mask


# -- dataset -----------------------------------------------------------------------------------


def _partition(rng: np.random.Generator, n: int, lo: int = 2, hi: int = 4) -> list[int]:
    """Split ``n`` images into patients of ``lo..hi`` images (the last may be smaller)."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(lo, hi + 1), n - sum(sizes))))
    return sizes


def _plan(
    n_images: int, n_classes_valpx: list[int], valid_fraction: float, test_fraction: float, seed: int
) -> list[dict]:
    """Rows (label index, split, patient, valpx) of the dataset before names and shuffling."""
    rng = np.random.default_rng([seed, 0])
    counts = [(n_images + 1) // 2, n_images // 2]
    rows: list[dict] = []
    patients: list[tuple[int, str, list[int]]] = []  # (label, split, row indices)
    for label, n_c in enumerate(counts):
        n_test = max(1, round(test_fraction * n_c))
        n_valid = max(1, round(valid_fraction * n_c), n_classes_valpx[label])
        n_train = n_c - n_test - n_valid
        if n_train < 1:
            raise DataError(
                f"n_images: {n_images} images leave no training image of class {label} after "
                f"{n_valid} valid (n_valpx needs {n_classes_valpx[label]}) and {n_test} test images; "
                "fix: raise n_images or lower n_valpx / valid_fraction / test_fraction"
            )
        for split, m in (("train", n_train), ("valid", n_valid), ("test", n_test)):
            for k in _partition(rng, m):
                idx = list(range(len(rows), len(rows) + k))
                rows.extend({"label": label, "split": split, "valpx": 0} for _ in range(k))
                patients.append((label, split, idx))
    # patient ids in a shuffled order, so that ids reveal neither class nor split
    for pid, p in enumerate(rng.permutation(len(patients))):
        for i in patients[p][2]:
            rows[i]["patient"] = pid
    # valpx: round-robin over each class's valid patients, so the pixel-val set spans patients
    for label in (0, 1):
        valid_p = [patients[p][2] for p in rng.permutation(len(patients))
                   if patients[p][0] == label and patients[p][1] == "valid"]
        picked, depth = 0, 0
        while picked < n_classes_valpx[label]:
            for idx in valid_p:
                if depth < len(idx) and picked < n_classes_valpx[label]:
                    rows[idx[depth]]["valpx"] = 1
                    picked += 1
            depth += 1
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that cannot be made, or whose replacement would delete foreign files."""
    ancestor = out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise DataError(f"{out_dir}: {ancestor} is a file, not a folder; fix: choose another output folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir}: exists and is not a folder; fix: choose another output folder")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise DataError(
                f"{out_dir}: holds files that are not a synthetic dataset ({', '.join(foreign[:5])}), and the "
                "folder would be replaced; fix: choose an empty or new output folder"
            )


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    n_images: int = 120,
    size: int = 192,
    seed: int = 0,
    classes: Sequence[str] = ("benign", "malignant"),
    valid_fraction: float = 0.15,
    test_fraction: float = 0.3,
    n_valpx: int = 6,
    progress: bool = True,
) -> Path:
    """Write the synthetic gland dataset: images, masks and a manifest.

    Layout of ``out_dir`` (built in a temporary folder beside it and renamed at the end,
    so a failure leaves nothing; an existing synthetic dataset there is replaced, a folder
    holding anything else is refused)::

        images/synth_0000.png   RGB uint8
        masks/synth_0000.png    uint8 0/255 (255 = gland); loaders binarise with > 0
        manifest.csv            image, mask, label, split, group, valpx

    Manifest columns: ``image``/``mask`` paths relative to the manifest's folder;
    ``label`` the class name (``classes[0]`` benign, ``classes[1]`` malignant);
    ``split`` in {train, valid, test}; ``group`` a synthetic patient id (``synpNNN``)
    whose 1-4 images share the label and a patient-level stain, with every patient in
    one split only; ``valpx`` 1 for the ``n_valpx`` pixel-labelled validation images
    (valid split only, half per class, spread over patients), else 0.

    Each class holds half of the images (the benign one more if ``n_images`` is odd), and
    every split is balanced the same way. Output is byte-identical for the same arguments.

    Args:
        out_dir: output folder.
        n_images: number of images.
        size: square image side in pixels.
        seed: seed of everything (split plan, stains, images).
        classes: the two class names written in ``label``.
        valid_fraction: fraction of each class in the valid split (at least ``n_valpx / 2``).
        test_fraction: fraction of each class in the test split.
        n_valpx: pixel-labelled validation images (0 for none).
        progress: show a rich progress bar.

    Returns:
        The manifest path ``out_dir / "manifest.csv"``.

    Raises:
        DataError: invalid arguments, too few images for the splits, or an ``out_dir``
            that holds other files.

    Example:
        >>> import tempfile, pandas as pd
        >>> from medwsol.data.synthetic import make_synthetic_dataset
        >>> with tempfile.TemporaryDirectory() as d:
        ...     m = make_synthetic_dataset(d + "/syn", n_images=16, size=64, n_valpx=2, progress=False)
        ...     pd.read_csv(m)["split"].value_counts().to_dict()
        {'train': 10, 'test': 4, 'valid': 2}
    """
    import pandas as pd
    from PIL import Image

    out_dir = Path(out_dir)
    classes = tuple(classes)
    if len(classes) != 2 or len(set(classes)) != 2 or not all(isinstance(c, str) and c.strip() for c in classes):
        raise DataError(
            f"classes: the synthetic dataset has exactly two distinct classes (benign, malignant), got {classes!r}; "
            "fix: pass two names, e.g. ('benign', 'malignant')"
        )
    if not (isinstance(n_images, (int, np.integer)) and n_images >= 4):
        raise DataError(f"n_images: must be an integer >= 4, got {n_images!r}; fix: use e.g. 120")
    if not (isinstance(n_valpx, (int, np.integer)) and n_valpx >= 0):
        raise DataError(f"n_valpx: must be an integer >= 0, got {n_valpx!r}; fix: use e.g. 6")
    for name, v in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < float(v) < 1.0:
            raise DataError(f"{name}: must be in (0, 1), got {v!r}; fix: use e.g. 0.15 or 0.3")
    if float(valid_fraction) + float(test_fraction) >= 1.0:
        raise DataError(
            f"valid_fraction + test_fraction: {valid_fraction} + {test_fraction} leaves no training data; "
            "fix: make their sum < 1"
        )
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise DataError(f"size: must be an integer >= 32, got {size!r}; fix: use e.g. 192")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed: must be an integer >= 0, got {seed!r}; fix: use e.g. 0")
    _check_out_dir(out_dir)

    valpx_per_class = [(n_valpx + 1) // 2, n_valpx // 2]
    rows = _plan(int(n_images), valpx_per_class, float(valid_fraction), float(test_fraction), int(seed))
    stains = {}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("synthetic glands"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with atomic_dir(out_dir) as tmp, Progress(*columns, disable=not progress, transient=True) as bar:
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset folder is meant to be shared
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        task = bar.add_task("synthetic", total=len(rows))
        records = []
        for i, row in enumerate(rows):
            pid = row["patient"]
            if pid not in stains:
                stains[pid] = sample_patient_stain(np.random.default_rng([seed, 1, pid]))
            rgb, mask = synth_gland_image(np.random.default_rng([seed, 2, i]), row["label"], int(size), stains[pid])
            name = f"synth_{i:04d}.png"
            Image.fromarray(rgb).save(tmp / "images" / name, compress_level=3)
            Image.fromarray(mask * np.uint8(255)).save(tmp / "masks" / name, compress_level=3)
            records.append({
                "image": f"images/{name}",
                "mask": f"masks/{name}",
                "label": classes[row["label"]],
                "split": row["split"],
                "group": f"synp{pid:03d}",
                "valpx": row["valpx"],
            })
            bar.advance(task)
        pd.DataFrame.from_records(records, columns=list(MANIFEST_COLUMNS)).to_csv(
            tmp / "manifest.csv", index=False, lineterminator="\n"
        )
    return out_dir / "manifest.csv"
