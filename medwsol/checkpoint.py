"""Checkpoint files: one format, read safely (``weights_only=True``), written atomically.

A checkpoint is a dict::

    {"format": "medwsol-checkpoint", "version": 1,
     "model": {"method", "num_classes", "backbone", "output_stride", "params"},
     "classes": [...], "state_dict": {...}, "extra_state": {...},
     "epoch": int, ... trainer state (optimizer, scheduler, rng, best) ...}
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medwsol.errors import CheckpointError
from medwsol.io import atomic_path

__all__ = ["FORMAT", "read_checkpoint", "write_checkpoint", "model_from_checkpoint"]

FORMAT = "medwsol-checkpoint"


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a medwsol checkpoint; any other file fails with a CheckpointError naming it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found; fix: check the path or train first")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint ({first}); fix: use a checkpoint written by medwsol") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{p}: not a medwsol checkpoint (no 'format: {FORMAT}' entry); fix: use checkpoints/best.pt of a medwsol run"
        )
    return ckpt


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically (adds the format tag)."""
    payload = {"format": FORMAT, "version": 1, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path, map_location: str = "cpu"):
    """Rebuild the ``WSOLMethod`` stored in a checkpoint, weights loaded, in eval mode."""
    from medwsol.methods.base import build_method

    if not isinstance(ckpt, dict):
        src = str(ckpt)
        ckpt = read_checkpoint(ckpt, map_location=map_location)
    else:
        src = "<checkpoint>"
    desc = ckpt.get("model") or {}
    try:
        model = build_method(
            desc["method"],
            num_classes=int(desc["num_classes"]),
            backbone=desc.get("backbone", "resnet18"),
            pretrained=None,
            output_stride=int(desc.get("output_stride", 16)),
            params=desc.get("params") or {},
        )
    except KeyError as err:
        raise CheckpointError(f"{src}: checkpoint lacks model description key {err}; fix: use a medwsol checkpoint") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise CheckpointError(f"{src}: weights do not match {desc.get('method')}/{desc.get('backbone')} ({first}); "
                              "fix: use the checkpoint of the same method and backbone") from None
    model.load_extra_state(ckpt.get("extra_state") or {})
    model.eval()
    return model
