"""CAM: class activation maps (Zhou et al., CVPR 2016) on a MONAI ResNet.

Architecture: ImageNet normalisation -> ResNet trunk (output stride 16 by
default) -> a 1x1 convolution ``fc`` with one output per class. The class
maps are ``fc(features)`` and the logits are their global average, which is
exactly "global average pooling, then a linear classifier" (the 1x1 conv *is*
the linear layer applied at every position).

Weight map: the class map of the predicted class (``params.map_class =
"predicted"``) or, when ``map_class="label"`` and ``forward`` receives
``labels``, of the true class. Following the WSOL evaluation code of Choe et
al. (CVPR 2020), no ReLU is applied: the map is min-max normalised per image
after bilinear upsampling to the input size (the order of Choe et al.'s
code), so that in every image the weakest pixel is exactly 0 and the strongest
exactly 1. The map before that normalisation is ``extras["raw_map"]``; slide
serving rescales it with one fixed range instead (``map_from_raw``).

Training loss: cross-entropy of the logits with the image label (in float32,
so it is safe under autocast).

The public feature API (``features``, ``embed``, ``classify_features``) is
stable: the learned-weight-map methods use a CAM model as their classifier f.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from medwsol.methods.backbones import ImageNetNorm, build_backbone
from medwsol.methods.base import WSOLMethod, WSOLOutput, normalize_map, upsample_to
from medwsol.methods.catalog import METHODS

__all__ = ["CAM"]


@METHODS.register("cam")
class CAM(WSOLMethod):
    """CAM classifier and localizer.

    Args:
        num_classes: number of image-level classes.
        backbone: a name in ``BACKBONES``.
        pretrained: optional local ImageNet weights for the backbone.
        output_stride: 8, 16 or 32.
        params: :class:`~medwsol.methods.catalog.CAMParams` or a dict of it.

    Example:
        >>> import torch
        >>> from medwsol.methods.base import build_method
        >>> m = build_method("cam", num_classes=2).eval()
        >>> with torch.no_grad():
        ...     out = m(torch.rand(2, 3, 70, 90))
        >>> tuple(out.logits.shape), tuple(out.weight_map.shape), tuple(out.extras["class_maps"].shape)
        ((2, 2), (2, 1, 70, 90), (2, 2, 5, 6))
    """

    name = "cam"
    normalizes_per_image = True
    supports_target_class = True

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: str | Path | None = None,
        output_stride: int = 16,
        params: BaseModel | dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes, backbone, pretrained, output_stride, params)
        self.norm = ImageNetNorm()
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
        self.feature_dim = self.backbone.out_channels
        self.fc = nn.Conv2d(self.feature_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    # -- public feature API (used by other methods as classifier f) --------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Backbone features ``[B, D, h, w]`` of RGB images in [0, 1] (normalised inside)."""
        return self.backbone(self.norm(x))

    def embed(self, x: Tensor) -> Tensor:
        """Global-average-pooled features ``[B, D]`` of RGB images in [0, 1]."""
        return self.features(x).mean(dim=(2, 3))

    def classify_features(self, feats: Tensor) -> Tensor:
        """Logits ``[B, C]`` from features ``[B, D, h, w]`` or pooled embeddings ``[B, D]``."""
        if feats.dim() == 4:
            feats = feats.mean(dim=(2, 3))
        return F.linear(feats, self.fc.weight.flatten(1), self.fc.bias)

    def class_maps(self, feats: Tensor) -> Tensor:
        """Class activation maps ``[B, C, h, w]`` (``fc`` applied at every position)."""
        return self.fc(feats)

    # -- WSOLMethod ------------------------------------------------------------------------------------------------
    def _target(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        if self.params.map_class == "label" and labels is not None:
            return labels.to(device=logits.device, dtype=torch.long).view(-1)
        return logits.argmax(dim=1)

    def forward(self, x: Tensor, labels: Tensor | None = None, target_class: int | None = None) -> WSOLOutput:
        """Logits, the CAM of the predicted (or labelled, or ``target_class``) class, and all class maps.

        Args:
            x: RGB images in [0, 1], ``[B, 3, H, W]``.
            labels: optional ``[B]`` class indices (used when ``map_class="label"``).
            target_class: when given, the map of this class for every image (slide serving).
        """
        feats = self.features(x)
        cams = self.class_maps(feats).float()
        logits = cams.mean(dim=(2, 3))
        target = self._target(logits, labels) if target_class is None else torch.full_like(
            logits[:, 0], int(target_class), dtype=torch.long)
        chosen = cams.gather(1, target.view(-1, 1, 1, 1).expand(-1, 1, *cams.shape[2:]))
        raw = upsample_to(chosen, tuple(x.shape[-2:]))
        return WSOLOutput(logits=logits, weight_map=normalize_map(raw), extras={"class_maps": cams, "raw_map": raw})

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Cross-entropy of the image-level logits with ``batch["label"]``."""
        logits = self.classify_features(self.features(batch["image"]))
        ce = F.cross_entropy(logits.float(), batch["label"].long().view(-1))
        return {"ce": ce, "total": ce}
