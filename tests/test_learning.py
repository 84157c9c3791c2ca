"""It learns: every method's map, trained briefly, localises a planted object.

Data: 32 x 32 images of a noisy grey background; class 1 images carry one 12 x 12 magenta square at a
random place (the only class evidence), class 0 images none. Each method trains with AdamW on fresh
batches of 16 (the same for every method), on a tiny 4-layer CNN registered as backbone ``tiny``
(output stride 8) so that a run takes seconds; the methods' own heads, masks, generators and losses
are the real ones. After training, τ is chosen on 8 validation positives by best IoU (the protocol's
threshold search, on a grid of 0.05) and the mean IoU of ``weight_map >= τ`` with the square is measured
on 16 other positives.

Each case states its bar, never below IoU 0.35 (an all-ones map scores 0.14, the square's area
fraction); the IoU measured with four initial seeds is given next to each case. A method whose loss
pushes the map anywhere but the evidence fails it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medwsol.methods.base import build_method
from medwsol.methods.catalog import BACKBONES

torch.set_num_threads(1)

SIZE, OBJ = 32, 12
BAR = 0.35
SMALL_UNET = (4, 4, 8, 8, 16, 4)


class TinyBackbone(nn.Module):
    """Three stride-2 3x3 conv-BN-ReLU layers and one stride-1 layer: output stride 8, 32 channels."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        layers, c = [], 3
        for w, stride in ((16, 2), (32, 2), (width, 2), (width, 1)):
            layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.out_channels = width
        self.output_stride = 8

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module", autouse=True)
def tiny_backbone():
    BACKBONES.register("tiny")(lambda pretrained=None, output_stride=8: TinyBackbone())
    yield
    BACKBONES._entries.pop("tiny", None)


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels (0, 1, 0, 1, ...) and the square's mask."""
    g = torch.Generator().manual_seed(seed)
    x = 0.35 + 0.15 * torch.rand(n, 3, SIZE, SIZE, generator=g)
    y = torch.tensor([i % 2 for i in range(n)])
    m = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    for i in range(1, n, 2):
        r, c = torch.randint(0, SIZE - OBJ + 1, (2,), generator=g).tolist()
        x[i, :, r : r + OBJ, c : c + OBJ] = torch.tensor([0.9, 0.2, 0.6]).view(3, 1, 1)
        m[i, 0, r : r + OBJ, c : c + OBJ] = True
    return x, y, m


def mean_iou(maps: torch.Tensor, masks: torch.Tensor, tau: float) -> float:
    pred = maps >= tau
    inter = (pred & masks).flatten(1).sum(1).float()
    union = (pred | masks).flatten(1).sum(1).float()
    return float((inter / union.clamp(min=1)).mean())


def train_and_score(method: str, steps: int, lr: float, params: dict | None = None, evaluate_as: str | None = None):
    torch.manual_seed(0)
    model = build_method(method, num_classes=2, backbone="tiny", output_stride=8, params=params)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        x, y, _ = planted(16, seed=1000 + step)
        model.train()
        loss = model.loss({"image": x, "label": y})["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 10 == 0:  # an "epoch" of 10 steps: log-barrier t, sigma growth, erasing start
            model.on_epoch_end((step + 1) // 10 - 1)
    if evaluate_as is not None:  # post hoc methods (Grad-CAM) on the trained weights
        other = build_method(evaluate_as, num_classes=2, backbone="tiny", output_stride=8)
        other.load_state_dict(model.state_dict())
        model = other
    model.eval()
    xv, yv, mv = planted(16, seed=7)
    xt, yt, mt = planted(32, seed=8)
    with torch.no_grad():
        wv = model(xv).weight_map[yv == 1]
        out = model(xt)
    wt, mt = out.weight_map[yt == 1], mt[yt == 1]
    taus = np.round(np.arange(0.05, 1.0, 0.05), 2)
    tau = max(taus, key=lambda t: mean_iou(wv, mv[yv == 1], float(t)))
    error = float((out.logits.argmax(1) != yt).float().mean())
    return mean_iou(wt, mt, float(tau)), error


def test_all_ones_map_is_below_the_bar():
    _, _, m = planted(32, seed=8)
    m = m[1::2]
    assert mean_iou(torch.ones_like(m, dtype=torch.float32), m, 0.5) == pytest.approx(OBJ**2 / SIZE**2)
    assert OBJ**2 / SIZE**2 < BAR


# (id, method, steps, lr, params, evaluate_as, bar). Measured IoU over torch seeds 0-3 (2026-12-02, the
# test uses seed 0) is noted per case; each bar sits about 0.05-0.2 below the worst of them.
CASES = [
    ("cam", "cam", 100, 3e-2, None, None, 0.4),  # 0.67 0.52 0.66 0.54
    ("gradcam", "cam", 100, 3e-2, None, "gradcam", 0.4),  # 0.65 0.57 0.63 0.52
    ("minmax_entropy", "minmax_entropy", 60, 1e-2, None, None, 0.35),  # 0.57 0.65 0.67 0.47
    # the TMI preset's model.params (pipelines/glas_tmi.yaml), bg term at 1e-7 included: 0.44 0.54 0.40 0.58
    ("minmax_tmi_knobs", "minmax_entropy", 100, 3e-3,
     {"mask_norm": "batch", "cls_input_scale": 0.8, "size_constraints": True, "size_mode": "nonempty_pixels",
      "sigmoid_w": 5.0, "sigmoid_sigma": 0.15, "sigma_growth": 0.001, "sigma_max": 0.2, "bg_weight": 1e-7 / math.log(2),
      "kmax": 0.3, "kmin": 0.0, "dropout": 0.1}, None, 0.35),
    # the 2019 preset's mechanisms (batch-normalised, detached mask, input scale 0.5, 3 erasing rounds as the
    # 2019 code); its head settings (kmax 0.09 = one position of this 4 x 4 map, dropout 0.75) are too coarse for
    # a 32-px toy and stay at the defaults here: 0.53 0.60 0.61 0.54
    ("minmax_2019_knobs", "minmax_entropy", 60, 1e-2,
     {"mask_norm": "batch", "cls_input_scale": 0.5, "detach_mask": True, "erase_steps": 3, "erase_mode": "accumulated",
      "erase_ce_check": True, "erase_loss": "sum", "erase_start_epoch": 1}, None, 0.4),
    ("weightmap_ce", "weightmap_ce", 40, 5e-3, {"unet_features": SMALL_UNET}, None, 0.6),  # 0.88 0.97 0.84 -
    ("weightmap_ce_own_prediction", "weightmap_ce", 40, 5e-3,
     {"unet_features": SMALL_UNET, "ce_target": "prediction"}, None, 0.6),  # 0.88 0.97 0.84 -
    ("weightmap_triplet", "weightmap_triplet", 40, 5e-3, {"unet_features": SMALL_UNET}, None, 0.6),  # 0.83 0.90 0.84 -
    # a trained Siamese embedder needs a firmer area term: at B2's default 0.3 one seed in four kept W ~ 1
    # (IoU 0.14, the all-ones value); at 1.0: 0.75 0.82 0.62 0.73
    ("weightmap_triplet_siamese", "weightmap_triplet", 40, 5e-3,
     {"unet_features": SMALL_UNET, "embedder": "siamese", "area_weight": 1.0}, None, 0.5),
]


@pytest.mark.parametrize(("method", "steps", "lr", "params", "evaluate_as", "bar"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_map_localises_the_planted_square(method, steps, lr, params, evaluate_as, bar):
    assert bar >= BAR
    iou, error = train_and_score(method, steps, lr, params, evaluate_as)
    assert iou >= bar, f"IoU {iou:.3f} < {bar} (all-ones map: {OBJ**2 / SIZE**2:.3f}); classification error {error:.2f}"


def test_every_registered_method_has_a_learning_case():
    from medwsol.methods.catalog import METHODS

    covered = {c[5] or c[1] for c in CASES}
    assert set(METHODS.names()) <= covered, sorted(set(METHODS.names()) - covered)
