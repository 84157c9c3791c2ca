"""Whole-slide inference: tissue mask, tile grid at an explicit mpp, batched inference, stitching.

Per-slide output contract (the exporters depend on it)
======================================================

``infer_slide`` writes one folder per slide, ``<out_dir>/<name>/`` (the slide's stem; with a short hash
of its path when two slides share a stem), built in a temporary
folder beside it and renamed into place at the end (a folder that exists is complete)::

    meta.json      what everything below means (keys listed next)
    heatmap.npy    float32 [H_out, W_out] in [0, 1]     (small slides: H_out * W_out <= disk_threshold_px)
    coverage.npy   bool    [H_out, W_out]
      -- or --
    heatmap.zarr   zarr v3 array, float32 [H_out, W_out] (large slides; chunked, zstd)
    coverage.zarr  zarr v3 array, bool    [H_out, W_out]
    tiles.csv      one row per inferred tile

* ``heatmap[r, c]`` is the weighted mean of the tiles' **served scores** over all tiles covering heatmap
  pixel ``(r, c)``, each tile weighted by an importance map over its footprint (``slides.blend``:
  ``feather``, the default, falls linearly to ~0 across the overlap; ``gaussian`` is MONAI's Gaussian
  importance map; ``constant`` a plain average), so a tile's border - where a CNN's map is least
  reliable - hands over to the neighbouring tile's centre. A tile's score is what the
  model package serves (:class:`medwsol.engine.served.ServedModel`): the weight map with the
  package's **fixed** map range (never rescaled per tile), or (``weight_x_prob``) that times the
  tile's probability of the package's positive class. 0 where no tile was inferred (background,
  no tissue). ``coverage[r, c]`` is True where at least one tile was. Inside an inferred tile the
  value is the model's output even over background (not masked).
* Heatmap pixel ``(r, c)`` covers level-0 pixels ``x in [c*k, (c+1)*k)``, ``y in [r*k, (r+1)*k)`` with
  ``k = meta["level0_per_heatmap_px"] = heatmap_mpp / slide_mpp``; ``H_out = ceil(height / k)``,
  ``W_out = ceil(width / k)``. Level-0 ``(x, y)`` of the centre of ``(r, c)``: ``((c + .5) k, (r + .5) k)``.
* Read either format with ``load_heatmap(folder)`` or directly: ``np.load(p, mmap_mode="r")`` /
  ``zarr.open_array(p, mode="r")`` (both slice as ``a[r0:r1, c0:c1]``; ``meta["heatmap"]`` and
  ``meta["coverage"]`` name the files).
* ``tiles.csv`` columns: ``x, y, w, h`` (level-0 px, top-left and size of the tile's footprint),
  ``tissue`` (tissue fraction in [0, 1]), ``mean_weight`` (mean of the tile's weight map, before any
  probability scaling),
  ``prob_<class>`` for each class (softmax of the logits), ``pred`` (class name of the argmax).
* ``meta.json`` keys: ``format`` ("medwsol-slide-heatmap"), ``version`` (2), ``status`` ("ok" or
  "empty"), ``slide`` (absolute path), ``name`` (the output folder's name), ``width``, ``height`` (level 0 px),
  ``slide_mpp``, ``mpp_source`` ("openslide.mpp-x" | "objective-power" | "fallback"),
  ``heatmap``, ``coverage`` (file names), ``heatmap_format`` ("npy" | "zarr"), ``heatmap_shape``
  ([H_out, W_out]), ``heatmap_mpp``, ``level0_per_heatmap_px``, ``tile_size`` (px at
  ``target_mpp``), ``overlap``, ``target_mpp``, ``level0_tile_size`` (float), ``tissue_mpp``,
  ``min_tissue``, ``blend``, ``threshold`` (the package's tau, for binarising the heatmap) and
  ``threshold_source``, ``score``, ``positive_class``, ``classes``, ``model`` (the network's
  ``describe()`` plus the package digest and map range), ``key`` (:func:`slide_key`: the package,
  the slide file's path/size/mtime and the output settings; a re-run skips the slide only when it is
  unchanged), ``summary`` (the slides.csv row), ``created``.
* ``<out_dir>/records/<name>.json``: every slide's slides.csv row (failures included), written as
  soon as the slide is done; ``slides.csv`` is rewritten after each slide and can be rebuilt from
  the records (:func:`rebuild_summary`).

A slide with no tissue is written too (``status: "empty"``): all-zero heatmap, no coverage, a
header-only tiles.csv.

Example:
    >>> from medwsol.config import SlidesConfig
    >>> from medwsol.engine.infer import infer_cohort  # doctest: +SKIP
    >>> from medwsol.engine.served import served_from_package  # doctest: +SKIP
    >>> from medwsol.package import load_package  # doctest: +SKIP
    >>> served = served_from_package(load_package("runs/slides/20260101-000000/package"))  # doctest: +SKIP
    >>> df = infer_cohort(served, [Path("a.tif")], SlidesConfig(fallback_mpp=0.5), Path("out"), "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.inferers.merger import Merger

from medwsol.data.slides import open_slide, read_region_at_mpp, slide_mpp, tile_grid, tissue_mask
from medwsol.engine.runtime import amp_dtype, autocast, select_device
from medwsol.errors import MedwsolError, SlideError
from medwsol.io import atomic_dir, atomic_path, write_json

__all__ = [
    "FORMAT",
    "SUMMARY_COLUMNS",
    "DISK_THRESHOLD_PX",
    "OUTPUT_SETTINGS",
    "SlideTileDataset",
    "TileLoader",
    "BandedZarrMerger",
    "importance_map",
    "infer_slide",
    "infer_cohort",
    "finished_row",
    "failed_row",
    "log_cohort",
    "RESERVED_NAMES",
    "load_heatmap",
    "output_names",
    "slide_key",
    "rebuild_summary",
    "write_summary",
    "slide_error_line",
    "effective_overlap",
    "tile_boxes",
]

FORMAT = "medwsol-slide-heatmap"
SUMMARY_COLUMNS = ["slide", "name", "status", "error", "tiles", "seconds", "tiles_per_s", "max_score", "mean_score",
                   "outputs"]
#: Heatmaps with more pixels than this are merged on disk (zarr) instead of in memory.
DISK_THRESHOLD_PX = 4096 * 4096


# --------------------------------------------------------------------------------------------- data


class SlideTileDataset(torch.utils.data.Dataset):
    """Tiles of one slide at ``target_mpp``, read with OpenSlide; each worker opens the slide once.

    Items are ``(uint8 [T, T, 3] RGB tensor, index)``; the main process converts to float on the
    device (4x less to copy than float32).

    Args:
        slide_path: the slide file.
        xy: int ``[N, 2]`` level-0 top-left ``(x, y)``.
        tile_size: tile side at ``target_mpp``.
        target_mpp: resolution the model sees.
        base_mpp: the slide's level-0 mpp.
    """

    def __init__(self, slide_path: str | Path, xy: np.ndarray, tile_size: int, target_mpp: float, base_mpp: float):
        self.path = str(slide_path)
        self.xy = np.ascontiguousarray(xy, dtype=np.int64)
        self.tile_size = int(tile_size)
        self.target_mpp = float(target_mpp)
        self.base_mpp = float(base_mpp)
        self._slide = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.xy)

    def __getstate__(self) -> dict:  # never send an open slide handle to another process
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None
        return state

    def _open(self):
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.path)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int):
        import openslide

        x, y = (int(v) for v in self.xy[i])
        try:
            rgb = read_region_at_mpp(self._open(), x, y, self.tile_size, self.tile_size, self.target_mpp, self.base_mpp)
        except openslide.OpenSlideError as err:
            text = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise SlideError(
                f"{self.path}: cannot decode the tile at level-0 (x={x}, y={y}) ({text}); "
                "fix: the file is corrupt or truncated, re-copy or re-export it"
            ) from None
        return torch.from_numpy(rgb), i

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide = None


# ------------------------------------------------------------------------------------------- merger


class BandedZarrMerger(Merger):
    """Weighted-average merge of 2-D patches into zarr arrays on disk, holding only a band of rows in memory.

    Each patch may come with a weight map (e.g. MONAI's Gaussian importance map): the output is
    ``sum(w * v) / sum(w)`` over the patches covering a pixel, so tile borders (small ``w``) hand over
    smoothly to the neighbouring tile's centre. Without weights it is a plain average (MONAI
    ``AvgMerger``).

    Patches must arrive in non-decreasing row order (a row-major tile grid does that): rows above
    the current patch's chunk row are final, so they are averaged and written as whole zarr chunks
    (no read-modify-write of compressed chunks, which makes MONAI's ``ZarrAvgMerger`` cost ~10 ms a
    patch). Memory: ``width x (patch height + 2 chunk rows)`` float32 x 2, whatever the height.

    Args:
        merged_shape: ``(..., H, W)`` of the accumulation grid (patches may reach its edge).
        cropped_shape: ``(..., H, W)`` of the output (default: merged_shape).
        store: folder of the output zarr array (float32 averaged values, 0 where uncovered), or None
            to keep the output in memory (a numpy array; small slides).
        coverage_store: folder of a bool zarr array of covered pixels (None: in memory).
        chunks: zarr chunk side (and band granularity).
        device: unused (values are accumulated on the CPU).

    Example:
        >>> import torch, tempfile, os
        >>> from medwsol.engine.infer import BandedZarrMerger
        >>> d = tempfile.mkdtemp()
        >>> m = BandedZarrMerger((1, 1, 6, 6), store=os.path.join(d, "h.zarr"), chunks=2)
        >>> m.aggregate(torch.ones(1, 1, 4, 4), (0, 0)); m.aggregate(torch.zeros(1, 1, 4, 4), (2, 2))
        >>> m.finalize()[:].round(2).tolist()[2]
        [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    """

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        store: str | Path | None = "heatmap.zarr",
        coverage_store: str | Path | None = None,
        chunks: int = 512,
        device: str | None = "cpu",
    ) -> None:
        super().__init__(merged_shape=merged_shape, cropped_shape=cropped_shape, device=device)
        self.height, self.width = (int(v) for v in self.merged_shape[-2:])
        self.out_h, self.out_w = (int(v) for v in self.cropped_shape[-2:])
        self.chunk = int(chunks)
        if store is None:
            self.output = np.zeros((self.out_h, self.out_w), np.float32)
            self.coverage = np.zeros((self.out_h, self.out_w), bool)
        else:
            import zarr

            ch = (min(self.chunk, max(1, self.out_h)), min(self.chunk, max(1, self.out_w)))
            self.output = zarr.create_array(store=str(store), shape=(self.out_h, self.out_w), chunks=ch,
                                            dtype="float32", fill_value=0.0, overwrite=True)
            self.coverage = None
            if coverage_store is not None:
                self.coverage = zarr.create_array(store=str(coverage_store), shape=(self.out_h, self.out_w),
                                                  chunks=ch, dtype="bool", fill_value=False, overwrite=True)
        self._top = 0  # first row held in the band; rows above are written
        self._values = np.zeros((2 * self.chunk, self.width), np.float32)
        self._weights = np.zeros((2 * self.chunk, self.width), np.float32)
        self.max_value = 0.0
        self.sum_value = 0.0
        self.n_covered = 0

    def aggregate(self, values: torch.Tensor, location: Sequence[int], weight: Any = None) -> None:
        """Add one patch ``[1, 1, h, w]`` (or ``[h, w]``) at ``location = (row, col)`` (its top-left).

        Args:
            values: the patch.
            location: its top-left ``(row, col)`` in the merged grid.
            weight: optional ``[h, w]`` weights (> 0) of the patch's pixels; default 1.
        """
        if self.is_finalized:
            raise ValueError("BandedZarrMerger is already finalized; create a new one to aggregate")
        v = values.detach().to("cpu", torch.float32).numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        if v.ndim > 2:
            if int(np.prod(v.shape[:-2])) != 1:
                raise ValueError(f"BandedZarrMerger merges one single-channel patch at a time, got shape {v.shape}")
            v = v.reshape(v.shape[-2:])
        r, c = int(location[-2]), int(location[-1])
        h, w = v.shape
        if r < self._top:
            raise ValueError(
                f"patch at row {r} arrived after rows < {self._top} were written; "
                "aggregate patches in non-decreasing row order"
            )
        r1, c1 = min(r + h, self.height), min(c + w, self.width)
        v = v[: r1 - r, : c1 - c]
        wt = 1.0 if weight is None else np.asarray(weight, np.float32).reshape(h, w)[: r1 - r, : c1 - c]
        new_top = (r // self.chunk) * self.chunk
        if new_top > self._top:
            self._flush(new_top)
        need = r1 - self._top
        if need > self._values.shape[0]:
            rows = self.chunk * math.ceil(need / self.chunk) + self.chunk
            grow = np.zeros((rows - len(self._values), self.width), np.float32)
            self._values = np.concatenate([self._values, grow])
            self._weights = np.concatenate([self._weights, grow])
        self._values[r - self._top : r1 - self._top, c:c1] += v * wt
        self._weights[r - self._top : r1 - self._top, c:c1] += wt

    def _flush(self, upto: int) -> None:
        """Average and write rows ``[top, upto)`` (rows past the band were never touched: 0); shift the band."""
        n = upto - self._top
        nb = min(n, len(self._values))
        vals, wts = self._values[:nb], self._weights[:nb]
        covered = wts > 0
        r0, r1 = self._top, min(self._top + nb, self.out_h)
        if r1 > r0 and covered.any():
            np.divide(vals, wts, out=vals, where=covered)  # in place: uncovered values are 0 already
            out, cov = np.clip(vals[: r1 - r0, : self.out_w], 0, None), covered[: r1 - r0, : self.out_w]
            self.output[r0:r1, :] = out
            if self.coverage is not None:
                self.coverage[r0:r1, :] = cov
            self.max_value = max(self.max_value, float(out.max(initial=0.0)))
            self.sum_value += float(out.sum(dtype=np.float64))
            self.n_covered += int(np.count_nonzero(cov))
        keep = len(self._values) - nb
        if keep > 0:
            self._values[:keep] = self._values[nb:]
            self._weights[:keep] = self._weights[nb:]
        self._values[keep:] = 0
        self._weights[keep:] = 0
        self._top = upto

    def finalize(self):
        """Write the remaining rows; return the output array (``coverage`` holds the bool array)."""
        if not self.is_finalized:
            while self._top < self.out_h:
                self._flush(min(self._top + len(self._values), self.out_h))
            self.is_finalized = True
            self._values = self._weights = None  # release the band
        return self.output

    def get_output(self):
        return self.output

    @property
    def mean_value(self) -> float:
        return self.sum_value / self.n_covered if self.n_covered else 0.0


def _make_merger(folder: Path, merged: tuple[int, int], cropped: tuple[int, int], on_disk: bool) -> BandedZarrMerger:
    if on_disk:
        return BandedZarrMerger((1, 1, *merged), (1, 1, *cropped), store=folder / "heatmap.zarr",
                                coverage_store=folder / "coverage.zarr")
    return BandedZarrMerger((1, 1, *merged), (1, 1, *cropped), store=None, chunks=256)


def _finish_merger(m: BandedZarrMerger, folder: Path) -> str:
    """Finalize; write the in-memory arrays as .npy. Returns the heatmap format ("npy" | "zarr")."""
    out = m.finalize()
    if isinstance(out, np.ndarray):
        for name, arr in (("heatmap.npy", out), ("coverage.npy", m.coverage)):
            with atomic_path(folder / name) as tmp:
                np.save(tmp, arr, allow_pickle=False)
        return "npy"
    return "zarr"


def importance_map(h: int, w: int, blend: str, sigma_scale: float = 0.125, ramp: float = 0.0) -> np.ndarray:
    """Per-pixel weights of a ``h x w`` tile footprint for blending overlapping tiles.

    * ``feather``: 1 in the middle, falling linearly to ~0 over ``ramp`` pixels at each border (ramp =
      the overlap): the weights of two neighbouring tiles cross-fade linearly across their overlap, so
      the stitched map has no step at a tile's edge nor where one tile hands over to the next;
    * ``gaussian``: MONAI's Gaussian importance map (``sigma_scale`` of the tile);
    * ``constant``: ones (a plain average; steps at tile edges).
    """
    if blend == "constant":
        return np.ones((h, w), np.float32)
    if blend == "feather":
        r = max(float(ramp), 1.0)

        def ramp1d(n: int) -> np.ndarray:
            d = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5)
            return np.clip(d / r, 1e-3, 1.0)

        return np.outer(ramp1d(h), ramp1d(w)).astype(np.float32)
    from monai.data.utils import compute_importance_map

    return compute_importance_map((h, w), mode="gaussian", sigma_scale=sigma_scale).numpy().astype(np.float32)


def load_heatmap(folder: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """Open a slide's outputs: ``(heatmap, coverage, meta)``; arrays are memory-mapped npy or zarr.

    Example:
        >>> from medwsol.engine.infer import load_heatmap
        >>> heat, cov, meta = load_heatmap("runs/x/slides/slide1")  # doctest: +SKIP
        >>> heat[0:10, 0:10].shape  # doctest: +SKIP
        (10, 10)
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise SlideError(f"{folder}: no meta.json (not a finished slide output); fix: run the infer stage first")
    meta = json.loads(meta_path.read_text())
    if meta.get("heatmap_format") == "zarr":
        import zarr

        return zarr.open_array(str(folder / meta["heatmap"]), mode="r"), zarr.open_array(
            str(folder / meta["coverage"]), mode="r"
        ), meta
    return np.load(folder / meta["heatmap"], mmap_mode="r"), np.load(folder / meta["coverage"], mmap_mode="r"), meta


# ---------------------------------------------------------------------------------------- inference


def _one_line(err: BaseException) -> str:
    """A one-line message for the summary (worker tracebacks reduced to their last line)."""
    text = str(err).strip()
    if "DataLoader worker" in text and "Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    line = text.splitlines()[0] if text else ""
    if isinstance(err, MedwsolError):
        return line
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:6.1f} tiles/s" if speed else "   ... tiles/s")

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )


def _row(slide: Path, status: str, out: Path | str = "", error: str = "", tiles: int = 0, seconds: float = 0.0,
         max_score: float = float("nan"), mean_score: float = float("nan"), name: str = "") -> dict[str, Any]:
    return {
        "slide": str(slide), "name": name or Path(slide).stem, "status": status, "error": error, "tiles": int(tiles),
        "seconds": round(float(seconds), 3), "tiles_per_s": round(tiles / seconds, 2) if seconds > 0 and tiles else 0.0,
        "max_score": max_score, "mean_score": mean_score, "outputs": str(out),
    }


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else select_device(str(device))


#: SlidesConfig fields that change a slide's outputs (the rest - batch size, workers, paths - do not).
OUTPUT_SETTINGS = ("target_mpp", "tile_size", "overlap", "min_tissue", "tissue_mpp", "output_mpp", "fallback_mpp",
                   "blend", "blend_sigma", "max_tissue_px")


def tile_boxes(xy: np.ndarray, k: float, tile0: float, inset: float = 0.0) -> np.ndarray:
    """Heatmap footprints ``(r0, c0, r1, c1)`` (end exclusive) of tiles at level-0 top-left ``xy``.

    Args:
        xy: int ``[N, 2]`` level-0 ``(x, y)``.
        k: level-0 px per heatmap px.
        tile0: tile side in level-0 px.
        inset: level-0 px taken off every side (half the overlap gives the stitch cells: where one
            tile hands over to the next).
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    c0 = np.floor((xy[:, 0] + inset) / k + 0.5).astype(np.int64)
    r0 = np.floor((xy[:, 1] + inset) / k + 0.5).astype(np.int64)
    c1 = np.maximum(c0 + 1, np.floor((xy[:, 0] + tile0 - inset) / k + 0.5).astype(np.int64))
    r1 = np.maximum(r0 + 1, np.floor((xy[:, 1] + tile0 - inset) / k + 0.5).astype(np.int64))
    return np.stack([r0, c0, r1, c1], 1)


def effective_overlap(cfg) -> int:
    """``slides.overlap``, or a quarter of the tile when it is not set (so tile borders can be blended)."""
    ov = getattr(cfg, "overlap", None)
    return int(cfg.tile_size) // 4 if ov is None else int(ov)


def slide_key(served, slide_path: Path, cfg) -> dict[str, Any]:
    """What a slide's outputs depend on: the package (digest and serving choices), the slide file, the settings.

    A finished slide is skipped on a re-run only when this is equal to the one in its ``meta.json``.
    """
    st = slide_path.stat()
    settings = {k: getattr(cfg, k, None) for k in OUTPUT_SETTINGS}
    settings["overlap"] = effective_overlap(cfg)
    model = {"digest": getattr(served, "digest", None), "score": served.score_mode,
             "positive_class": served.positive_class, "tau": served.tau, "map_range": served.map_range,
             "classes": list(served.classes), "map_class": getattr(served, "map_class", "predicted")}
    if getattr(served, "runtime", "torch") != "torch":  # an ONNX runtime (medwsol.engine.runtimes): its graph
        model.update(runtime=served.runtime, graph_sha256=served.info.get("graph_sha256"))
    key = {
        "model": model,
        "slide": {"path": str(slide_path.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)},
        "settings": settings,
    }
    return json.loads(json.dumps(key, default=str))  # as meta.json holds it (a map range tuple reads back a list)


def output_names(slides: Sequence[str | Path], out_root: str | Path | None = None) -> list[str]:
    """Per-slide output folder names, stable across runs.

    A slide that already has a record in ``<out_root>/records`` keeps its name. Otherwise the name is the
    file stem, made unique with a short hash of the resolved path when another slide of the cohort, or a
    slide recorded earlier, has the same stem (``a/s1.tif`` and ``b/s1.tif`` never share a folder).
    """
    import hashlib
    from collections import Counter

    known: dict[str, str] = {}
    if out_root is not None:
        for f in sorted((Path(out_root) / RECORDS_DIR).glob("*.json")):
            try:
                rec = json.loads(f.read_text())
                known.setdefault(str(Path(rec["slide"]).resolve()), str(rec["name"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    resolved = [str(Path(s).resolve()) for s in slides]
    stems = [Path(s).stem for s in slides]
    taken = Counter(stems)
    for reserved in RESERVED_NAMES:  # <out>/records and <out>/package belong to the cohort, never to a slide
        taken[reserved] += 2
    for path, name in known.items():
        if path not in resolved:
            taken[name] += 1  # a recorded slide of another cohort owns this folder name
    out = []
    for r, st in zip(resolved, stems):
        if r in known:
            out.append(known[r])
        elif taken[st] > 1 or any(n == st and p != r for p, n in known.items()):
            out.append(f"{st}-{hashlib.sha1(r.encode()).hexdigest()[:8]}")
        else:
            out.append(st)
    return out


def finished_row(served, slide_path: str | Path, cfg_slides, out_dir: str | Path, name: str | None = None,
                 key: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``skipped`` row of a slide whose outputs are current (same :func:`slide_key`), else None.

    Always None with ``cfg_slides.overwrite`` or when the slide file is missing (the run reports that).
    """
    slide_path = Path(slide_path)
    out = Path(out_dir) / (name or slide_path.stem)
    if cfg_slides.overwrite or not (out / "meta.json").is_file() or not slide_path.is_file():
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != (key if key is not None else slide_key(served, slide_path, cfg_slides)):
        return None
    s = meta.get("summary", {})
    return _row(slide_path, "skipped", out, tiles=s.get("tiles", 0), seconds=0.0, name=out.name,
                max_score=s.get("max_score", float("nan")), mean_score=s.get("mean_score", float("nan")))


def failed_row(slide_path: str | Path, err: BaseException, name: str | None = None) -> dict[str, Any]:
    """The ``failed`` slides.csv row of a slide, with its one-line error (:func:`slide_error_line`)."""
    return _row(Path(slide_path), "failed", error=slide_error_line(Path(slide_path), err), name=name or "")


def infer_slide(
    served,
    slide_path: str | Path,
    cfg_slides,
    out_dir: str | Path,
    device: str | torch.device,
    progress: bool = True,
    amp: str = "auto",
    disk_threshold_px: int = DISK_THRESHOLD_PX,
    name: str | None = None,
) -> dict[str, Any]:
    """Infer one slide and write ``<out_dir>/<name>/`` (see the module docstring).

    Args:
        served: a :class:`~medwsol.engine.served.ServedModel` (classes, score, tau, calibration, digest).
        slide_path: the slide file.
        cfg_slides: a ``SlidesConfig`` (target_mpp, tile_size, overlap, min_tissue, tissue_mpp,
            output_mpp, blend, batch_size, num_workers, fallback_mpp, overwrite).
        out_dir: root folder of the per-slide folders.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
        progress: show a rich progress bar with tiles/s.
        amp: ``"auto"`` (bf16/fp16 autocast on CUDA, none on CPU), ``"bf16"`` (also on CPU), ``"fp16"``, ``"off"``.
        disk_threshold_px: heatmaps with more pixels are merged into zarr on disk.
        name: output folder name (default: the slide's stem).

    Returns:
        The slides.csv row: slide, name, status ("ok", "empty" or "skipped"), error, tiles, seconds,
        tiles_per_s, max_score, mean_score (over covered heatmap pixels), outputs.

    Raises:
        SlideError: the slide cannot be opened or read, or has no pixel size and no fallback.
    """
    t_start = time.perf_counter()
    cfg = cfg_slides
    slide_path = Path(slide_path)
    name = name or slide_path.stem
    out = Path(out_dir) / name
    classes = list(served.classes)
    if not slide_path.is_file():
        raise SlideError(f"{slide_path}: slide file not found; fix: check the path" if not slide_path.exists()
                         else f"{slide_path}: is a folder, not a slide file; fix: give the slide file itself")
    key = slide_key(served, slide_path, cfg)
    done = finished_row(served, slide_path, cfg, out_dir, name, key=key)
    if done is not None:
        return done
    dev = _as_device(device)
    overlap = effective_overlap(cfg)

    slide = open_slide(slide_path)
    try:
        base_mpp, mpp_source = slide_mpp(slide, cfg.fallback_mpp)
        w0, h0 = (int(v) for v in slide.dimensions)
        mask, mask_mpp = tissue_mask(slide, mpp=cfg.tissue_mpp, base_mpp=base_mpp,
                                     max_read_mpx=getattr(cfg, "max_tissue_read_mpx", None))
    finally:
        slide.close()
    xy, frac = tile_grid((w0, h0), base_mpp, cfg.target_mpp, cfg.tile_size, overlap, mask, mask_mpp,
                         cfg.min_tissue, return_fraction=True)

    # Heatmap geometry; level-0 (x, y) -> heatmap (row, col) happens here only.
    k = cfg.output_mpp / base_mpp  # level-0 px per heatmap px
    tile0 = cfg.tile_size * cfg.target_mpp / base_mpp  # tile side in level-0 px
    out_h, out_w = max(1, math.ceil(h0 / k - 1e-9)), max(1, math.ceil(w0 / k - 1e-9))
    r0, c0, r1, c1 = tile_boxes(xy, k, tile0).T
    merged = (max(out_h, int(r1.max(initial=0))), max(out_w, int(c1.max(initial=0))))

    n = len(xy)
    probs = np.full((n, len(classes)), np.nan, np.float32)
    mean_w = np.full(n, np.nan, np.float32)
    meta: dict[str, Any] = {
        "format": FORMAT, "version": 2, "slide": str(slide_path.resolve()), "name": name,
        "width": w0, "height": h0, "slide_mpp": base_mpp, "mpp_source": mpp_source,
        "heatmap_shape": [out_h, out_w], "heatmap_mpp": float(cfg.output_mpp), "level0_per_heatmap_px": float(k),
        "tile_size": int(cfg.tile_size), "overlap": overlap, "target_mpp": float(cfg.target_mpp),
        "level0_tile_size": float(tile0), "tissue_mpp": float(mask_mpp), "min_tissue": float(cfg.min_tissue),
        "blend": getattr(cfg, "blend", "gaussian"), "blend_sigma": float(getattr(cfg, "blend_sigma", 0.125)),
        "threshold": float(served.tau), "threshold_source": served.tau_source, "classes": classes,
        "score": served.score_mode, "positive_class": served.positive_class,
        "model": served.describe(), "key": key,
    }

    with atomic_dir(out) as tmp:
        sink = _make_merger(tmp, merged, (out_h, out_w), on_disk=out_h * out_w > disk_threshold_px)
        if n == 0:
            warnings.warn(f"{slide_path}: no tissue found (tissue_mpp={cfg.tissue_mpp}, min_tissue={cfg.min_tissue}); "
                          "writing empty outputs", stacklevel=2)
        else:
            _run_model(served, slide_path, xy, base_mpp, cfg, dev, amp, (r0, c0, r1, c1), sink, probs, mean_w,
                       progress)
        fmt = _finish_merger(sink, tmp)
        meta.update(heatmap_format=fmt, heatmap=f"heatmap.{fmt}", coverage=f"coverage.{fmt}")
        tiles = pd.DataFrame({
            "x": xy[:, 0], "y": xy[:, 1], "w": np.full(n, round(tile0), np.int64), "h": np.full(n, round(tile0), np.int64),
            "tissue": np.round(frac, 4), "mean_weight": mean_w,
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(classes)},
            "pred": [classes[i] for i in np.argmax(np.nan_to_num(probs, nan=-1), 1)] if n else [],
        })
        tiles.to_csv(tmp / "tiles.csv", index=False, float_format="%.6g")
        seconds = time.perf_counter() - t_start
        status = "ok" if n else "empty"
        row = _row(slide_path, status, out, tiles=n, seconds=seconds, name=name,
                   max_score=round(sink.max_value, 6) if n else 0.0, mean_score=round(sink.mean_value, 6) if n else 0.0)
        meta.update(status=status, summary=row, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json(tmp / "meta.json", meta)
    return row


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class _ReaderFailed:
    """What the reader thread hands over instead of a batch when reading raised (re-raised in the loop)."""

    def __init__(self, err: BaseException) -> None:
        self.err = err


class TileLoader:
    """Batches ``(uint8 [B, T, T, 3], index [B])`` of a :class:`SlideTileDataset`, read ahead of the model.

    How the tiles are read (``slides.num_workers`` = N; outputs never depend on it):

    * on CUDA, N > 0, in a process that may start children: N ``DataLoader`` reader processes with
      pinned memory (JPEG decoding in parallel feeds a fast GPU);
    * otherwise, N > 0 (a CPU, or a daemonic Dask worker): **one reader thread** (MONAI's
      :class:`~monai.data.ThreadBuffer`, 4 batches ahead). OpenSlide and numpy release the GIL while
      they decode and copy, so reading overlaps the model as a process would, without a process start
      per slide (a fork of a process holding torch: ~50 ms) or the copies through shared memory. On a
      CPU the model is the bottleneck and one thread keeps up (docs/benchmarks.md: end to end 0.91-0.94
      of model-only with the thread, 0.89-0.90 with a reader process, same run);
    * N = 0: tiles are read in the loop itself (no read-ahead).

    A reading error (a corrupt tile) is raised in the loop, as without a thread; :meth:`stop` ends the
    thread before the slide is closed.
    """

    def __init__(self, ds: SlideTileDataset, batch_size: int, num_workers: int, device: torch.device) -> None:
        import multiprocessing

        self.threaded = bool(num_workers) and (device.type != "cuda" or multiprocessing.current_process().daemon)
        procs = 0 if self.threaded else int(num_workers)
        # its own generator: each pass draws its base seed from it, not from the global torch RNG
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=procs, pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init if procs else None, prefetch_factor=4 if procs else None,
            persistent_workers=False, generator=torch.Generator(),
        )
        self._buffer = None

    def _guarded(self):
        try:
            yield from self.loader
        except BaseException as err:  # noqa: BLE001 - handed to the loop, which raises it
            yield _ReaderFailed(err)

    def __iter__(self):
        if not self.threaded:
            yield from self.loader
            return
        from monai.data import ThreadBuffer

        self._buffer = ThreadBuffer(self._guarded(), buffer_size=4, timeout=0.01)
        for item in self._buffer:
            if isinstance(item, _ReaderFailed):
                raise item.err
            yield item

    def stop(self) -> None:
        """Stop and join the reader thread (a no-op without one)."""
        if self._buffer is not None:
            self._buffer.stop()
            self._buffer = None


def model_input(imgs: torch.Tensor, served, device: torch.device) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 tiles -> ``[B, 3, H, W]`` floats in [0, 1] on ``device``, as ``served`` takes them.

    Normalisation happens inside the network. The permuted view is channels_last, as torch's convolutions
    want it; an ONNX Runtime graph (``served.runtime``) is fed NCHW-contiguous floats made in one pass.
    """
    x = imgs.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return (x.contiguous() if hasattr(served, "runtime") else x).float().div_(255.0)


def _run_model(served, slide_path, xy, base_mpp, cfg, dev, amp, boxes, sink, probs, mean_w, progress) -> None:
    """Batched inference over a :class:`TileLoader`; stitches each tile's served score into ``sink``.

    The tile's score is resized to its heatmap footprint and merged with the footprint's importance
    map as weights (``slides.blend``), so overlapping tiles hand over smoothly.
    """
    r0, c0, r1, c1 = boxes
    ds = SlideTileDataset(slide_path, xy, cfg.tile_size, cfg.target_mpp, base_mpp)
    loader = TileLoader(ds, int(cfg.batch_size), int(cfg.num_workers), dev)
    dtype = amp_dtype(dev, amp)
    blend, sigma = getattr(cfg, "blend", "gaussian"), float(getattr(cfg, "blend_sigma", 0.125))
    ramp = float(effective_overlap(cfg))  # tile px; scaled to each footprint below
    weights: dict[tuple[int, int], np.ndarray] = {}
    served.to(dev).eval()
    served.to(memory_format=torch.channels_last)  # as in training: oneDNN / cuDNN's fast NHWC convolutions
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # one tile size for the whole slide: let cuDNN pick its kernels
    n_classes = len(served.classes)

    def stitch(idx: np.ndarray, host: list[torch.Tensor], groups: list[np.ndarray], done) -> None:
        """Merge one batch whose device-to-host copies were issued earlier (waits for them only now)."""
        if done is not None:
            done.synchronize()
        probs[idx] = host[0].numpy()
        mean_w[idx] = host[1].numpy()
        small: list[torch.Tensor | None] = [None] * len(idx)
        for sel, part in zip(groups, host[2:]):
            for j, s in enumerate(sel):
                small[s] = part[j : j + 1]
        for j, i in enumerate(idx):  # grid order: rows never go back (BandedZarrMerger needs it)
            tile = small[j]
            key = tuple(tile.shape[-2:])
            if key not in weights:
                weights[key] = importance_map(key[0], key[1], blend, sigma, ramp=ramp * key[0] / cfg.tile_size)
            sink.aggregate(tile, (int(r0[i]), int(c0[i])), weights[key])

    def compute(imgs: torch.Tensor, idx: torch.Tensor) -> tuple:
        """One batch through the model; returns what :func:`stitch` merges (host copies issued, not awaited)."""
        with torch.inference_mode():
            with autocast(dev, dtype):
                p, wm, score = served(model_input(imgs, served, dev))
            if p.shape[1] != n_classes:
                raise SlideError(
                    f"{slide_path}: the model outputs {p.shape[1]} classes but its package names {n_classes} "
                    f"({served.classes}); fix: re-package the model"
                )
            idx = idx.numpy()
            score = score.float()
            hs, ws = r1[idx] - r0[idx], c1[idx] - c0[idx]
            outs = [p.float(), wm.float().mean(dim=(1, 2, 3))]
            groups = []
            for bh, bw in sorted(set(zip(hs.tolist(), ws.tolist()))):
                sel = np.nonzero((hs == bh) & (ws == bw))[0]
                part = score[torch.as_tensor(sel, device=score.device)] if len(sel) < len(idx) else score
                mh, mw = part.shape[-2:]
                if (bh, bw) != (mh, mw):
                    mode = "area" if bh <= mh and bw <= mw else "bilinear"
                    part = F.interpolate(part, size=(bh, bw), mode=mode, **({} if mode == "area" else {"align_corners": False}))
                groups.append(sel)
                outs.append(part)
            # on a GPU: asynchronous copies into pinned host memory, merged one batch later, so the device
            # never waits for the stitching (no sync per batch); on a CPU these are the tensors
            host = [o.to("cpu", non_blocking=cuda) for o in outs]
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
            return idx, host, groups, done

    # On a CPU the model runs in a second thread (torch and ONNX Runtime release the GIL) while this one
    # stitches the previous batch into the heatmap, so the merging hides behind the model. On CUDA the
    # model runs here: its work is asynchronous already, and a batch is merged one batch later.
    pool = None if cuda else ThreadPoolExecutor(1, thread_name_prefix="medwsol-model")
    pending: list = []
    try:
        with _progress(progress) as bar, torch.inference_mode():
            task = bar.add_task(slide_path.name[:40], total=len(ds))

            def merge_oldest() -> None:
                job = pending.pop(0)
                res = job if pool is None else job.result()
                stitch(*res)
                bar.advance(task, len(res[0]))

            for imgs, idx in loader:
                pending.append(compute(imgs, idx) if pool is None else pool.submit(compute, imgs, idx))
                if len(pending) > 1:
                    merge_oldest()
            while pending:
                merge_oldest()
    finally:
        loader.stop()  # the reader thread is done with the slide before it is closed
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        ds.close()


RECORDS_DIR = "records"
#: Folder names in a cohort's output folder that are not slides (a slide with such a stem gets a hashed name).
RESERVED_NAMES = (RECORDS_DIR, "package")


def _write_record(out_root: Path, row: dict[str, Any]) -> None:
    write_json(out_root / RECORDS_DIR / f"{row['name']}.json", row)


def write_summary(rows: Sequence[dict[str, Any]], csv: str | Path) -> pd.DataFrame:
    """Write ``slides.csv`` atomically from summary rows; return it as a DataFrame."""
    df = pd.DataFrame(list(rows), columns=SUMMARY_COLUMNS)
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def rebuild_summary(out_root: str | Path, csv: str | Path | None = None) -> pd.DataFrame:
    """Rebuild ``slides.csv`` from the per-slide records (``<out_root>/records/*.json``), e.g. after a crash.

    Every slide that finished or failed left a record, written as soon as it was done.
    """
    out_root = Path(out_root)
    rows = []
    for f in sorted((out_root / RECORDS_DIR).glob("*.json")):
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return write_summary(rows, csv if csv is not None else out_root / "slides.csv")


def infer_cohort(
    served,
    slides: Sequence[str | Path],
    cfg_slides,
    out_root: str | Path,
    device: str | torch.device,
    tracker=None,
    progress: bool = True,
    amp: str = "auto",
    summary_csv: str | Path | None = None,
) -> pd.DataFrame:
    """Infer every slide; one failing slide is recorded with its error while the others finish.

    A finished slide is skipped when its package, file and settings are unchanged (:func:`slide_key`),
    unless ``cfg_slides.overwrite``. After each slide its record is written (``records/<name>.json``)
    and the summary rewritten atomically to ``summary_csv`` (default ``<out_root>/slides.csv``), so a
    crash loses at most the slide in progress (:func:`rebuild_summary`).

    Args:
        served: a :class:`~medwsol.engine.served.ServedModel`.
        slides: slide files.
        cfg_slides: a ``SlidesConfig``.
        out_root: folder of the per-slide folders.
        device: see :func:`infer_slide`.
        tracker: optional ``Tracker``; gets cohort metrics and slides.csv as an artifact.
        progress: rich progress bars.
        amp: see :func:`infer_slide`.
        summary_csv: where to write the summary.

    Returns:
        DataFrame with columns slide, name, status ('ok'|'failed'|'skipped'|'empty'), error, tiles,
        seconds, tiles_per_s, max_score, mean_score, outputs.

    Example:
        >>> from medwsol.engine.infer import infer_cohort  # doctest: +SKIP
        >>> df = infer_cohort(served, slides, cfg.slides, run_dir / "slides", "auto")  # doctest: +SKIP
        >>> df.status.tolist()  # doctest: +SKIP
        ['ok', 'failed']
    """
    out_root = Path(out_root)
    csv = Path(summary_csv) if summary_csv is not None else out_root / "slides.csv"
    rows: list[dict[str, Any]] = []
    for s, name in zip([Path(p) for p in slides], output_names(slides, out_root)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                row = infer_slide(served, s, cfg_slides, out_root, device, progress=progress, amp=amp, name=name)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - one slide must not stop the cohort
            row = failed_row(s, err, name=name)
            warnings.warn(f"slide failed: {row['error']}", stacklevel=2)
        rows.append(row)
        _write_record(out_root, row)
        write_summary(rows, csv)
    df = write_summary(rows, csv)
    if tracker is not None:
        log_cohort(tracker, df, csv)
    return df


def log_cohort(tracker, df: pd.DataFrame, csv: str | Path) -> None:
    """Cohort metrics (slides ok/failed/empty/skipped, tiles, tiles/s) and ``slides.csv`` to a tracker."""
    if tracker is not None:
        done = df[df.status.isin(["ok", "empty"])]
        tracker.log_metrics({
            "slides_ok": float((df.status == "ok").sum()), "slides_failed": float((df.status == "failed").sum()),
            "slides_empty": float((df.status == "empty").sum()), "slides_skipped": float((df.status == "skipped").sum()),
            "slide_tiles": float(done.tiles.sum()),
            "slide_tiles_per_s": float(done.tiles.sum() / done.seconds.sum()) if done.seconds.sum() > 0 else 0.0,
        })
        tracker.log_artifact(csv)


def slide_error_line(slide: Path, err: BaseException) -> str:
    """The one-line error of a failed slide, starting with its path."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return f"{slide}: CUDA out of memory; fix: lower slides.batch_size"
    msg = _one_line(err)
    return msg if msg.startswith(str(slide)) else f"{slide}: {msg}"
