"""Min-max entropy localizer + classifier (Belharbi et al. 2019, arXiv 1907.12934; TMI 2022).

Every part is switchable from :class:`~medwsol.methods.catalog.MinMaxParams`.

Architecture (as the public code): one shared ResNet trunk and two WILDCAT
heads of identical shape, the *localizer* head and the *classifier* head. A
head is a 1x1 conv to ``C * modalities`` maps, averaged over the modalities
into ``C`` class maps, and spatially pooled into class scores by
``mean(top kmax activations) + alpha * mean(bottom kmin activations)``
(``kmax``/``kmin`` are fractions of the map's positions; ``kmin=0`` or
``alpha=0`` drops the second term). WILDCAT's reference code divides the sum
by 2, a constant scale the 1x1 conv absorbs; the 2019 public code computes the
kmin term but (by a missing assignment) never adds it. Head dropout
(``dropout``) is applied to the selected activations, as in the public code.

Mask: ``m = sum_c softmax(localizer scores)_c * localizer class map_c``,
bilinearly upsampled to the input size (``extras["raw_map"]``), min-max
normalised per image (``extras["norm_map"]``; in training over the whole batch
with ``mask_norm="batch"``, as the authors' ``get_pseudo_binary_mask``), then the
pseudo-binary ``M = sigmoid(w (m - sigma))`` (``sigmoid_w``, ``sigmoid_sigma``;
defaults are the 2019 paper's w=8, sigma=0.5; TMI used w=5, sigma 0.15 growing by
``sigma_growth`` per epoch up to ``sigma_max``, 0.2). ``M`` is the
``weight_map`` (so thresholding at 0.5 is thresholding ``norm_map`` at sigma).

Foreground/background: the images are masked in ImageNet-normalised space,
``X+ = x_norm * M`` and ``X- = x_norm * (1 - M)``, so erased pixels take the
dataset mean colour. X+ and X- go through the shared trunk and the classifier
head in one batch (BatchNorm sees both; ``view_batches="separate"``: two
passes, as the authors' code), resized by ``cls_input_scale`` first (2019: 0.5,
TMI: 0.8, ``align_corners=True`` as theirs).

Losses (``loss(batch)`` returns each active term, already weighted, and
``"total"`` = their sum; all in float32):

* ``fg`` (``fg_loss``): CE(classifier(X+), y) - low entropy on the relevant region.
* ``bg`` (``bg_loss``, weight ``bg_weight``): CE(classifier(X-), uniform) =
  mean over classes of ``-log softmax`` - high entropy on the rest.
* ``loc`` (``loc_loss``): CE of the localizer's own scores with y (the mean
  over the erasing rounds when erasing is on; their sum with
  ``erase_loss="sum"``, as the 2019 code's one backward per round).
* ``size`` (``size_constraints``, weight ``size_weight``): TMI's absolute size
  constraints: the foreground area ``mean(M)`` and the background area
  ``mean(1 - M)`` must each be >= ``size_min_fraction``
  (``size_mode="nonempty_pixels"``: TMI's code, ``sum(M) >= 0`` and
  ``sum(1 - M) >= 0`` on pixel counts); each constraint
  ``z <= 0`` (e.g. ``z = size_min_fraction - area``) is penalised by the extended
  log-barrier of Kervadec et al. (:func:`extended_log_barrier`), whose ``t``
  starts at ``barrier_t0``, is multiplied by ``barrier_growth`` at every
  ``on_epoch_end`` and capped at ``barrier_tmax`` (TMI: 5, x1.01, 10). ``t``
  is saved by ``extra_state`` so that a resumed run continues the schedule.

By default the fg/bg losses back-propagate through M into the localizer (the
paper's idea: the localizer is driven by the classifier's entropies);
``detach_mask=True`` reproduces the 2019 public code, where M is detached and
the localizer learns from its own CE (and the size term) only. Note that
without size constraints an all-ones mask satisfies both fg and bg terms;
the min-max normalisation (some pixel is always 0) and the size constraints
are what prevent it.

Recursive erasing (``erase_steps = u > 0``, training only, in ``loss``, from
epoch ``erase_start_epoch``): the localizer runs ``u`` rounds (counted as in the
public code, so ``u=1`` only trust-weights the first mask): at round ``s`` it
localizes ``M_s`` on the current image, the trust of each sample is
``exp(-s/10) * [localizer prediction correct] * p_max`` and is 0 forever once
the sample has been mispredicted (``erase_ce_check``: also 0 when the round's
CE exceeds the first round's, as the 2019 code), the accumulated mask is
``m_acc = max(m_acc, trust * M_s)``, and the found region is erased from the
image: ``x <- x * (1 - M_s)`` (``erase_mode="current"``) or, as the 2019 code,
``x <- x * (1 - m_acc)`` on the trusted samples only (``"accumulated"``);
detached, erased pixels = mean colour. X+/X- and the size term use ``m_acc``.
The loop stops early when every sample is untrusted.

Prediction: ``forward(x).logits`` are the classifier's scores on X+ (the
paper's prediction); with ``fg_loss=False`` the classifier head is never
trained on X+, so the localizer's scores are returned instead.

Ablation rows (TMI Table / 2019 paper):

* FG only: ``bg_loss=False``;  FG+BG: defaults;  +size: ``size_constraints=True``;
* erasing on/off: ``erase_steps=4`` / ``erase_steps=0``;
* no localizer CE: ``loc_loss=False``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from medwsol.methods.backbones import ImageNetNorm, build_backbone
from medwsol.methods.base import WSOLMethod, WSOLOutput, normalize_map, rescale, upsample_to
from medwsol.methods.catalog import METHODS

__all__ = [
    "MinMaxEntropy",
    "WildcatHead",
    "wildcat_pool",
    "extended_log_barrier",
    "erasing_trust",
    "ErasingResult",
    "ERASE_DECAY",
]

ERASE_DECAY = 10.0
"""Trust decay of the erasing rounds: ``exp(-round / ERASE_DECAY)`` (public code's ``sigma_erase``)."""


def _count(k: float, n: int, at_least_one: bool) -> int:
    if k <= 0:
        return 0
    count = int(k) if k > 1 else int(round(k * n))
    count = min(n, count)
    return max(1, count) if at_least_one else count


def wildcat_pool(
    maps: Tensor, kmax: float, kmin: float, alpha: float, dropout: float = 0.0, training: bool = False
) -> Tensor:
    """WILDCAT spatial pooling of class maps ``[B, C, h, w]`` into scores ``[B, C]`` (float32).

    ``score = mean(top-kmax) + alpha * mean(bottom-kmin)``; ``kmax``/``kmin`` in (0, 1]
    are fractions of the ``h*w`` positions (at least one for kmax), values > 1 counts.

    Example:
        >>> import torch
        >>> from medwsol.methods.minmax import wildcat_pool
        >>> m = torch.arange(10.0).view(1, 1, 2, 5)
        >>> wildcat_pool(m, kmax=0.2, kmin=0.2, alpha=0.5).tolist()
        [[8.75]]
    """
    b, c, h, w = maps.shape
    n = h * w
    flat = maps.float().reshape(b, c, n)
    top = flat.topk(_count(kmax, n, True), dim=-1).values
    if dropout > 0:
        top = F.dropout(top, dropout, training)
    scores = top.mean(dim=-1)
    k_lo = _count(kmin, n, False)
    if k_lo > 0 and alpha != 0:
        low = flat.topk(k_lo, dim=-1, largest=False).values
        if dropout > 0:
            low = F.dropout(low, dropout, training)
        scores = scores + alpha * low.mean(dim=-1)
    return scores


class WildcatHead(nn.Module):
    """Class-wise pooling head: 1x1 conv to ``C*modalities`` maps, modality mean, WILDCAT pooling.

    ``forward(feats) -> (scores [B, C] float32, class maps [B, C, h, w] float32)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        modalities: int,
        kmax: float,
        kmin: float,
        alpha: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.modalities = modalities
        self.kmax, self.kmin, self.alpha, self.dropout = kmax, kmin, alpha, dropout
        self.conv = nn.Conv2d(in_channels, num_classes * modalities, kernel_size=1)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        maps = self.conv(feats).float()
        b, _, h, w = maps.shape
        maps = maps.reshape(b, self.num_classes, self.modalities, h, w).mean(dim=2)
        scores = wildcat_pool(maps, self.kmax, self.kmin, self.alpha, self.dropout, self.training)
        return scores, maps


def extended_log_barrier(z: Tensor, t: float) -> Tensor:
    """Extended log-barrier (Kervadec et al. 2019) of the constraint ``z <= 0``.

    ``psi_t(z) = -(1/t) log(-z)`` if ``z <= -1/t**2``, else ``t z - (1/t) log(1/t**2) + 1/t``
    (continuous and differentiable at the junction; finite for every z).

    Example:
        >>> import torch
        >>> from medwsol.methods.minmax import extended_log_barrier
        >>> round(float(extended_log_barrier(torch.tensor(-0.5), 5.0)), 6)
        0.138629
    """
    z = z.float()
    thr = -1.0 / (t * t)
    inside = -torch.log(-torch.clamp(z, max=thr)) / t
    outside = t * z - math.log(1.0 / (t * t)) / t + 1.0 / t
    return torch.where(z <= thr, inside, outside)


def erasing_trust(
    probs: Tensor, labels: Tensor, step: int, alive: Tensor, decay: float = ERASE_DECAY
) -> tuple[Tensor, Tensor]:
    """Trust of each sample at an erasing round, and the updated "never mispredicted" flags.

    ``trust = exp(-step/decay) * [argmax probs == label] * max probs``, and 0 for a
    sample that was mispredicted at any earlier round (``alive`` False).

    Args:
        probs: ``[B, C]`` class probabilities of the localizer.
        labels: ``[B]`` true classes.
        step: the round index (0 for the first localization).
        alive: ``[B]`` bool, True while the sample has never been mispredicted.

    Returns:
        ``(trust [B] float32, alive [B] bool)``.
    """
    p_max, pred = probs.detach().float().max(dim=1)
    alive = alive & (pred == labels)
    trust = math.exp(-step / decay) * alive.float() * p_max
    return trust, alive


class ErasingResult(NamedTuple):
    """What :meth:`MinMaxEntropy.recursive_mask` returns."""

    mask: Tensor  # accumulated pseudo-binary mask [B, 1, H, W]
    loc_loss: Tensor  # localizer CE, mean over the rounds run
    trust: Tensor  # [rounds run, B]


@METHODS.register("minmax_entropy")
class MinMaxEntropy(WSOLMethod):
    """Min-max entropy localizer + classifier (see the module docstring for every choice).

    Args:
        num_classes: number of image-level classes.
        backbone: a name in ``BACKBONES`` (shared by localizer and classifier).
        pretrained: optional local ImageNet weights for the backbone.
        output_stride: 8, 16 or 32.
        params: :class:`~medwsol.methods.catalog.MinMaxParams` or a dict of it.

    Example:
        >>> import torch
        >>> from medwsol.methods.base import build_method
        >>> m = build_method("minmax_entropy", num_classes=2, params={"erase_steps": 2, "size_constraints": True})
        >>> batch = {"image": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1])}
        >>> sorted(m.loss(batch))
        ['bg', 'fg', 'loc', 'size', 'total']
        >>> out = m.eval()(torch.rand(1, 3, 70, 90))
        >>> tuple(out.weight_map.shape), sorted(out.extras)
        ((1, 1, 70, 90), ['loc_logits', 'norm_map', 'raw_map'])
    """

    name = "minmax_entropy"
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
        p = self.params
        self.norm = ImageNetNorm()
        self.backbone = build_backbone(backbone, pretrained=pretrained, output_stride=output_stride)
        d = self.backbone.out_channels
        head = dict(modalities=p.modalities, kmax=p.kmax, kmin=p.kmin, alpha=p.alpha, dropout=p.dropout)
        self.loc_head = WildcatHead(d, num_classes, **head)
        self.cls_head = WildcatHead(d, num_classes, **head)
        self.barrier_t = float(min(p.barrier_t0, p.barrier_tmax))
        self.sigma = float(p.sigmoid_sigma)

    # -- building blocks ------------------------------------------------------------------------------------------
    def localize_raw(self, xn: Tensor) -> tuple[Tensor, Tensor]:
        """Localizer scores ``[B, C]`` and the un-normalised mixture map ``[B, 1, H, W]`` at input size.

        Args:
            xn: ImageNet-normalised images.
        """
        scores, maps = self.loc_head(self.backbone(xn))
        return scores, self._mixture(scores, maps, tuple(xn.shape[-2:]))

    @staticmethod
    def _mixture(scores: Tensor, maps: Tensor, size: tuple[int, int], target_class: int | None = None) -> Tensor:
        """``sum_c softmax(scores)_c * map_c`` (or ``map_target``), upsampled to ``size``."""
        if target_class is not None:
            return upsample_to(maps[:, int(target_class) : int(target_class) + 1], size)
        probs = torch.softmax(scores, dim=1)
        return upsample_to((probs[:, :, None, None] * maps).sum(dim=1, keepdim=True), size)

    def localize(self, xn: Tensor, norm: str = "image") -> tuple[Tensor, Tensor]:
        """Localizer scores ``[B, C]`` and the min-max normalised map ``[B, 1, H, W]`` in [0, 1].

        Args:
            xn: ImageNet-normalised images.
            norm: ``"image"`` (min-max per image) or ``"batch"`` (one min and max over the
                whole batch, as the authors' ``get_pseudo_binary_mask``; training only).
        """
        scores, raw = self.localize_raw(xn)
        if norm == "batch":
            return scores, rescale(raw, raw.min(), raw.max())
        return scores, normalize_map(raw)

    def map_from_raw(self, raw: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
        """The pseudo-binary mask of the mixture map rescaled with ``[lo, hi]``."""
        return self.pseudo_binary(rescale(raw, lo, hi))

    def pseudo_binary(self, raw: Tensor) -> Tensor:
        """``sigmoid(w (raw - sigma))`` (``sigma`` grows per epoch when ``sigma_growth > 0``)."""
        return torch.sigmoid(self.params.sigmoid_w * (raw - self.sigma))

    def classify(self, xn: Tensor) -> Tensor:
        """Classifier-head scores ``[B, C]`` of (masked) normalised images.

        With ``cls_input_scale < 1`` the images are first resized bilinearly to
        ``int(H * scale) x int(W * scale)`` (``align_corners=True``), as the authors' ``classify``.
        """
        s = self.params.cls_input_scale
        if s != 1.0:
            h, w = xn.shape[-2:]
            xn = F.interpolate(xn, size=(max(1, int(h * s)), max(1, int(w * s))), mode="bilinear",
                               align_corners=True)
        return self.cls_head(self.backbone(xn))[0]

    def recursive_mask(self, xn: Tensor, labels: Tensor, norm: str = "image") -> ErasingResult:
        """Recursive erasing: accumulate trust-weighted masks over ``erase_steps`` rounds.

        ``erase_mode``, ``erase_ce_check`` and ``erase_loss`` select between medwsol's defaults and
        the 2019 code (``deepmil/train.py``, ``train_one_epoch``): erase the accumulated mask on the
        trusted samples only, require each round's per-sample CE to stay <= the first round's, and
        sum the rounds' localizer CE.
        """
        p = self.params
        labels = labels.long().view(-1)
        rounds = max(1, p.erase_steps)
        alive = torch.ones_like(labels, dtype=torch.bool)
        m_acc: Tensor | None = None
        first_ce: Tensor | None = None
        losses, trusts = [], []
        x_cur = xn
        for step in range(rounds):
            scores, raw = self.localize(x_cur, norm)
            mask = self.pseudo_binary(raw)
            ce = F.cross_entropy(scores.float(), labels, reduction="none")
            losses.append(ce.mean())
            trust, alive = erasing_trust(torch.softmax(scores.detach(), dim=1), labels, step, alive)
            if p.erase_ce_check:
                first_ce = ce.detach() if first_ce is None else first_ce
                trust = trust * (ce.detach() <= first_ce).float()
            trusts.append(trust)
            weighted = trust.view(-1, 1, 1, 1) * mask
            m_acc = weighted if m_acc is None else torch.maximum(m_acc, weighted)
            if step + 1 < rounds:
                if not bool(alive.any()):
                    break
                if p.erase_mode == "accumulated":
                    keep = (trust != 0).float().view(-1, 1, 1, 1)
                    x_cur = x_cur * (1 - m_acc.detach()) * keep + x_cur * (1 - keep)
                else:
                    x_cur = x_cur * (1 - mask.detach())
        stacked = torch.stack(losses)
        loc = stacked.sum() if p.erase_loss == "sum" else stacked.mean()
        return ErasingResult(m_acc, loc, torch.stack(trusts))

    # -- WSOLMethod -----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, labels: Tensor | None = None, target_class: int | None = None) -> WSOLOutput:
        """Prediction on X+ and the localizer's pseudo-binary mask (no erasing at inference).

        Args:
            x: RGB images in [0, 1], ``[B, 3, H, W]``.
            labels: unused (accepted for a uniform call signature).
            target_class: when given, the weight map (and ``raw_map``) is the localizer's map of this
                class instead of the probability mixture; the logits are the usual ones.
        """
        xn = self.norm(x)
        size = tuple(xn.shape[-2:])
        loc_scores, maps = self.loc_head(self.backbone(xn))
        raw = self._mixture(loc_scores, maps, size)
        norm = normalize_map(raw)
        mask = self.pseudo_binary(norm)
        logits = self.classify(xn * mask) if self.params.fg_loss else loc_scores
        if target_class is not None:
            raw = self._mixture(loc_scores, maps, size, target_class)
            norm = normalize_map(raw)
            mask = self.pseudo_binary(norm)
        return WSOLOutput(logits=logits, weight_map=mask,
                          extras={"loc_logits": loc_scores, "raw_map": raw, "norm_map": norm})

    def erasing_active(self) -> bool:
        """Whether this epoch trains with recursive erasing (``erase_steps > 0`` from ``erase_start_epoch``)."""
        return self.params.erase_steps > 0 and self.epoch >= self.params.erase_start_epoch

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every active term (``fg``, ``bg``, ``loc``, ``size``), weighted, and their sum ``total``."""
        p = self.params
        y = batch["label"].long().view(-1)
        xn = self.norm(batch["image"])
        if self.erasing_active():
            mask, loc_ce, _ = self.recursive_mask(xn, y, p.mask_norm)
        else:
            loc_scores, raw = self.localize(xn, p.mask_norm)
            mask = self.pseudo_binary(raw)
            loc_ce = F.cross_entropy(loc_scores.float(), y)
        used = mask.detach() if p.detach_mask else mask
        terms: dict[str, Tensor] = {}
        parts = ([xn * used] if p.fg_loss else []) + ([xn * (1 - used)] if p.bg_loss else [])
        if parts:
            if len(parts) == 1:
                scores = self.classify(parts[0])
            elif p.view_batches == "separate":  # two passes, as the authors' classify(x_pos); classify(x_neg)
                scores = torch.cat([self.classify(v) for v in parts])
            else:
                scores = self.classify(torch.cat(parts))
            chunks = scores.split(xn.shape[0])
            if p.fg_loss:
                terms["fg"] = F.cross_entropy(chunks[0], y)
            if p.bg_loss:
                neg = chunks[-1]
                terms["bg"] = p.bg_weight * (-torch.log_softmax(neg, dim=1).mean(dim=1)).mean()
        if p.loc_loss:
            terms["loc"] = loc_ce
        if p.size_constraints:
            flat = mask.float().flatten(1)
            if p.size_mode == "nonempty_pixels":  # TMI: -sum(M) <= 0 and -sum(1 - M) <= 0, pixel counts
                fg_z, bg_z = -flat.sum(dim=1), -(1 - flat).sum(dim=1)
            else:  # mean(M) >= s and mean(1 - M) >= s
                fg_area = flat.mean(dim=1)
                fg_z, bg_z = p.size_min_fraction - fg_area, p.size_min_fraction - (1 - fg_area)
            barrier = extended_log_barrier(fg_z, self.barrier_t) + extended_log_barrier(bg_z, self.barrier_t)
            terms["size"] = p.size_weight * barrier.mean()
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms

    def on_epoch_end(self, epoch: int) -> None:
        """Advance the epoch counter, grow the log-barrier ``t`` (capped at ``barrier_tmax``) and ``sigma``."""
        super().on_epoch_end(epoch)
        p = self.params
        self.barrier_t = float(min(self.barrier_t * p.barrier_growth, p.barrier_tmax))
        if p.sigma_growth > 0:
            cap = p.sigma_max if p.sigma_max is not None else p.sigmoid_sigma
            self.sigma = float(min(self.sigma + p.sigma_growth, cap))

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "barrier_t": self.barrier_t, "sigma": self.sigma}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if "barrier_t" in state:
            self.barrier_t = float(state["barrier_t"])
        if "sigma" in state:
            self.sigma = float(state["sigma"])
