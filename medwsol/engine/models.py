"""Load the model a stage should use: a checkpoint path, a registry URI, or the run's best."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medwsol.checkpoint import model_from_checkpoint, read_checkpoint
from medwsol.errors import CheckpointError

__all__ = ["load_model", "describe_ref"]


def describe_ref(ref: str | None, run_dir: Path) -> str:
    return ref if ref else str(run_dir / "checkpoints" / "best.pt")


def load_model(ref: str | None, run_dir: Path, tracking_uri: str, classes: list[str], device: torch.device) -> Any:
    """Return a ``WSOLMethod`` in eval mode on ``device``.

    Args:
        ref: ``None`` (the run's ``checkpoints/best.pt``), a checkpoint path, or an MLflow
            model URI (``models:/name@champion``, ``models:/name/3``, ``runs:/<id>/model``).
        run_dir: the run directory.
        tracking_uri: where ``models:/`` URIs are resolved.
        classes: the configured classes; a model trained on other classes is refused.
        device: target device.
    """
    from medwsol.methods.base import WSOLMethod

    if ref is not None and (ref.startswith("models:/") or ref.startswith("runs:/")):
        from medwsol.tracking import load_registered_model

        model = load_registered_model(ref, tracking_uri)
        if not isinstance(model, WSOLMethod):
            raise CheckpointError(f"--model {ref}: the registered model is not a medwsol WSOLMethod; fix: use a model "
                                  "registered by medwsol")
        src = ref
    else:
        path = Path(ref) if ref else run_dir / "checkpoints" / "best.pt"
        if ref is None and not path.is_file():
            raise CheckpointError(f"{path}: no trained model in this run; fix: run the train stage or pass --model")
        ckpt = read_checkpoint(path)
        model = model_from_checkpoint(ckpt)
        model.classes = list(ckpt.get("classes") or classes)
        src = str(path)
    trained = list(getattr(model, "classes", classes))
    if trained != list(classes):
        raise CheckpointError(f"{src}: model was trained on classes {trained}, config has data.classes {list(classes)}; "
                              "fix: set data.classes to the model's classes")
    return model.to(device).eval()
