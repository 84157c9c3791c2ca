"""The model package: the one versioned, code-free artifact that leaves training.

A package is a folder::

    package.json          what the model is and how to serve it (below); human-readable, the model card
    weights.safetensors   the network's tensors (safetensors: no code is executed on load)

``package.json`` keys:

* ``format`` ("medwsol-model-package") and ``schema_version`` (:data:`SCHEMA_VERSION`); a package
  of a newer schema is refused with one line;
* ``model``: ``method``, ``num_classes``, ``backbone``, ``output_stride``, ``params`` (the method's
  full knobs) and ``extra_state`` (non-tensor state, e.g. the log-barrier ``t``);
* ``classes`` (logit order) and ``positive_class`` (the class whose probability scales
  ``weight_x_prob`` scores, and the slide heatmaps' "tumour" class);
* ``input``: ``tile_size`` (px), ``target_mpp`` (µm/px the model was trained at; ``mpp_source``
  says where that number comes from), ``channels`` ("RGB"), ``value_range`` ([0, 1]) and
  ``normalization`` (ImageNet mean/std, applied inside the network);
* ``calibration``: ``map_range`` ([lo, hi] of the fixed map transform fitted on validation, or null
  when the method's map needs none), ``map_range_fitted_on``, ``score`` ("weight" |
  "weight_x_prob"), ``tau`` (threshold on that score), ``tau_chosen_on``, ``tau_miou``;
* ``provenance``: ``run_id``, ``run_dir``, ``pipeline``, ``config_sha256``,
  ``data_manifest_sha256``, ``git_commit``, ``created``, versions, ``select_metric`` /
  ``select_value``, ``guard_met`` and ``metrics`` (validation and test);
* ``weights``: ``file`` and its ``sha256``; ``digest``: sha256 over everything above except
  ``provenance`` (two packages with the same digest produce the same heatmaps).

This module imports neither torch nor mlflow at import time; :func:`load_package` imports torch.

Example:
    >>> from medwsol.package import read_package_meta  # doctest: +SKIP
    >>> meta = read_package_meta("runs/demo/20260101-000000/package")  # doctest: +SKIP
    >>> meta["calibration"]["tau"]  # doctest: +SKIP
    0.42
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medwsol.errors import PackageError
from medwsol.io import atomic_dir

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "PACKAGE_FILE",
    "WEIGHTS_FILE",
    "Package",
    "build_package",
    "read_package_meta",
    "load_package",
    "package_digest",
    "sha256_file",
    "git_commit",
    "is_package_dir",
]

FORMAT = "medwsol-model-package"
SCHEMA_VERSION = 1
PACKAGE_FILE = "package.json"
WEIGHTS_FILE = "weights.safetensors"
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def package_digest(meta: dict[str, Any]) -> str:
    """``sha256:<hex>`` over the package content that decides its outputs (all but provenance)."""
    content = {k: v for k, v in meta.items() if k not in ("provenance", "digest")}
    return "sha256:" + hashlib.sha256(_canonical(content)).hexdigest()


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the working tree (``+dirty`` when it has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def is_package_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / PACKAGE_FILE).is_file()


def build_package(
    out_dir: str | os.PathLike[str],
    state_dict: dict[str, Any],
    model: dict[str, Any],
    classes: list[str],
    positive_class: str,
    input_contract: dict[str, Any],
    calibration: dict[str, Any],
    provenance: dict[str, Any],
) -> Path:
    """Write a package folder atomically (it replaces ``out_dir`` when complete).

    Args:
        out_dir: the package folder to create.
        state_dict: the network's tensors.
        model: ``method, num_classes, backbone, output_stride, params`` and ``extra_state``.
        classes: class names in logit order.
        positive_class: one of ``classes``.
        input_contract: ``tile_size``, ``target_mpp``, ``mpp_source``.
        calibration: ``map_range``, ``map_range_fitted_on``, ``score``, ``tau``, ``tau_chosen_on``, ...
        provenance: run id, hashes, metrics, ...

    Returns:
        ``out_dir``.
    """
    import torch
    from safetensors.torch import save_file

    if positive_class not in classes:
        raise PackageError(f"positive class {positive_class!r} is not one of {classes}; fix: name one of the classes")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta: dict[str, Any] = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model": model,
            "classes": list(classes),
            "positive_class": positive_class,
            "input": {"channels": "RGB", "value_range": [0.0, 1.0],
                      "normalization": {"kind": "imagenet", "inside_model": True, **_IMAGENET}, **input_contract},
            "calibration": calibration,
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(tmp / WEIGHTS_FILE)},
        }
        meta["digest"] = package_digest(meta)
        meta["provenance"] = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "torch_version": torch.__version__, **provenance}
        (tmp / PACKAGE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


def _package_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / PACKAGE_FILE
    if not p.is_file():
        raise PackageError(f"{path}: no model package here (no {PACKAGE_FILE}); fix: pass a package folder "
                           "(<run>/package), a models:/<name>@<alias> URI, or a checkpoint")
    return p


def read_package_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``package.json`` (format, schema version, required keys); no torch needed."""
    p = _package_file(path)
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PackageError(f"{p}: not a readable package file ({type(err).__name__}: {str(err)[:120]}); "
                           "fix: use a package written by medwsol") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackageError(f"{p}: not a medwsol model package (no 'format: {FORMAT}'); fix: use a package written "
                           "by medwsol")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise PackageError(f"{p}: schema_version {version!r} is not valid; fix: use a package written by medwsol")
    if version > SCHEMA_VERSION:
        raise PackageError(f"{p}: package schema {version} is newer than this medwsol reads ({SCHEMA_VERSION}); "
                           "fix: upgrade medwsol (pip install -U medwsol)")
    missing = [k for k in ("model", "classes", "positive_class", "input", "calibration", "weights", "digest")
               if k not in meta]
    if missing:
        raise PackageError(f"{p}: package lacks {', '.join(missing)}; fix: re-package the model with medwsol")
    if meta["digest"] != package_digest(meta):
        raise PackageError(f"{p}: package.json was edited after packaging (digest mismatch); fix: re-package the "
                           "model, or restore the original package.json")
    return meta


@dataclass
class Package:
    """A loaded package: its metadata, the rebuilt network (eval mode) and where it came from."""

    meta: dict[str, Any]
    network: Any
    path: Path
    source: str

    @property
    def digest(self) -> str:
        return str(self.meta["digest"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def calibration(self) -> dict[str, Any]:
        return dict(self.meta["calibration"])


def load_package(path: str | os.PathLike[str], source: str | None = None, map_location: str = "cpu") -> Package:
    """Rebuild the network of a package folder, weights verified and loaded, in eval mode.

    Raises:
        PackageError: not a package, newer schema, weights missing/corrupt, or weights that do not fit
            the package's model config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medwsol.methods.base import build_method

    meta = read_package_meta(path)
    folder = _package_file(path).parent
    src = source or str(folder)
    wfile = folder / str(meta["weights"].get("file", WEIGHTS_FILE))
    if not wfile.is_file():
        raise PackageError(f"{src}: weights file {wfile.name} is missing; fix: copy the whole package folder")
    if sha256_file(wfile) != meta["weights"].get("sha256"):
        raise PackageError(f"{src}: {wfile.name} does not match its sha256 in package.json (corrupt or replaced); "
                           "fix: copy the package again")
    desc = meta["model"]
    try:
        net = build_method(desc["method"], num_classes=int(desc["num_classes"]), backbone=desc["backbone"],
                           pretrained=None, output_stride=int(desc["output_stride"]), params=desc.get("params") or {})
    except Exception as err:  # noqa: BLE001 - an unknown method/backbone or bad params: one line
        raise PackageError(f"{src}: cannot build its model {desc.get('method')}/{desc.get('backbone')} "
                           f"({str(err).splitlines()[0][:160]}); fix: use a medwsol version that has this method") from None
    try:
        state = load_file(str(wfile), device=map_location)
    except (SafetensorError, OSError) as err:
        raise PackageError(f"{src}: cannot read {wfile.name} ({str(err)[:120]}); fix: copy the package again") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise PackageError(f"{src}: the weights do not fit its model config {desc.get('method')}/"
                           f"{desc.get('backbone')} ({first}); fix: re-package the model with medwsol") from None
    net.load_extra_state(desc.get("extra_state") or {})
    net.eval()
    net.classes = list(meta["classes"])
    return Package(meta=meta, network=net, path=folder, source=src)
