"""Checkpoint files: one format, read safely (``weights_only=True``), written atomically.

A checkpoint is a dict::

    {"format": "medwsol-checkpoint", "version": 1,
     "model": {"method", "num_classes", "backbone", "output_stride", "params"},
     "classes": [...], "state_dict": {...}, "extra_state": {...},
     "epoch": int, ... trainer state (optimizer, scheduler, rng, best) ...}
"""

from __future__ import annotations

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
    except Exception as err:  # noqa: BLE001 - torch's legacy unpickler raises anything (KeyError, IndexError...) on junk
        text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        first = f"{type(err).__name__}: {text}" if text else type(err).__name__
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


def model_from_checkpoint(ckpt: dict[str, Any] | str | Path, map_location: str = "cpu", source: str | None = None):
    """Rebuild the ``WSOLMethod`` stored in a checkpoint, weights loaded, in eval mode.

    Args:
        ckpt: a checkpoint path, or a dict from :func:`read_checkpoint`.
        map_location: where tensors go.
        source: the file the dict was read from (named in errors).

    Raises:
        CheckpointError: one line naming the file: a model description that is missing or not usable
            (unknown method, non-numeric sizes), or weights that do not fit it.
    """
    from medwsol.errors import RegistryError
    from medwsol.methods.base import build_method

    if not isinstance(ckpt, dict):
        src = str(ckpt)
        ckpt = read_checkpoint(ckpt, map_location=map_location)
    else:
        src = source or "<checkpoint>"
    desc = ckpt.get("model")
    if not isinstance(desc, dict) or "method" not in desc or "num_classes" not in desc:
        raise CheckpointError(f"{src}: the checkpoint has no model description (method, num_classes); fix: use a "
                              "checkpoint written by medwsol")
    try:
        model = build_method(
            str(desc["method"]),
            num_classes=int(desc["num_classes"]),
            backbone=str(desc.get("backbone", "resnet18")),
            pretrained=None,
            output_stride=int(desc.get("output_stride", 16)),
            params=desc.get("params") or {},
        )
    except RegistryError as err:
        raise CheckpointError(f"{src}: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{src}: the checkpoint's model description is not usable ({type(err).__name__}: "
                              f"{first}); fix: use a checkpoint written by medwsol") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
        model.load_extra_state(ckpt.get("extra_state") or {})
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{src}: weights do not match {desc.get('method')}/{desc.get('backbone')} ({first}); "
                              "fix: use the checkpoint of the same method and backbone") from None
    model.eval()
    return model
