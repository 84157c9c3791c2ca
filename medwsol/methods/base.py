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

__all__ = ["WSOLOutput", "WSOLMethod", "build_method", "normalize_map", "rescale", "upsample_to"]


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
    #: True when ``weight_map`` is ``map_from_raw(extras["raw_map"])`` with the *image's own* min and max
    #: (CAM, Grad-CAM, min-max entropy: the evaluation protocol's per-image normalisation). A slide
    #: heatmap must not rescale tile by tile, so the model package stores one fixed range fitted on
    #: validation and serving calls :meth:`map_from_raw` with it (``medwsol.engine.served``).
    normalizes_per_image: ClassVar[bool] = False
    #: True when ``forward(x, target_class=c)`` returns the map of class ``c`` (CAM, Grad-CAM, min-max
    #: entropy) instead of the predicted class's (or the probability mixture's); the logits are unchanged.
    #: A slide heatmap of "tumour evidence" serves the positive class's map (``calibration.map_class``).
    supports_target_class: ClassVar[bool] = False

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

    def map_from_raw(self, raw: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
        """The weight map from the un-normalised score map ``raw`` with the range ``[lo, hi]``.

        ``forward`` uses each image's own min and max (so ``weight_map`` is exactly
        ``map_from_raw(raw, raw.min(), raw.max())`` per image); serving uses one fixed range.
        Methods whose map is not a rescaled score (``normalizes_per_image = False``) never call it.
        """
        return rescale(raw, lo, hi)

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


def rescale(m: Tensor, lo: Tensor | float, hi: Tensor | float, eps: float = 1e-6) -> Tensor:
    """``clamp((m - lo) / (hi - lo + eps), 0, 1)``: the one map transform, per image or fixed."""
    return ((m - lo) / (hi - lo + eps)).clamp(0, 1)


def normalize_map(m: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-image min-max normalisation of ``[B, 1, H, W]`` maps to [0, 1]."""
    flat = m.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return rescale(flat, lo, hi, eps).view_as(m)


def upsample_to(m: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of maps to ``size`` (H, W)."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
