"""What a model package serves, and how its calibration is fitted.

:class:`ServedModel` wraps a method's network with the package's calibration, so that every
consumer (slide inference, ``medwsol evaluate`` of a registered model, the MLflow pyfunc, ONNX
export) computes the same three outputs from RGB tiles in [0, 1]:

* ``probs`` ``[B, C]``: softmax of the logits;
* ``weight`` ``[B, 1, H, W]``: the weight map. For methods that normalise per image (CAM,
  Grad-CAM, min-max entropy: ``normalizes_per_image``) it is ``map_from_raw(raw_map, lo, hi)`` with
  **one fixed range** ``[lo, hi]`` fitted on validation images (:func:`fit_map_range`) - never the
  tile's own min and max, which would put a pixel at 1.0 in every tile of a slide;
* ``score`` ``[B, 1, H, W]``: what slide heatmaps store and ``tau`` thresholds: ``weight``, or
  ``weight * probs[:, positive]`` (``weight_x_prob``).

``tau`` is chosen on that very score (:func:`choose_tau`, best mIoU on the pixel-labelled
validation images), so the threshold a pathologist sees applied is the one validation measured.

Example:
    >>> import torch
    >>> from medwsol.methods.base import build_method
    >>> from medwsol.engine.served import ServedModel
    >>> net = build_method("cam", num_classes=2).eval()
    >>> served = ServedModel(net, ["normal", "tumour"], "tumour", "weight_x_prob", map_range=(0.0, 1.0), tau=0.4)
    >>> probs, weight, score = served(torch.rand(2, 3, 64, 64))
    >>> tuple(probs.shape), tuple(score.shape)
    ((2, 2), (2, 1, 64, 64))
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ServedModel", "served_from_package", "fit_map_range", "choose_tau", "SCORES"]

SCORES = ("weight", "weight_x_prob")


class ServedModel(nn.Module):
    """A network plus its calibration: ``forward(x) -> (probs, weight, score)`` (float32).

    Args:
        network: a ``WSOLMethod`` (or any module returning ``WSOLOutput``).
        classes: class names in logit order.
        positive_class: one of ``classes``.
        score: ``"weight"`` or ``"weight_x_prob"``.
        map_range: ``(lo, hi)`` of the fixed map transform, or None (use ``weight_map`` as it is:
            methods whose map is not rescaled per image, or modules without ``map_from_raw``).
        tau: threshold on ``score``.
        tau_source: where ``tau`` came from (printed and recorded).
        digest: the package digest (None for an unpackaged network).
        map_class: ``"predicted"`` (the method's own map: predicted class, probability mixture) or
            ``"positive"`` (the positive class's map for every tile, when the network supports
            ``target_class``: a tumour-evidence map that does not switch class from tile to tile).
    """

    def __init__(
        self,
        network: nn.Module,
        classes: Sequence[str],
        positive_class: str,
        score: str = "weight",
        map_range: Sequence[float] | None = None,
        tau: float = 0.5,
        tau_source: str = "default 0.5",
        digest: str | None = None,
        map_class: str = "predicted",
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score {score!r}: use one of {SCORES}")
        if positive_class not in classes:
            raise ValueError(f"positive class {positive_class!r} is not one of {list(classes)}")
        self.network = network
        self.classes = list(classes)
        self.positive_class = positive_class
        self.positive = self.classes.index(positive_class)
        self.score_mode = score
        self.map_range = None if map_range is None else (float(map_range[0]), float(map_range[1]))
        self.tau = float(tau)
        self.tau_source = tau_source
        self.digest = digest
        self.map_class = map_class
        #: class whose map is served (None: the network's own choice)
        self.target_class = (self.positive if map_class == "positive"
                             and getattr(network, "supports_target_class", False) else None)

    def describe(self) -> dict[str, Any]:
        desc = self.network.describe() if hasattr(self.network, "describe") else {"class": type(self.network).__name__}
        return {**desc, "digest": self.digest, "score": self.score_mode, "map_range": self.map_range,
                "map_class": self.map_class, "positive_class": self.positive_class}

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.serve(self.run_network(x))

    def run_network(self, x: Tensor):
        """The network's ``WSOLOutput`` for the served map class."""
        if self.target_class is None:
            return self.network(x)
        return self.network(x, target_class=self.target_class)

    def serve(self, out) -> tuple[Tensor, Tensor, Tensor]:
        """``(probs, weight, score)`` from the network's ``WSOLOutput`` (one forward pass serves both views)."""
        probs = torch.softmax(out.logits.float(), dim=1)
        raw = out.extras.get("raw_map") if self.map_range is not None else None
        if raw is not None and hasattr(self.network, "map_from_raw"):
            lo, hi = self.map_range
            weight = self.network.map_from_raw(raw.float(), lo, hi)
        else:
            weight = out.weight_map.float()
        weight = weight.clamp(0, 1)
        if self.score_mode == "weight_x_prob":
            score = weight * probs[:, self.positive].view(-1, 1, 1, 1)
        else:
            score = weight
        return probs, weight, score


def served_from_package(pkg, score: str | None = None, positive_class: str | None = None,
                        tau: float | None = None, tau_source: str | None = None) -> ServedModel:
    """The :class:`ServedModel` of a loaded :class:`medwsol.package.Package` (optionally overridden)."""
    cal = pkg.calibration
    return ServedModel(
        pkg.network, pkg.classes, positive_class or pkg.meta["positive_class"], score or cal["score"],
        map_range=cal.get("map_range"), tau=float(cal["tau"]) if tau is None else float(tau),
        tau_source=tau_source or f"package {pkg.source} ({cal.get('tau_chosen_on', 'calibration')})",
        digest=pkg.digest, map_class=cal.get("map_class", "predicted"),
    )


@torch.no_grad()
def fit_map_range(network: nn.Module, batches: Iterable[dict], device: torch.device,
                  target_class: int | None = None) -> dict[str, Any] | None:
    """The fixed ``[lo, hi]`` that replaces per-image min-max normalisation when serving.

    ``lo`` and ``hi`` are the medians, over the images, of each image's raw-map minimum and
    maximum (over the image itself, padding excluded): the per-image transform of a typical
    validation image, frozen. None when the network does not normalise per image (its
    ``weight_map`` is served as it is).

    Args:
        network: a ``WSOLMethod``.
        batches: dicts with ``image`` ``[B, 3, H, W]`` in [0, 1] and ``size`` ``[B, 2]`` (the unpadded
            height and width), as the evaluation loader makes them.
        device: where to run.
        target_class: fit the range of this class's map (``ServedModel.target_class``).
    """
    if not getattr(network, "normalizes_per_image", False):
        return None
    network.eval()
    mins, maxs = [], []
    for b in batches:
        x = b["image"].to(device)
        out = network(x) if target_class is None else network(x, target_class=target_class)
        raw = out.extras["raw_map"].float()
        for i, (h, w) in enumerate(b["size"].tolist()):
            r = raw[i, :, :h, :w]
            mins.append(float(r.min()))
            maxs.append(float(r.max()))
    if not mins:
        return None
    lo, hi = float(np.median(mins)), float(np.median(maxs))
    if not hi > lo:
        hi = lo + 1e-3
    return {"map_range": [lo, hi], "n_images": len(mins)}


def choose_tau(results: Iterable[dict[str, Any]], n_bins: int = 1000) -> dict[str, float]:
    """Best-mIoU threshold (and PxAP, Dice at it) of served scores over pixel-labelled images.

    Args:
        results: dicts with ``map`` (the served score, HxW in [0, 1]) and ``mask`` (HxW bool).
        n_bins: threshold step ``1 / n_bins``.
    """
    from medwsol.metrics import PixelPR

    pr = PixelPR(n_bins=n_bins)
    n = 0
    for r in results:
        if r.get("mask") is not None:
            pr.update(np.asarray(r["map"]), np.asarray(r["mask"]))
            n += 1
    if n == 0:
        return {"tau": 0.5, "miou": float("nan"), "pxap": float("nan"), "dice": float("nan"), "n": 0}
    tau, miou = pr.best_threshold("miou")
    return {"tau": float(tau), "miou": 100.0 * float(miou), "pxap": 100.0 * pr.pxap(),
            "dice": 100.0 * float(pr.dice_at(tau)[0]), "n": n}
