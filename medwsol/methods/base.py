"""The one seam every localization method plugs into.

A method is an ``nn.Module`` registered in ``medwsol.methods.catalog.METHODS``.
``forward(x)`` returns a :class:`WSOLOutput` whose ``weight_map`` has the
input's spatial size and lies in [0, 1]; ``loss(batch)`` computes the method's
own training loss (all of its forward passes included) and returns a dict with
a ``"total"`` key. Trainer, evaluator, slide stitcher, exporters and tracker
only ever see these two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from medwsol.methods.catalog import METHOD_PARAMS, METHODS

__all__ = ["WSOLOutput", "WSOLMethod", "build_method"]


@dataclass
class WSOLOutput:
    """What every method returns.

    Attributes:
        logits: class scores, shape ``[B, C]``.
        weight_map: localization map in [0, 1], shape ``[B, 1, H, W]`` (input size).
        extras: method-specific tensors (e.g. class maps); never required by consumers.
    """

    logits: Tensor
    weight_map: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class WSOLMethod(nn.Module):
    """Base class of all methods.

    Subclasses set ``name`` (the registry key) and implement ``forward`` and ``loss``.

    Args:
        num_classes: number of image-level classes.
        backbone: a name in ``BACKBONES``.
        pretrained: optional local ImageNet weights.
        output_stride: 8, 16 or 32 (dilated last stages for 8/16).
        params: the method's parameter model (``METHOD_PARAMS[name]``) or a dict.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: str | Path | None = None,
        output_stride: int = 16,
        params: BaseModel | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.output_stride = output_stride
        schema = METHOD_PARAMS[self.name]
        self.params = params if isinstance(params, BaseModel) else schema.model_validate(params or {})
        self.epoch = 0

    def forward(self, x: Tensor) -> WSOLOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Hook called by the trainer after each epoch (schedules such as the log-barrier t)."""
        self.epoch = epoch + 1

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state saved in checkpoints (restored by ``load_extra_state``)."""
        return {"epoch": self.epoch}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))

    def describe(self) -> dict[str, Any]:
        """What is needed to rebuild this model (stored in checkpoints)."""
        return {
            "method": self.name,
            "num_classes": self.num_classes,
            "backbone": self.backbone_name,
            "output_stride": self.output_stride,
            "params": self.params.model_dump(),
        }


def build_method(
    method: str,
    num_classes: int,
    backbone: str = "resnet18",
    pretrained: str | Path | None = None,
    output_stride: int = 16,
    params: dict[str, Any] | None = None,
) -> WSOLMethod:
    """Build a registered method.

    Example:
        >>> import torch
        >>> from medwsol.methods.base import build_method
        >>> m = build_method("cam", num_classes=2)
        >>> out = m(torch.rand(1, 3, 64, 64))
        >>> tuple(out.weight_map.shape)
        (1, 1, 64, 64)
    """
    cls = METHODS.get(method)
    return cls(
        num_classes=num_classes,
        backbone=backbone,
        pretrained=pretrained,
        output_stride=output_stride,
        params=params,
    )


def normalize_map(m: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-image min-max normalisation of ``[B, 1, H, W]`` maps to [0, 1]."""
    flat = m.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(m).clamp(0, 1)


def upsample_to(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of maps to ``size`` (H, W)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
