"""Grad-CAM (Selvaraju et al., ICCV 2017), post hoc on the CAM architecture.

The network and its training loss are CAM's (:class:`~medwsol.methods.cam.CAM`),
so a ``cam`` checkpoint's weights load into ``gradcam`` unchanged. Only the map
differs: with ``A`` the last feature map and ``y_c`` the score of the predicted
(or labelled) class,

    alpha_k = mean_{i,j} d y_c / d A_k[i, j],    map = ReLU(sum_k alpha_k A_k),

then bilinearly upsampled to the input size and min-max normalised per image.

On this architecture (GAP + linear), alpha_k = w_{c,k} / (h w), so Grad-CAM is
CAM with a ReLU (Grad-CAM's paper shows it generalises CAM); the gradient is
nevertheless computed with autograd so the definition stays true if the head
changes.

The gradient is taken with ``torch.autograd.grad`` with respect to a detached
copy of the feature map only, under ``torch.enable_grad()`` (and outside
inference mode), so ``forward`` works inside ``torch.no_grad()`` /
``torch.inference_mode()`` and never writes ``.grad`` of any parameter. The
map computation runs in float32 with autocast off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medwsol.methods.base import WSOLOutput, normalize_map, upsample_to
from medwsol.methods.cam import CAM
from medwsol.methods.catalog import METHODS

__all__ = ["GradCAM"]


@METHODS.register("gradcam")
class GradCAM(CAM):
    """Grad-CAM maps on a CAM classifier (same parameters, same loss).

    Example:
        >>> import torch
        >>> from medwsol.methods.base import build_method
        >>> m = build_method("gradcam", num_classes=2).eval()
        >>> with torch.no_grad():
        ...     out = m(torch.rand(1, 3, 64, 64))
        >>> tuple(out.weight_map.shape), all(p.grad is None for p in m.parameters())
        ((1, 1, 64, 64), True)
    """

    name = "gradcam"

    def gradcam(self, feats: Tensor, target: Tensor) -> Tensor:
        """Grad-CAM ``[B, 1, h, w]`` at feature resolution (after the ReLU, not normalised).

        Args:
            feats: feature map ``[B, D, h, w]`` (any grad mode; it is not modified).
            target: ``[B]`` class index whose score is differentiated.
        """
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(feats.device.type, enabled=False):
            a = feats.detach().float().clone().requires_grad_(True)
            logits = self.classify_features(a)
            score = logits.gather(1, target.detach().clone().view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, a)
            alpha = grad.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((alpha * a.detach()).sum(dim=1, keepdim=True))
        return cam

    def forward(self, x: Tensor, labels: Tensor | None = None, target_class: int | None = None) -> WSOLOutput:
        """Logits and the Grad-CAM of the predicted (or labelled, or ``target_class``) class."""
        feats = self.features(x)
        cams = self.class_maps(feats).float()
        logits = cams.mean(dim=(2, 3))
        target = self._target(logits, labels) if target_class is None else torch.full_like(
            logits[:, 0], int(target_class), dtype=torch.long)
        cam = self.gradcam(feats, target)
        raw = upsample_to(cam, tuple(x.shape[-2:]))
        return WSOLOutput(logits=logits, weight_map=normalize_map(raw),
                          extras={"class_maps": cams, "gradcam": cam, "raw_map": raw})
