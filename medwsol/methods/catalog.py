"""The method registry entries: name -> module, and each method's typed knobs.

This module is torch-free on purpose: ``medwsol validate`` checks
``model.method`` and ``model.params`` against these schemas in well under a
second. Adding a method = one new file in ``medwsol/methods/`` (the
``nn.Module``, decorated with ``@METHODS.register(name)``) plus one entry here
(its module and its parameter model).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medwsol.registry import Registry

__all__ = [
    "METHODS",
    "METHOD_PARAMS",
    "BACKBONES",
    "NoParams",
    "CAMParams",
    "GradCAMParams",
    "MinMaxParams",
    "WeightMapCEParams",
    "WeightMapTripletParams",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoParams(_Strict):
    """A method without knobs."""


class CAMParams(_Strict):
    """CAM (Zhou et al. 2016): ResNet features, global average pooling, linear classifier."""

    map_class: Literal["predicted", "label"] = Field(
        "predicted", description="which class's CAM is the weight map (label only when the batch has one)"
    )


class GradCAMParams(CAMParams):
    """Grad-CAM (Selvaraju et al. 2017), post hoc on the CAM classifier."""


class MinMaxParams(_Strict):
    """Min-max entropy localizer + classifier (Belharbi et al. 2019; TMI 2022).

    The defaults are medwsol's; every knob that the authors' public code sets differently is
    listed with its value there in docs/methods.md (the deviations table), and the presets
    ``pipelines/glas_2019.yaml`` / ``pipelines/glas_tmi.yaml`` set them to the authors' values.
    """

    modalities: int = Field(5, ge=1, description="WILDCAT maps per class (k in the paper's code)")
    kmax: float = Field(0.1, gt=0, le=1, description="fraction (or count if >1) of top activations pooled")
    kmin: float = Field(0.1, ge=0, le=1, description="fraction of lowest activations pooled (0: none)")
    alpha: float = Field(0.6, ge=0, description="weight of the kmin term in WILDCAT pooling")
    dropout: float = Field(0.0, ge=0, lt=1)
    sigmoid_w: float = Field(8.0, gt=0, description="pseudo-binary mask slope w (2019: 8, TMI: 5)")
    sigmoid_sigma: float = Field(0.5, gt=0, lt=1, description="pseudo-binary mask offset sigma (2019: 0.5)")
    sigma_growth: float = Field(
        0.0, ge=0, description="added to sigma after every epoch, up to sigma_max (TMI code: 0.001)")
    sigma_max: float | None = Field(
        None, gt=0, lt=1, description="cap of the growing sigma (TMI code: 0.2); default: sigmoid_sigma (no growth)")
    mask_norm: Literal["image", "batch"] = Field(
        "image", description="min-max normalisation of the localizer map in training: per image, or over the whole "
        "batch as the authors' code (2019 and TMI) does; inference is always per image")
    cls_input_scale: float = Field(
        1.0, gt=0, le=1, description="the classifier sees X+/X- bilinearly resized by this factor (2019: 0.5, TMI: 0.8)")
    view_batches: Literal["joint", "separate"] = Field(
        "joint", description="X+ and X- go through the classifier in one batch (BatchNorm statistics over both) or "
        "in two (the authors' two classify() calls)")
    fg_loss: bool = Field(True, description="CE of classifier(X+) with the label")
    bg_loss: bool = Field(True, description="CE of classifier(X-) towards the uniform distribution")
    loc_loss: bool = Field(True, description="CE of the localizer's own class scores")
    bg_weight: float = Field(1.0, ge=0, description="weight of the bg term (in nats; TMI: 1e-7 in bits = 1e-7/ln 2)")
    detach_mask: bool = Field(
        False, description="stop the fg/bg gradients from reaching the localizer (as the public 2019 code does)"
    )
    erase_steps: int = Field(0, ge=0, description="recursive erasing steps u (paper: 4; 0 disables)")
    erase_mode: Literal["current", "accumulated"] = Field(
        "current", description="what is erased before the next round: the current round's mask on every sample, or "
        "the accumulated mask on the still-trusted samples only (2019 code)")
    erase_ce_check: bool = Field(
        False, description="a round's trust also needs its CE <= the first round's CE, per sample (2019 code)")
    erase_loss: Literal["mean", "sum"] = Field(
        "mean", description="the localizer CE of the erasing rounds: their mean, or their sum (2019 code: one "
        "backward per round)")
    erase_start_epoch: int = Field(0, ge=0, description="erasing is off before this epoch (0-based; 2019 config: 1)")
    size_constraints: bool = Field(False, description="TMI absolute size constraints via extended log-barrier")
    size_mode: Literal["fraction", "nonempty_pixels"] = Field(
        "fraction", description="fraction: mean(M) >= s and mean(1-M) >= s; nonempty_pixels: sum(M) >= 0 and "
        "sum(1-M) >= 0 on raw pixel counts (TMI code)")
    size_min_fraction: float = Field(0.05, gt=0, lt=0.5, description="fg and bg must each cover at least this fraction")
    barrier_t0: float = Field(5.0, gt=0)
    barrier_growth: float = Field(1.01, ge=1.0)
    barrier_tmax: float = Field(10.0, gt=0)
    size_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.fg_loss or self.bg_loss or self.loc_loss):
            raise ValueError("every loss term is off; fix: enable at least one of fg_loss, bg_loss, loc_loss")
        if self.sigma_max is not None and self.sigma_max < self.sigmoid_sigma:
            raise ValueError(f"sigma_max {self.sigma_max} < sigmoid_sigma {self.sigmoid_sigma}; "
                             "fix: set sigma_max >= sigmoid_sigma or leave it unset")
        return self


class _WeightMapCommon(_Strict):
    unet_features: tuple[int, int, int, int, int, int] = Field(
        (16, 32, 64, 128, 256, 16), description="MONAI BasicUNet feature widths of the generator (6 positive ints)"
    )
    classifier: Literal["joint", "frozen"] = Field(
        "joint", description="train the classifier with the generator, or load it pre-trained and freeze it"
    )
    classifier_checkpoint: str | None = Field(
        None, description="checkpoint of a trained `cam` (or `gradcam`) model, same backbone and classes (frozen)"
    )
    area_weight: float = Field(1.0, ge=0, description="weight of the mean-area penalty on W (the cure for W = 1)")
    area_target: float = Field(0.0, ge=0, lt=1, description="penalise mean(W) above this fraction only")
    tv_weight: float = Field(0.3, ge=0, description="total-variation smoothness of W (stops striped adversarial maps)")
    cls_weight: float = Field(1.0, ge=0, description="weight of the classifier's CE on the plain image (joint only)")

    @model_validator(mode="after")
    def _check_common(self):
        if any(int(c) < 1 for c in self.unet_features):
            raise ValueError(f"unet_features {tuple(self.unet_features)} has a width < 1; fix: use 6 positive ints")
        if self.classifier == "frozen" and not self.classifier_checkpoint:
            raise ValueError("classifier=frozen needs classifier_checkpoint; fix: set it or use classifier=joint")
        if self.classifier == "joint" and self.cls_weight == 0:
            raise ValueError("classifier=joint with cls_weight=0 never trains the classifier; "
                             "fix: set cls_weight > 0 or use classifier=frozen with a cam checkpoint")
        return self


class WeightMapCEParams(_WeightMapCommon):
    """Learned weight map, classifier-based (Shaharabany & Wolf 2021, method B1)."""

    ce_weight: float = Field(1.0, ge=0, description="CE of f(I*W) with its target (ce_target)")
    ce_target: Literal["label", "prediction"] = Field(
        "label", description="target of CE(f(I*W)): the image label, or f's own prediction on the whole image "
        "(argmax f(I), no gradient) as the paper's 'same prediction as f(I)'")
    embed_weight: float = Field(
        1.0, ge=0, description="squared distance between f's L2-normalised embeddings of I and I*W"
    )

    @model_validator(mode="after")
    def _some_consistency_term(self):
        if self.ce_weight == 0 and self.embed_weight == 0:
            raise ValueError("ce_weight and embed_weight are both 0, so nothing tells W what to keep; "
                             "fix: set at least one > 0")
        return self


class WeightMapTripletParams(_WeightMapCommon):
    """Learned weight map, Siamese triplets (Shaharabany & Wolf 2021, method B2)."""

    area_weight: float = Field(0.3, ge=0, description="weight of the mean-area penalty on W (1.0 collapses W here)")
    margin_fg: float = Field(0.5, gt=0, description="margin of triplet (image, foreground, background); "
                             "embeddings are L2-normalised, distances in [0, 2]")
    margin_class: float = Field(0.5, gt=0, description="margin of triplet (fg, fg same class, fg other class)")
    class_weight: float = Field(1.0, ge=0, description="weight of the class-wise triplet loss")
    embedder: Literal["classifier", "siamese"] = Field(
        "classifier", description="the embedding e of the triplets: the classifier f's pooled features as a fixed "
        "function (no gradient into f), or a separate Siamese embedding network (same backbone, GAP, L2 norm) "
        "trained by the triplet losses, as the paper describes")


METHODS: Registry = Registry(
    "method",
    lazy={
        "cam": "medwsol.methods.cam",
        "gradcam": "medwsol.methods.gradcam",
        "minmax_entropy": "medwsol.methods.minmax",
        "weightmap_ce": "medwsol.methods.weightmap",
        "weightmap_triplet": "medwsol.methods.weightmap",
    },
)

METHOD_PARAMS: dict[str, type[BaseModel]] = {
    "cam": CAMParams,
    "gradcam": GradCAMParams,
    "minmax_entropy": MinMaxParams,
    "weightmap_ce": WeightMapCEParams,
    "weightmap_triplet": WeightMapTripletParams,
}

BACKBONES: Registry = Registry(
    "backbone",
    lazy={name: "medwsol.methods.backbones" for name in ("resnet18", "resnet34", "resnet50", "resnet101")},
)
