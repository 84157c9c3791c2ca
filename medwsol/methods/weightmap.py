"""Learned weight maps (Shaharabany & Wolf 2021, arXiv 2111.14131): methods B1 and B2.

A generator ``g`` (MONAI ``BasicUNet``) maps the image to a per-pixel weight map
``W = sigmoid(g(I))`` in [0, 1] at the input's full resolution; a classifier ``f``
(a :class:`~medwsol.methods.cam.CAM` model, so a trained ``cam`` checkpoint can
serve as a frozen ``f``) reads the weighted image. ``g`` is trained so that the
weighted image keeps what ``f`` needs:

* ``weightmap_ce`` (B1): cross-entropy of ``f(I*W)`` with the label plus the
  squared distance between the (L2-normalised) embeddings of ``I`` and ``I*W``.
* ``weightmap_triplet`` (B2): triplet (image, foreground, background) and a
  class-wise triplet between foreground views of the batch.

Both add an area penalty (``W`` all ones satisfies every consistency term, the
area term is what makes ``g`` choose) and a total variation of ``W`` (on by
default: without it ``g`` learns striped background patterns that fool ``f``).

Choices made where the paper is silent (no public code), see
``docs/methods.md`` (learned weight maps):

* **Masking in normalised space.** ``I*W`` means ``W * norm(I)``, i.e. in RGB
  ``mean + W * (I - mean)`` with the ImageNet mean colour: a removed pixel
  becomes the mean colour, which the normalised classifier reads as "nothing"
  (zero input), as in the min-max method.
* **f is trained on labels only.** Masked views (and the anchor ``e(I)``) go
  through ``f`` as a fixed function: its parameters receive no gradient from
  them and its batch-norm layers use their running statistics. Gradient from
  the masked views updates ``g`` only, so ``f`` cannot learn to read labels out
  of the shape of ``W`` (collusion), and batch statistics cannot cancel a
  uniform dimming of the image (with batch-stat BN, ``W = 0.2`` everywhere is
  invisible to ``f`` and the area term would be free to shrink ``W``).
* With ``classifier: joint``, ``f`` learns with ``cls_weight * CE(f(I), y)``
  on the plain image in the same step.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from pydantic import ValidationError
from torch import Tensor, nn

from medwsol.checkpoint import read_checkpoint
from medwsol.errors import CheckpointError
from medwsol.methods.backbones import IMAGENET_MEAN, ImageNetNorm, build_backbone
from medwsol.methods.base import WSOLMethod, WSOLOutput
from medwsol.methods.cam import CAM
from medwsol.methods.catalog import METHODS

__all__ = [
    "WeightMapCE",
    "WeightMapTriplet",
    "load_frozen_classifier",
    "total_variation",
    "class_triplets",
]

_MULTIPLE = 16  # BasicUNet pools 4 times
_CLASSIFIER_METHODS = ("cam", "gradcam")  # same network and weights (gradcam is post hoc on cam)


def load_frozen_classifier(
    path: str | Path, num_classes: int, backbone: str, output_stride: int
) -> CAM:
    """Load the classifier ``f`` from a trained ``cam`` checkpoint and freeze it.

    Args:
        path: a medwsol checkpoint (``checkpoints/best.pt`` of a ``cam`` or ``gradcam`` run:
            same network, same weights).
        num_classes: classes the weight-map model is built for.
        backbone: backbone name the weight-map model is built for.
        output_stride: output stride the weight-map model is built for.

    Returns:
        The CAM model, in eval mode, every parameter with ``requires_grad=False``.

    Raises:
        CheckpointError: unreadable file, another method, another backbone,
            another number of classes or output stride, or weights that do not fit.
    """
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError:
        raise
    except Exception as err:  # torch's unpickler raises e.g. IndexError on some garbage files
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err)[:120]}); "
            "fix: use checkpoints/best.pt of a medwsol cam run"
        ) from None
    desc = ckpt.get("model") or {}
    method = desc.get("method")
    if method not in _CLASSIFIER_METHODS:
        raise CheckpointError(
            f"{path}: holds a {method!r} model, expected a 'cam' classifier; "
            "fix: train model.method=cam first and set classifier_checkpoint to its checkpoints/best.pt"
        )
    if desc.get("backbone") != backbone:
        raise CheckpointError(
            f"{path}: classifier backbone is {desc.get('backbone')!r}, expected {backbone!r}; "
            f"fix: set model.backbone={desc.get('backbone')} or use a cam checkpoint trained with {backbone}"
        )
    if int(desc.get("num_classes", -1)) != num_classes:
        raise CheckpointError(
            f"{path}: classifier has {desc.get('num_classes')} classes, expected {num_classes}; "
            "fix: use a cam checkpoint trained on the same classes"
        )
    if int(desc.get("output_stride", 16)) != output_stride:
        raise CheckpointError(
            f"{path}: classifier output_stride is {desc.get('output_stride')}, expected {output_stride}; "
            f"fix: set model.output_stride={desc.get('output_stride')}"
        )
    try:
        f = CAM(num_classes=num_classes, backbone=backbone, pretrained=None, output_stride=output_stride,
                params=desc.get("params") or {})
        f.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, ValidationError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cam weights do not load ({first}); fix: use a checkpoint written by a medwsol cam run"
        ) from None
    return _freeze(f)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextmanager
def _as_fixed_function(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode with its parameters excluded from autograd.

    Gradients still flow to the module's inputs; running statistics and
    parameters stay untouched. Inside, the module computes with detached
    views of its parameters (``requires_grad`` is never toggled mid-step: DDP
    arms its gradient hooks on the same parameters in every step). Restores
    the previous mode afterwards.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    was_training = module.training
    module.eval()
    try:
        with _reparametrize_module(module, {n: p.detach() for n, p in module.named_parameters()}):
            yield
    finally:
        module.train(was_training)


def total_variation(w: Tensor) -> Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels.

    Args:
        w: maps ``[B, 1, H, W]``.

    Returns:
        A scalar: mean |dy| + mean |dx| (0 for a constant map).

    Example:
        >>> import torch
        >>> float(total_variation(torch.ones(1, 1, 4, 4)))
        0.0
    """
    dy = (w[..., 1:, :] - w[..., :-1, :]).abs().mean() if w.shape[-2] > 1 else w.new_zeros(())
    dx = (w[..., :, 1:] - w[..., :, :-1]).abs().mean() if w.shape[-1] > 1 else w.new_zeros(())
    return dy + dx


def class_triplets(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All (anchor, positive, negative) index triplets of a batch.

    A triplet is ``(i, j, k)`` with ``labels[j] == labels[i]``, ``j != i`` and
    ``labels[k] != labels[i]``. Empty tensors when the batch has no such triplet.

    Args:
        labels: ``[B]`` integer labels.

    Returns:
        Three long tensors of equal length ``T``.

    Example:
        >>> import torch
        >>> a, p, n = class_triplets(torch.tensor([0, 0, 1]))
        >>> a.tolist(), p.tolist(), n.tolist()
        ([0, 1], [1, 0], [2, 2])
    """
    y = labels.view(-1)
    same = y[:, None] == y[None, :]
    eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
    pos = same & ~eye  # [i, j]
    neg = ~same  # [i, k]
    valid = pos[:, :, None] & neg[:, None, :]  # [i, j, k]
    i, j, k = valid.nonzero(as_tuple=True)
    return i, j, k


class _WeightMapBase(WSOLMethod):
    """Generator ``g`` + classifier ``f`` shared by B1 and B2.

    Args:
        num_classes: number of image-level classes.
        backbone: backbone of ``f`` (a name in ``BACKBONES``).
        pretrained: local ImageNet weights for ``f``'s backbone (joint mode only;
            a frozen ``f`` comes whole from ``params.classifier_checkpoint``).
        output_stride: output stride of ``f``.
        params: the method's parameter model or dict.

    Attributes:
        generator: the MONAI BasicUNet ``g`` (1 output channel, logits).
        classifier: the CAM model ``f``.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: str | Path | None = None,
        output_stride: int = 16,
        params: Any = None,
    ) -> None:
        super().__init__(num_classes, backbone, pretrained, output_stride, params)
        p = self.params
        self._frozen_from: str | None = None
        self.norm = ImageNetNorm()
        self.register_buffer(
            "mask_fill", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.generator = BasicUNet(spatial_dims=2, in_channels=3, out_channels=1, features=tuple(p.unet_features))
        if p.classifier == "frozen":
            self.classifier = load_frozen_classifier(p.classifier_checkpoint, num_classes, backbone, output_stride)
            self._frozen_from = str(p.classifier_checkpoint)
        else:
            self.classifier = CAM(num_classes=num_classes, backbone=backbone, pretrained=pretrained,
                                  output_stride=output_stride)

    # ------------------------------------------------------------------ modes and checkpoints
    @property
    def frozen(self) -> bool:
        """Whether ``f`` is a frozen, pre-trained classifier."""
        return self._frozen_from is not None

    def train(self, mode: bool = True) -> "_WeightMapBase":
        """Set train/eval mode; a frozen classifier stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.classifier.eval()
        return self

    def describe(self) -> dict[str, Any]:
        """Rebuild description; a frozen ``f`` is described as ``joint`` (its weights are in the state dict).

        This keeps a trained weight-map checkpoint self-contained: rebuilding it
        does not need the classifier checkpoint file. ``extra_state`` records the
        source and :meth:`load_extra_state` freezes ``f`` again.
        """
        desc = super().describe()
        if self.frozen:
            desc["params"] = {**desc["params"], "classifier": "joint", "classifier_checkpoint": None}
        return desc

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.frozen:
            state["classifier_frozen_from"] = self._frozen_from
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        src = state.get("classifier_frozen_from")
        if src and not self.frozen:
            self._frozen_from = str(src)
            self.params = self.params.model_copy(update={"classifier": "frozen", "classifier_checkpoint": str(src)})
            _freeze(self.classifier)

    # ------------------------------------------------------------------ pieces
    def weight_map(self, x: Tensor) -> Tensor:
        """``W = sigmoid(g(norm(x)))``, float32 ``[B, 1, H, W]`` at the input's size.

        The normalised image is replicate-padded to a multiple of 16 (BasicUNet
        pools four times) and the output cropped back, so any size works.
        """
        h, w = x.shape[-2:]
        ph, pw = (-h) % _MULTIPLE, (-w) % _MULTIPLE
        z = self.norm(x)
        if ph or pw:
            z = F.pad(z, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        z = self.generator(z)
        z = z[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        return torch.sigmoid(z.float())

    def mask_image(self, x: Tensor, w: Tensor) -> Tensor:
        """``I * W`` in normalised space, returned in RGB: ``mean + w * (x - mean)``."""
        return self.mask_fill + w * (x - self.mask_fill)

    def _classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (float32) and L2-normalised embedding (float32, GAP of f's features)."""
        pooled = self.classifier.features(x).mean(dim=(2, 3))  # = f.embed(x)
        logits = self.classifier.classify_features(pooled).float()
        return logits, F.normalize(pooled.float(), dim=1)

    def forward(self, x: Tensor) -> WSOLOutput:
        """``g`` plus one pass of ``f`` on the plain image.

        Returns:
            ``WSOLOutput(logits=f(x), weight_map=W)``; no extras.
        """
        w = self.weight_map(x)
        logits = self.classifier.classify_features(self.classifier.features(x)).float()
        return WSOLOutput(logits=logits, weight_map=w.clamp(0, 1), extras={})

    def _common(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor]:
        """W, image, labels, the terms that do not involve the masked views, and their weighted sum."""
        p = self.params
        x, y = batch["image"], batch["label"].long()
        w = self.weight_map(x)
        terms: dict[str, Tensor] = {}
        total = w.new_zeros(())
        if not self.frozen and p.cls_weight > 0:
            logits, _ = self._classify(x)  # f in its own mode (train: batch-stat BN), gradient into f
            terms["cls"] = F.cross_entropy(logits, y)
            total = total + p.cls_weight * terms["cls"]
        if p.area_weight > 0:
            area = w.flatten(1).mean(dim=1)
            terms["area"] = F.relu(area - p.area_target).mean()
            total = total + p.area_weight * terms["area"]
        if p.tv_weight > 0:
            terms["tv"] = total_variation(w)
            total = total + p.tv_weight * terms["tv"]
        return w, x, y, terms, total

    def _fixed_pass(
        self, x: Tensor, views: list[Tensor]
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Tensor]:
        """Embed the plain image (no gradient) and the masked views with ``f`` as a fixed function.

        Returns:
            The anchor embedding ``e(I)``, ``(logits, embedding)`` of each view (the views share
            one batched pass of ``f``), and ``f``'s logits on the plain image (no gradient).
        """
        n = x.shape[0]
        with _as_fixed_function(self.classifier):
            with torch.no_grad():
                anchor_logits, anchor = self._classify(x)
            logits, emb = self._classify(torch.cat(views, dim=0))
        pairs = [(logits[i * n : (i + 1) * n], emb[i * n : (i + 1) * n]) for i in range(len(views))]
        return anchor, pairs, anchor_logits


@METHODS.register("weightmap_ce")
class WeightMapCE(_WeightMapBase):
    """B1: the weighted image must keep ``f``'s decision and embedding.

    Loss (terms with weight 0 are skipped; ``cls`` only with ``classifier: joint``)::

        total = ce_weight * CE(f(I*W), t)                       # "fg_ce"; t = y, or argmax f(I) (ce_target)
              + embed_weight * ||e(I) - e(I*W)||^2              # "embed", e = L2-normalised GAP features, e(I) detached
              + area_weight * relu(mean(W) - area_target)       # "area", per image, averaged
              + tv_weight * TV(W)                               # "tv"
              + cls_weight * CE(f(I), y)                        # "cls"

    The returned dict holds the unweighted terms and the weighted ``"total"``.

    Example:
        >>> import torch
        >>> from medwsol.methods.base import build_method
        >>> m = build_method("weightmap_ce", num_classes=2, params={"unet_features": (4, 4, 8, 8, 16, 4)})
        >>> tuple(m(torch.rand(1, 3, 70, 90)).weight_map.shape)
        (1, 1, 70, 90)
    """

    name = "weightmap_ce"

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        p = self.params
        w, x, y, terms, total = self._common(batch)
        e_img, [(fg_logits, e_fg)], plain_logits = self._fixed_pass(x, [self.mask_image(x, w)])
        if p.ce_weight > 0:
            target = plain_logits.argmax(dim=1) if p.ce_target == "prediction" else y
            terms["fg_ce"] = F.cross_entropy(fg_logits, target)
            total = total + p.ce_weight * terms["fg_ce"]
        if p.embed_weight > 0:
            terms["embed"] = (e_img - e_fg).pow(2).sum(dim=1).mean()
            total = total + p.embed_weight * terms["embed"]
        terms["total"] = total
        return terms


@METHODS.register("weightmap_triplet")
class WeightMapTriplet(_WeightMapBase):
    """B2: Siamese triplets on an embedding ``e`` (``f``'s pooled features, or a Siamese network).

    Loss (terms with weight 0 are skipped; ``cls`` only with ``classifier: joint``)::

        total = TripletMargin(e(I), e(I*W), e(I*(1-W)); margin_fg)          # "triplet_fg"
              + class_weight * TripletMargin(e(fg_i), e(fg_j), e(fg_k); margin_class)
                                                                             # "triplet_class": every triplet of
                                                                             # the batch with y_j = y_i (j != i),
                                                                             # y_k != y_i; 0 when there is none
              + area_weight * relu(mean(W) - area_target) + tv_weight * TV(W) + cls_weight * CE(f(I), y)

    Embeddings are L2-normalised (distances in [0, 2]). ``embedder: classifier`` (default) uses
    ``f``'s features as a fixed function with ``e(I)`` detached; ``embedder: siamese`` trains a
    separate embedding network (``self.embedder``) with the triplets (see :meth:`embed_views`).

    Example:
        >>> import torch
        >>> from medwsol.methods.base import build_method
        >>> m = build_method("weightmap_triplet", num_classes=2, params={"unet_features": (4, 4, 8, 8, 16, 4)})
        >>> sorted(m.loss({"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1])}))
        ['area', 'cls', 'total', 'triplet_class', 'triplet_fg', 'tv']
    """

    name = "weightmap_triplet"

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: str | Path | None = None,
        output_stride: int = 16,
        params: Any = None,
    ) -> None:
        super().__init__(num_classes, backbone, pretrained, output_stride, params)
        self.embedder: nn.Module | None = None
        if self.params.embedder == "siamese":
            self.embedder = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)

    def embed_views(self, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """L2-normalised embeddings of ``I``, ``I*W`` and ``I*(1-W)`` (float32, ``[B, D]`` each).

        ``embedder: classifier``: ``f``'s pooled features, ``f`` as a fixed function (eval-mode BN,
        no parameter gradient) and ``e(I)`` without gradient. ``embedder: siamese``: the three
        views go through the Siamese embedding network in one batched pass (its own mode, so
        batch-norm statistics are those of the ``3B`` views), every branch with gradient.
        """
        fg, bg = self.mask_image(x, w), self.mask_image(x, 1.0 - w)
        if self.embedder is None:
            e_img, [(_, e_fg), (_, e_bg)], _ = self._fixed_pass(x, [fg, bg])
            return e_img, e_fg, e_bg
        feats = self.embedder(self.norm(torch.cat([x, fg, bg], dim=0))).mean(dim=(2, 3))
        e = F.normalize(feats.float(), dim=1)
        n = x.shape[0]
        return e[:n], e[n : 2 * n], e[2 * n :]

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        p = self.params
        w, x, y, terms, total = self._common(batch)
        e_img, e_fg, e_bg = self.embed_views(x, w)
        terms["triplet_fg"] = F.triplet_margin_loss(e_img, e_fg, e_bg, margin=p.margin_fg)
        total = total + terms["triplet_fg"]
        if p.class_weight > 0:
            a, pos, neg = class_triplets(y)
            if len(a):
                terms["triplet_class"] = F.triplet_margin_loss(e_fg[a], e_fg[pos], e_fg[neg], margin=p.margin_class)
            else:  # no same-class partner or no other class in this batch
                terms["triplet_class"] = e_fg.new_zeros(())
            total = total + p.class_weight * terms["triplet_class"]
        terms["total"] = total
        return terms
