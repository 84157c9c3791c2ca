"""Slide runtimes: the model package served by PyTorch, ONNX Runtime fp32, or ONNX Runtime int8.

A runtime is a drop-in for :class:`~medwsol.engine.served.ServedModel` in the slide path: called on RGB
tiles in [0, 1] ``[B, 3, H, W]`` it returns ``(probs [B, C], weight [B, 1, H, W], score [B, 1, H, W])``,
and it has the same ``classes``, ``positive_class``, ``score_mode``, ``map_range``, ``tau``,
``tau_source``, ``digest`` and ``describe()``.

* ``torch`` - the package's :class:`ServedModel` itself (fp32 eager, channels_last).
* ``onnx`` - the **ServedModel** exported to ONNX (``torch.onnx.export(dynamo=True)``): all three
  outputs, so the graph serves exactly what the package serves (the fixed map range, the score mode,
  the positive class are inside it). Dynamic batch; height and width are fixed to the tile size (one
  graph per tile size: the WILDCAT top-k counts depend on the map size).
* ``onnx-int8`` - that graph statically quantized by ONNX Runtime: QDQ format, per-channel int8
  weights, uint8 activations, ranges calibrated (MinMax) on **real tiles** - the validation split of
  the package's data manifest, another manifest, or tissue tiles of given slides (what was used is
  recorded and printed; there is never a silent fallback to noise).

Graphs are cached by package digest: ``<package>/runtimes/<digest>/`` when the package folder is
writable and permanent, else ``$MEDWSOL_CACHE`` (default ``~/.cache/medwsol``) ``/runtimes/<digest>/``.
Beside each graph, ``<graph>.json`` records how it was made and its **faithfulness check**
(:func:`check_runtime`: on validation tiles, max/mean |Δ score| and |Δ weight|, Dice of the maps
thresholded at τ, classification agreement, all against the fp32 torch model). The slide pipeline
refuses a runtime whose Dice is below ``slides.runtime_min_dice`` (default 0.97).

ONNX Runtime sessions get their thread counts explicitly (``slides.runtime_threads``, default: the
CPUs this process may use) and spinning off (``session.intra_op.allow_spinning=0``, inter-op too):
spinning threads otherwise take the cores from the tile-reading worker.

Example:
    >>> from medwsol.package import load_package  # doctest: +SKIP
    >>> from medwsol.engine.served import served_from_package  # doctest: +SKIP
    >>> from medwsol.engine.runtimes import build_runtime  # doctest: +SKIP
    >>> pkg = load_package("runs/slides/20260101-000000/package")  # doctest: +SKIP
    >>> rt = build_runtime(pkg, served_from_package(pkg), "onnx-int8", tile_size=128)  # doctest: +SKIP
    >>> probs, weight, score = rt(torch.rand(4, 3, 128, 128))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medwsol.errors import ConfigError, DataError, NotAvailableError
from medwsol.io import atomic_path, write_json

__all__ = [
    "RUNTIMES",
    "DEFAULT_CPU_RUNTIME",
    "OnnxServedModel",
    "CalibrationSet",
    "resolve_runtime",
    "runtime_cache_dir",
    "export_onnx",
    "quantize_int8",
    "calibration_tiles",
    "check_runtime",
    "build_runtime",
    "session_options",
    "default_threads",
]

RUNTIMES = ("torch", "onnx", "onnx-int8")
#: ``slides.runtime: auto`` on a CPU (chosen by measurement: docs/benchmarks.md).
DEFAULT_CPU_RUNTIME = "onnx-int8"
GRAPH_VERSION = 1  # bump when the export or quantization recipe changes: old cached graphs are rebuilt
OPSET = 18


def default_threads() -> int:
    """ONNX Runtime's intra-op threads when ``slides.runtime_threads`` is not set: the CPUs this process may use."""
    from medwsol.engine.runtime import cores

    return cores()


def resolve_runtime(name: str, device: torch.device | str) -> str:
    """``auto`` -> ``torch`` on CUDA, :data:`DEFAULT_CPU_RUNTIME` on a CPU; ONNX runtimes need the CPU."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if name == "auto":
        return "torch" if dev.type == "cuda" else DEFAULT_CPU_RUNTIME
    if name not in RUNTIMES:
        raise ConfigError(f"slides.runtime: {name!r} is not one of auto, {', '.join(RUNTIMES)}; fix: pick one of them")
    if name != "torch" and dev.type != "cpu":
        raise ConfigError(f"slides.runtime: {name} runs on the CPU but the device is {dev}; fix: use "
                          "slides.runtime=torch on a GPU (bf16/fp16 autocast), or train.device=cpu")
    return name


# ------------------------------------------------------------------------------------------------ cache


def _digest_hex(digest: str) -> str:
    return str(digest).split(":", 1)[-1]


def _writable(folder: Path) -> bool:
    probe = folder / f".medwsol-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def runtime_cache_dir(pkg) -> Path:
    """Where a package's graphs live: ``<package>/runtimes/<digest>/``, or the user cache when that is not possible.

    A package downloaded from the registry lives in a temporary folder (``pkg.source`` is a
    ``models:/`` or ``runs:/`` URI), so its graphs go to ``$MEDWSOL_CACHE/runtimes/<digest>/``
    (default ``~/.cache/medwsol``), as do those of a read-only package folder.
    """
    hexd = _digest_hex(pkg.digest)
    src = str(getattr(pkg, "source", ""))
    if not src.startswith(("models:/", "runs:/")):
        here = Path(pkg.path) / "runtimes" / hexd
        if _writable(here):
            return here
    root = Path(os.environ.get("MEDWSOL_CACHE") or Path.home() / ".cache" / "medwsol")
    out = root / "runtimes" / hexd
    out.mkdir(parents=True, exist_ok=True)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- export


def export_onnx(served, out: Path, tile_size: int) -> Path:
    """Export a :class:`ServedModel` (fp32, CPU) to ``out``: input ``x`` ``[B, 3, T, T]``, outputs probs, weight, score.

    The batch dimension is dynamic; the graph's height and width are ``tile_size``.
    """
    import copy
    import logging

    net = copy.deepcopy(served).float().cpu().eval().to(memory_format=torch.contiguous_format)
    x = torch.rand(2, 3, int(tile_size), int(tile_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net, (x,), str(tmp), dynamo=True, opset_version=OPSET, input_names=["x"],
                              output_names=["probs", "weight", "score"], dynamic_shapes=({0: batch},),
                              external_data=False, verbose=False)
        except Exception as err:  # noqa: BLE001 - one line for the CLI
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise NotAvailableError(f"ONNX export of {served.describe().get('method')} failed ({first}); fix: use "
                                    "slides.runtime=torch") from None
    return out


# ------------------------------------------------------------------------------------------ calibration


@dataclass
class CalibrationSet:
    """Real tiles for int8 calibration and the faithfulness check.

    Attributes:
        tiles: float32 ``[N, 3, T, T]`` RGB in [0, 1].
        source: one line saying where they come from (printed and recorded).
        names: the image (or slide:x,y) of each tile.
    """

    tiles: np.ndarray
    source: str
    names: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.tiles[:, :, ::7, ::7]).tobytes())
        h.update(str(self.tiles.shape).encode())
        return h.hexdigest()[:16]


def _crops(img: np.ndarray, t: int, per_image: int) -> list[np.ndarray]:
    """Up to ``per_image`` ``t x t`` crops of an ``[3, H, W]`` image on a regular grid (padded with white if smaller)."""
    _, h, w = img.shape
    if h < t or w < t:
        pad = np.ones((3, max(h, t), max(w, t)), np.float32)
        pad[:, :h, :w] = img
        img, h, w = pad, max(h, t), max(w, t)
    ys = np.unique(np.linspace(0, h - t, max(1, int(np.ceil(h / t)))).round().astype(int))
    xs = np.unique(np.linspace(0, w - t, max(1, int(np.ceil(w / t)))).round().astype(int))
    out = [img[:, y : y + t, x : x + t] for y in ys for x in xs]
    if len(out) > per_image:  # centre-most first
        cy, cx = (h - t) / 2, (w - t) / 2
        order = sorted(range(len(out)), key=lambda i: abs(ys[i // len(xs)] - cy) + abs(xs[i % len(xs)] - cx))
        out = [out[i] for i in order[:per_image]]
    return out


def _manifest_tiles(manifest: Path, classes: list[str], split: str, t: int, n: int) -> CalibrationSet:
    from medwsol.data.manifest import load_manifest, split_records
    from medwsol.data.transforms import eval_transforms

    df = load_manifest(manifest, classes)
    recs = split_records(df, split)
    if not recs:
        raise DataError(f"{manifest}: no rows in split {split!r} for runtime calibration; fix: give a manifest with "
                        "a valid split, or --calibration-slides")
    chain = eval_transforms()
    per_image = max(1, int(np.ceil(n / len(recs))))
    tiles, names = [], []
    for r in recs:
        img = chain({"image": r["image"], "label": r["label"], "name": r["name"]})["image"]
        img = np.asarray(img.as_tensor() if hasattr(img, "as_tensor") else img, np.float32)
        for c in _crops(img, t, per_image):
            tiles.append(c)
            names.append(str(r["name"]))
    idx = np.linspace(0, len(tiles) - 1, min(n, len(tiles))).round().astype(int)
    idx = np.unique(idx)
    return CalibrationSet(np.stack([tiles[i] for i in idx]).astype(np.float32),
                          f"{len(idx)} tiles of {t} px from the {split} split of {manifest} ({len(recs)} images)",
                          [names[i] for i in idx])


def _slide_tiles(slides: Sequence[Path], t: int, mpp: float, n: int, fallback_mpp: float | None,
                 min_tissue: float = 0.5) -> CalibrationSet:
    from medwsol.data.slides import open_slide, read_region_at_mpp, slide_mpp, tile_grid, tissue_mask

    per_slide = max(1, int(np.ceil(n / max(1, len(slides)))))
    tiles, names = [], []
    for s in slides:
        sl = open_slide(s)
        try:
            base, _ = slide_mpp(sl, fallback_mpp)
            mask, mask_mpp = tissue_mask(sl, mpp=16.0, base_mpp=base)
            xy = tile_grid(sl.dimensions, base, mpp, t, 0, mask, mask_mpp, min_tissue)
            if len(xy) == 0:
                continue
            pick = np.unique(np.linspace(0, len(xy) - 1, min(per_slide, len(xy))).round().astype(int))
            for i in pick:
                x, y = (int(v) for v in xy[i])
                rgb = read_region_at_mpp(sl, x, y, t, t, mpp, base)
                tiles.append(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)
                names.append(f"{Path(s).name}:{x},{y}")
        finally:
            sl.close()
    if not tiles:
        raise DataError(f"--calibration-slides {', '.join(map(str, slides))}: no tissue tiles found; fix: give "
                        "slides with tissue")
    return CalibrationSet(np.stack(tiles)[:n], f"{min(n, len(tiles))} tissue tiles of {t} px at {mpp} um/px from "
                          f"{len(slides)} slide(s) ({', '.join(Path(s).name for s in slides)[:120]})", names[:n])


def calibration_tiles(pkg, tile_size: int, manifest: Path | None = None, slides: Sequence[Path] = (),
                      n: int = 64, fallback_mpp: float | None = None) -> CalibrationSet:
    """Real tiles for calibration and the check: given slides, a given manifest, or the package's own manifest.

    Order of preference: ``slides`` (tissue tiles at the package's µm/px), ``manifest`` (its ``valid``
    split), the data manifest named in the package's provenance (its ``valid`` split; a warning when
    its sha256 is no longer the one trained on).

    Raises:
        DataError: none of them is available (the message says what to pass).
    """
    t = int(tile_size)
    if slides:
        return _slide_tiles([Path(s) for s in slides], t, float(pkg.meta["input"].get("target_mpp") or 1.0), n,
                            fallback_mpp)
    if manifest is not None:
        if not Path(manifest).is_file():
            raise DataError(f"--calibration-manifest {manifest}: file not found; fix: check the path")
        return _manifest_tiles(Path(manifest), pkg.classes, "valid", t, n)
    prov = pkg.meta.get("provenance") or {}
    own = prov.get("data_manifest")
    cands = [Path(own)] if own else []
    if own and not Path(own).is_absolute() and prov.get("run_dir"):
        # relative to where the pipeline ran: the run dir is <cwd>/runs/<name>/<stamp>
        cands.append(Path(prov["run_dir"]).parents[2] / own)
    for c in cands:
        if c.is_file():
            cal = _manifest_tiles(c, pkg.classes, "valid", t, n)
            from medwsol.package import sha256_file

            if prov.get("data_manifest_sha256") and sha256_file(c) != prov["data_manifest_sha256"]:
                cal.source += " (warning: this manifest changed since training)"
            return cal
    raise DataError(
        f"runtime calibration: the package's validation data ({own or 'not recorded'}) is not on this machine; "
        "fix: pass --calibration-manifest CSV (a valid split) or --calibration-slides SLIDE..., or use the onnx runtime")


# -------------------------------------------------------------------------------------------- quantize


class _Reader:
    """``CalibrationDataReader`` over a float32 array, in batches."""

    def __init__(self, tiles: np.ndarray, batch: int = 8) -> None:
        self.tiles, self.batch, self.i = tiles, batch, 0

    def get_next(self):
        if self.i >= len(self.tiles):
            return None
        x = np.ascontiguousarray(self.tiles[self.i : self.i + self.batch], np.float32)
        self.i += self.batch
        return {"x": x}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(fp32: Path, out: Path, cal: CalibrationSet) -> dict[str, Any]:
    """Static int8 quantization of ``fp32`` into ``out``: QDQ, per-channel int8 weights, uint8 activations (MinMax).

    Only the convolutions (and matmuls) are quantized; the heads' pooling, the map transform and the
    score stay in float32. Returns the recipe (recorded beside the graph).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    recipe = {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": "uint8",
              "calibration": "MinMax", "op_types": ["Conv", "MatMul", "Gemm"], "reduce_range": False}
    with atomic_path(out) as tmp:
        pre = Path(str(tmp) + ".pre.onnx")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
                    src = pre
                except Exception:  # noqa: BLE001 - pre-processing is an optimisation only
                    src = fp32
                # the ServedModel's own head convs are quantized too; keep nothing but convs/matmuls
                quantize_static(str(src), str(tmp), _Reader(cal.tiles), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=recipe["op_types"],
                                reduce_range=False)
        finally:
            for p in (pre, Path(str(tmp) + ".pre.onnx.data")):
                p.unlink(missing_ok=True)
        onnx.checker.check_model(str(tmp))
    return recipe


# --------------------------------------------------------------------------------------------- session


def session_options(threads: int | None = None):
    """ONNX Runtime options: ``threads`` intra-op threads (default: :func:`default_threads`), 1 inter-op,
    sequential execution, spinning off, all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or default_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class OnnxServedModel:
    """An ONNX Runtime session serving a package: a drop-in for :class:`ServedModel` in the slide path.

    Args:
        served: the package's :class:`ServedModel` (for its calibration and names; its network is not run).
        graph: the ``.onnx`` file (input ``x`` ``[B, 3, T, T]`` float32; outputs probs, weight, score).
        runtime: ``onnx`` or ``onnx-int8``.
        tile_size: the graph's height and width.
        threads: ONNX Runtime intra-op threads (default :func:`default_threads`).
        info: what is recorded about the graph (recipe, calibration, check); shown in ``describe()``.
    """

    def __init__(self, served, graph: Path, runtime: str, tile_size: int, threads: int | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.classes = list(served.classes)
        self.positive_class = served.positive_class
        self.positive = served.positive
        self.score_mode = served.score_mode
        self.map_range = served.map_range
        self.map_class = getattr(served, "map_class", "predicted")
        self.tau = served.tau
        self.tau_source = served.tau_source
        self.digest = served.digest
        self._base = served.describe()
        self.runtime = runtime
        self.graph = Path(graph)
        self.tile_size = int(tile_size)
        self.threads = int(threads or default_threads())
        self.info = dict(info or {})
        self._session = None

    def __getstate__(self) -> dict:  # sessions do not pickle; the next call re-opens the graph
        state = self.__dict__.copy()
        state["_session"] = None
        return state

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(self.graph), sess_options=session_options(self.threads),
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def describe(self) -> dict[str, Any]:
        keep = {k: self.info[k] for k in ("graph_sha256", "calibration", "check") if k in self.info}
        if "check" in keep:
            keep["check"] = {k: v for k, v in keep["check"].items() if k in ("dice", "agreement", "max_abs_score",
                                                                              "mean_abs_score", "n_tiles")}
        return {**self._base, "runtime": self.runtime, "graph": self.graph.name, "threads": self.threads, **keep}

    # ServedModel-compatible no-ops: the session lives on the CPU, in inference mode
    def to(self, *args, **kwargs) -> "OnnxServedModel":
        return self

    def eval(self) -> "OnnxServedModel":
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-2:] != (self.tile_size, self.tile_size):
            raise ValueError(f"the {self.runtime} graph {self.graph.name} takes {self.tile_size} px tiles, got "
                             f"{tuple(x.shape[-2:])}")
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        probs, weight, score = self.session.run(None, {"x": arr})
        return torch.from_numpy(probs), torch.from_numpy(weight), torch.from_numpy(score)

    forward = __call__

    def run_numpy(self, arr: np.ndarray) -> list[np.ndarray]:
        """``[probs, weight, score]`` of a float32 ``[B, 3, T, T]`` array."""
        return self.session.run(None, {"x": np.ascontiguousarray(arr, np.float32)})


# ----------------------------------------------------------------------------------------------- check


def _batched(fn: Callable[[np.ndarray], Sequence[np.ndarray]], tiles: np.ndarray, batch: int = 16):
    outs = [fn(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]
    return [np.concatenate([o[k] for o in outs]) for k in range(3)]


def check_runtime(served, runtime: OnnxServedModel, cal: CalibrationSet, batch: int = 16) -> dict[str, Any]:
    """Faithfulness of a runtime to the fp32 torch :class:`ServedModel` on real tiles.

    Returns:
        ``n_tiles``, ``source``, ``tau``, ``max_abs_score``, ``mean_abs_score``, ``max_abs_weight``,
        ``mean_abs_weight``, ``max_abs_prob``, ``dice`` (pixels of ``score >= tau`` pooled over the tiles;
        1.0 when neither map has any), ``agreement`` (fraction of tiles with the same predicted class),
        ``fp32_fraction`` / ``runtime_fraction`` (foreground fractions at τ), and tiles/s of both.
    """
    net = served.float().cpu().eval()

    def ref(a: np.ndarray):
        with torch.inference_mode():
            p, w, s = net(torch.from_numpy(np.ascontiguousarray(a)))
        return [p.numpy(), w.numpy(), s.numpy()]

    t0 = time.perf_counter()
    p0, w0, s0 = _batched(ref, cal.tiles, batch)
    t1 = time.perf_counter()
    p1, w1, s1 = _batched(runtime.run_numpy, cal.tiles, batch)
    t2 = time.perf_counter()
    tau = float(served.tau)
    a, b = s0 >= tau, s1 >= tau
    denom = int(a.sum()) + int(b.sum())
    dice = 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom
    return {
        "runtime": runtime.runtime, "graph": runtime.graph.name, "n_tiles": int(len(cal.tiles)), "source": cal.source,
        "tau": tau, "dice": float(dice), "agreement": float((p0.argmax(1) == p1.argmax(1)).mean()),
        "max_abs_score": float(np.abs(s0 - s1).max()), "mean_abs_score": float(np.abs(s0 - s1).mean()),
        "max_abs_weight": float(np.abs(w0 - w1).max()), "mean_abs_weight": float(np.abs(w0 - w1).mean()),
        "max_abs_prob": float(np.abs(p0 - p1).max()),
        "fp32_fraction": float(a.mean()), "runtime_fraction": float(b.mean()),
        "torch_tiles_per_s": len(cal.tiles) / max(t1 - t0, 1e-9), "runtime_tiles_per_s": len(cal.tiles) / max(t2 - t1, 1e-9),
    }


# ----------------------------------------------------------------------------------------------- build


def build_runtime(pkg, served, runtime: str, tile_size: int, threads: int | None = None,
                  calibration_manifest: Path | None = None, calibration_slides: Sequence[Path] = (),
                  n_calibration: int = 64, min_dice: float | None = 0.97, fallback_mpp: float | None = None,
                  rebuild: bool = False, log: Callable[[str], None] | None = None):
    """The runtime ``runtime`` for a package: its :class:`ServedModel` (``torch``) or an :class:`OnnxServedModel`.

    Exports (and for ``onnx-int8`` quantizes) on first use and caches the graphs by package digest
    (:func:`runtime_cache_dir`); later calls reuse them. Each graph's faithfulness check
    (:func:`check_runtime`) is run once on validation tiles and stored beside it. With ``min_dice``
    set, a runtime whose check Dice is below it is refused.

    Args:
        pkg: a loaded :class:`medwsol.package.Package`.
        served: its :class:`ServedModel` (with any serving overrides).
        runtime: ``torch``, ``onnx`` or ``onnx-int8``.
        tile_size: the tiles the slide path will feed.
        threads: ONNX Runtime intra-op threads.
        calibration_manifest: a manifest whose ``valid`` split calibrates and checks (default: the package's own).
        calibration_slides: slides whose tissue tiles calibrate and check instead.
        n_calibration: how many tiles.
        min_dice: the floor of the check's Dice (None: report, never refuse).
        fallback_mpp: for calibration slides without a pixel size.
        rebuild: ignore cached graphs.
        log: where to say what was built or reused (default: nowhere).

    Raises:
        ConfigError: the runtime's Dice is below ``min_dice`` (one line with the numbers).
        DataError: no calibration tiles for a graph that is not cached yet.
    """
    say = log or (lambda _m: None)
    if runtime == "torch":
        return served
    if runtime not in RUNTIMES:
        raise ConfigError(f"slides.runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}; fix: pick one of them")
    t = int(tile_size)
    folder = runtime_cache_dir(pkg)
    # the graph serves the ServedModel's choices: key the file on them as well as on the digest
    choice = hashlib.sha256(json.dumps([served.score_mode, served.positive_class, served.map_range,
                                        getattr(served, "map_class", "predicted"), GRAPH_VERSION],
                                       default=str).encode()).hexdigest()[:8]
    fp32 = folder / f"fp32_{t}px_{choice}.onnx"
    graph = fp32 if runtime == "onnx" else folder / f"int8_{t}px_{choice}.onnx"
    info_path = Path(str(graph) + ".json")
    info = None if rebuild else _read_json(info_path)
    explicit = bool(calibration_slides) or calibration_manifest is not None
    cal: CalibrationSet | None = None
    if info is not None and graph.is_file() and info.get("graph_sha256") == _sha256(graph):
        if explicit and runtime == "onnx-int8":  # other calibration tiles than the cached graph's: rebuild on those
            cal = calibration_tiles(pkg, t, calibration_manifest, calibration_slides, n_calibration, fallback_mpp)
            if cal.fingerprint != (info.get("calibration") or {}).get("fingerprint"):
                info = None
        if info is not None:
            say(f"runtime {runtime}: reusing {graph} (calibrated on {(info.get('calibration') or {}).get('source', '-')})")
    else:
        info = None
    if info is None:
        if cal is None:
            try:
                cal = calibration_tiles(pkg, t, calibration_manifest, calibration_slides, n_calibration, fallback_mpp)
            except DataError:
                if runtime == "onnx-int8":
                    raise
                cal = None  # fp32 graph: export anyway; checked when tiles are given
        if rebuild or not fp32.is_file():
            t0 = time.perf_counter()
            export_onnx(served, fp32, t)
            say(f"runtime onnx: exported {fp32} in {time.perf_counter() - t0:.0f} s")
        info = {"version": GRAPH_VERSION, "runtime": runtime, "digest": pkg.digest, "tile_size": t,
                "score": served.score_mode, "positive_class": served.positive_class, "map_range": served.map_range}
        if runtime == "onnx-int8":
            assert cal is not None
            t0 = time.perf_counter()
            info["recipe"] = quantize_int8(fp32, graph, cal)
            say(f"runtime onnx-int8: quantized {graph} in {time.perf_counter() - t0:.0f} s, calibrated on {cal.source}")
        if cal is not None:
            info["calibration"] = {"source": cal.source, "n_tiles": int(len(cal.tiles)), "fingerprint": cal.fingerprint}
        import onnxruntime

        info.update(graph_sha256=_sha256(graph), onnxruntime=onnxruntime.__version__, torch=torch.__version__)
    rt = OnnxServedModel(served, graph, runtime, t, threads, info)
    if "check" not in info and cal is not None:
        info["check"] = check_runtime(served, rt, cal)
    if not info_path.is_file() or _read_json(info_path) != info:
        write_json(info_path, info)
    rt.info = info
    chk = info.get("check")
    if chk is None:
        say(f"runtime {runtime}: no faithfulness check yet (no validation tiles on this machine)")
        if min_dice is not None and runtime == "onnx-int8":
            raise DataError(f"runtime {runtime}: {graph} has no faithfulness check; fix: pass "
                            "--calibration-manifest/--calibration-slides once, or use the onnx runtime")
    else:
        say(f"runtime {runtime}: Dice {chk['dice']:.4f} at tau {chk['tau']:.3f}, class agreement "
            f"{chk['agreement']:.3f}, max |d score| {chk['max_abs_score']:.3f} vs fp32 torch on {chk['n_tiles']} tiles")
        if min_dice is not None and chk["dice"] < float(min_dice):
            raise ConfigError(
                f"slides.runtime {runtime}: Dice {chk['dice']:.4f} vs the fp32 model at tau {chk['tau']:.3f} on "
                f"{chk['n_tiles']} validation tiles is below slides.runtime_min_dice {float(min_dice):g}; fix: use "
                "slides.runtime=onnx or torch, or lower slides.runtime_min_dice")
    return rt
