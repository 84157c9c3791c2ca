"""Every registered method honours the WSOLOutput seam; CAM, Grad-CAM and min-max specifics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from medwsol.checkpoint import model_from_checkpoint, write_checkpoint
from medwsol.methods.base import WSOLMethod, build_method, normalize_map, upsample_to
from medwsol.methods.catalog import METHODS

torch.set_num_threads(1)

ALL = METHODS.names()
SIZES = [(64, 64), (70, 90)]


def make(name: str, **params) -> WSOLMethod:
    """Build a method with default params (a registered method whose module is missing fails here)."""
    torch.manual_seed(0)
    return build_method(name, num_classes=2, params=params or None)


def test_every_registered_method_module_imports():
    """The registry's lazy entries all resolve: a missing or broken method module is a failure, never a skip."""
    for name in ALL:
        assert issubclass(METHODS.get(name), WSOLMethod), name  # imports the module (ModuleNotFoundError fails)


def batch(size=(64, 64), b=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, *size, generator=g), "label": torch.tensor([0, 1] * (b // 2) + [0] * (b % 2))}


def check_output(out, b, size, num_classes=2):
    assert tuple(out.logits.shape) == (b, num_classes)
    assert tuple(out.weight_map.shape) == (b, 1, *size)
    assert out.weight_map.dtype == torch.float32
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.weight_map).all()
    assert float(out.weight_map.detach().min()) >= 0.0 and float(out.weight_map.detach().max()) <= 1.0


# -- the seam, for every registered method -------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_train_and_eval(name):
    m = make(name)
    for size in SIZES:
        check_output(m.train()(batch(size)["image"]), 2, size)
        with torch.no_grad():
            check_output(m.eval()(batch(size)["image"]), 2, size)


@pytest.mark.parametrize("name", ALL)
def test_loss_backward_and_sgd_step_changes_weights(name):
    m = make(name).train()
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    losses = m.loss(batch((70, 90)))
    assert "total" in losses
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    losses["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    opt.step()
    changed = [k for k, v in m.named_parameters() if not torch.equal(v, before[k])]
    assert changed, "one SGD step changed no weight"


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip_gives_identical_outputs(name, tmp_path):
    m = make(name)
    m.train()
    m.loss(batch())  # updates BatchNorm running stats, so they must round-trip too
    m.on_epoch_end(0)
    m.eval()
    path = write_checkpoint(tmp_path / "ck.pt", {
        "model": m.describe(), "classes": ["a", "b"], "state_dict": m.state_dict(),
        "extra_state": m.extra_state(), "epoch": 1,
    })
    again = model_from_checkpoint(path)
    assert type(again) is type(m) and again.extra_state() == m.extra_state()
    x = batch((70, 90))["image"]
    with torch.no_grad():
        a, b = m(x), again(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.weight_map, b.weight_map)


@pytest.mark.parametrize("name", ALL)
def test_channels_last_and_bf16_autocast(name):
    m = make(name).eval()
    x = batch((64, 64))["image"]
    with torch.no_grad():
        ref = m(x)
        m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
        out = m_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref.logits, out.logits, atol=1e-3, rtol=1e-3)
    assert torch.allclose(ref.weight_map, out.weight_map, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # small: CPUs without native bf16 emulate it slowly
        with torch.no_grad():
            check_output(m(x[:, :, :48, :48]), 2, (48, 48))
        losses = m.train().loss(batch((48, 48)))
    assert losses["total"].dtype == torch.float32 and torch.isfinite(losses["total"])
    losses["total"].backward()


# -- CAM -----------------------------------------------------------------------------------------------------
def test_cam_map_equals_manual_computation():
    m = make("cam").eval()
    x = batch((70, 90))["image"]
    with torch.no_grad():
        out = m(x)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        feats = m.backbone((x - mean) / std)
        w, bias = m.fc.weight.flatten(1), m.fc.bias
        cams = torch.einsum("kd,bdhw->bkhw", w, feats) + bias.view(1, -1, 1, 1)
        logits = feats.mean(dim=(2, 3)) @ w.T + bias
        pred = logits.argmax(1)
        chosen = cams[torch.arange(2), pred].unsqueeze(1)
        up = F.interpolate(chosen, size=(70, 90), mode="bilinear", align_corners=False)
        lo = up.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = up.flatten(1).max(1).values.view(-1, 1, 1, 1)
        expected = (up - lo) / (hi - lo)
    assert torch.allclose(out.logits, logits, atol=1e-4)
    assert torch.allclose(out.extras["class_maps"], cams, atol=1e-4)
    assert torch.allclose(out.weight_map, expected, atol=1e-4)
    assert torch.allclose(out.weight_map.flatten(1).amax(1), torch.ones(2), atol=1e-4)


def test_cam_feature_api_is_consistent():
    m = make("cam").eval()
    x = batch()["image"]
    with torch.no_grad():
        feats = m.features(x)
        emb = m.embed(x)
        out = m(x)
    assert tuple(feats.shape) == (2, 512, 4, 4) and tuple(emb.shape) == (2, 512)
    assert torch.allclose(m.classify_features(feats), out.logits, atol=1e-5)
    assert torch.allclose(m.classify_features(emb), out.logits, atol=1e-5)


def test_cam_map_class_label_uses_labels():
    m = make("cam", map_class="label").eval()
    x = batch()["image"]
    with torch.no_grad():
        pred = m(x).logits.argmax(1)
        other = 1 - pred
        by_label = m(x, labels=other).weight_map
        by_pred = m(x, labels=pred).weight_map
        no_label = m(x).weight_map
        cams = m(x).extras["class_maps"]
    assert torch.equal(by_pred, no_label)
    expected = normalize_map(upsample_to(cams[torch.arange(2), other].unsqueeze(1), (64, 64)))
    assert torch.allclose(by_label, expected, atol=1e-6)
    assert not torch.allclose(by_label, by_pred)


# -- Grad-CAM ------------------------------------------------------------------------------------------------
def test_gradcam_leaves_parameter_grads_none_in_every_mode():
    m = make("gradcam")
    x = batch()["image"]
    m.train()(x)
    m.eval()
    with torch.no_grad():
        m(x)
    with torch.inference_mode():
        out = m(x)
    check_output(out, 2, (64, 64))
    assert all(p.grad is None for p in m.parameters())


def test_gradcam_loads_cam_weights_and_is_relu_cam_on_gap_head():
    cam, grad = make("cam").eval(), make("gradcam").eval()
    grad.load_state_dict(cam.state_dict())  # same architecture: a cam checkpoint's weights load
    x = batch((70, 90))["image"]
    with torch.no_grad():
        a, b = cam(x), grad(x)
    assert torch.equal(a.logits, b.logits)
    # on a GAP + linear head, alpha_k = w_ck / (h w): Grad-CAM == ReLU(CAM without its bias), normalised
    pred = a.logits.argmax(1)
    cams = a.extras["class_maps"] - cam.fc.bias.view(1, -1, 1, 1)
    expected = normalize_map(upsample_to(torch.relu(cams[torch.arange(2), pred].unsqueeze(1)), (70, 90)))
    assert torch.allclose(b.weight_map, expected, atol=1e-4)


# -- min-max entropy -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "keys"),
    [
        ({}, {"fg", "bg", "loc"}),
        ({"bg_loss": False}, {"fg", "loc"}),  # FG only
        ({"size_constraints": True}, {"fg", "bg", "loc", "size"}),  # + size
        ({"loc_loss": False, "bg_weight": 2.0}, {"fg", "bg"}),
        ({"fg_loss": False, "bg_loss": False}, {"loc"}),
    ],
)
def test_minmax_ablation_switches_change_terms(params, keys):
    # which terms are on; their values are checked against NumPy in tests/test_loss_formulas.py
    m = make("minmax_entropy", **params).train()
    losses = m.loss(batch())
    assert set(losses) == keys | {"total"}


def test_minmax_all_losses_off_is_rejected():
    with pytest.raises(ValidationError, match="every loss term is off"):
        build_method("minmax_entropy", num_classes=2, params={"fg_loss": False, "bg_loss": False, "loc_loss": False})


def test_minmax_mask_is_pseudo_binary_of_normalised_map():
    m = make("minmax_entropy", sigmoid_w=5.0, sigmoid_sigma=0.2).eval()
    with torch.no_grad():
        out = m(batch((70, 90))["image"])
    raw = out.extras["norm_map"]
    assert tuple(raw.shape) == (2, 1, 70, 90)
    assert torch.allclose(raw.flatten(1).amin(1), torch.zeros(2))
    assert torch.allclose(raw.flatten(1).amax(1), torch.ones(2), atol=1e-4)
    assert torch.allclose(out.weight_map, torch.sigmoid(5.0 * (raw - 0.2)))
    assert tuple(out.extras["loc_logits"].shape) == (2, 2)


def test_minmax_fg_gradient_reaches_localizer_unless_detached():
    for detach, expect in ((False, True), (True, False)):
        m = make("minmax_entropy", loc_loss=False, bg_loss=False, detach_mask=detach).train()
        m.loss(batch())["total"].backward()
        g = m.loc_head.conv.weight.grad
        assert (g is not None and g.abs().sum() > 0) == expect, detach


def test_wildcat_pool_matches_sorting():
    from medwsol.methods.minmax import wildcat_pool

    maps = torch.randn(2, 3, 5, 4)
    flat = maps.flatten(2).sort(dim=-1, descending=True).values
    expected = flat[..., :4].mean(-1) + 0.7 * flat[..., -2:].mean(-1)
    assert torch.allclose(wildcat_pool(maps, kmax=0.2, kmin=0.1, alpha=0.7), expected)
    assert torch.allclose(wildcat_pool(maps, kmax=1.0, kmin=0.0, alpha=0.7), maps.mean(dim=(2, 3)))


def test_erasing_trust_zeroes_mispredicted_for_good():
    from medwsol.methods.minmax import erasing_trust

    labels = torch.tensor([0, 1, 1])
    alive = torch.ones(3, dtype=torch.bool)
    p0 = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])  # sample 1 wrong
    t0, alive = erasing_trust(p0, labels, 0, alive)
    assert torch.allclose(t0, torch.tensor([0.9, 0.0, 0.8]))
    p1 = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.7, 0.3]])  # sample 1 right again, sample 2 wrong
    t1, alive = erasing_trust(p1, labels, 1, alive)
    assert torch.allclose(t1, torch.tensor([0.6 * math.exp(-0.1), 0.0, 0.0]))
    assert alive.tolist() == [True, False, False]


def test_minmax_recursive_erasing_runs_and_trust_zeroes_mispredicted():
    m = make("minmax_entropy", erase_steps=3).eval()
    x = batch()["image"]
    with torch.no_grad():
        pred = m.localize(m.norm(x))[0].argmax(1)
        labels = pred.clone()
        labels[0] = 1 - pred[0]  # sample 0 is mispredicted from the first round
        res = m.recursive_mask(m.norm(x), labels)
    assert res.trust.shape[1] == 2 and 1 <= res.trust.shape[0] <= 3
    assert (res.trust[:, 0] == 0).all() and (res.mask[0] == 0).all()
    assert float(res.trust[0, 1]) > 0.5 and float(res.mask[1].max()) > 0
    assert tuple(res.mask.shape) == (2, 1, 64, 64) and torch.isfinite(res.loc_loss)
    m.train()
    losses = m.loss(batch())
    assert torch.isfinite(losses["total"])
    losses["total"].backward()


def test_extended_log_barrier_matches_formula():
    from medwsol.methods.minmax import extended_log_barrier

    for t in (5.0, 10.0):
        z = torch.tensor([-0.5, -0.1, -1 / t**2 - 1e-4, -1 / t**2 + 1e-4, 0.0, 0.3], dtype=torch.float64)
        got = extended_log_barrier(z, t)
        for zi, gi in zip(z.tolist(), got.tolist()):
            if zi <= -1 / t**2:
                want = -(1 / t) * math.log(-zi)
            else:
                want = t * zi - (1 / t) * math.log(1 / t**2) + 1 / t
            assert gi == pytest.approx(want, rel=1e-5, abs=1e-6)
        z = torch.linspace(-0.5, 0.5, 101, requires_grad=True)
        extended_log_barrier(z, t).sum().backward()
        assert torch.isfinite(z.grad).all() and (z.grad > 0).all()


def test_barrier_t_grows_per_epoch_capped_and_survives_checkpoint(tmp_path):
    m = make("minmax_entropy", size_constraints=True, barrier_t0=5.0, barrier_growth=1.5, barrier_tmax=10.0)
    assert m.barrier_t == 5.0
    m.on_epoch_end(0)
    assert m.barrier_t == pytest.approx(7.5) and m.epoch == 1
    state = m.extra_state()
    m.on_epoch_end(1)
    m.on_epoch_end(2)
    assert m.barrier_t == 10.0
    m.load_extra_state(state)
    assert m.barrier_t == pytest.approx(7.5) and m.epoch == 1
    path = write_checkpoint(tmp_path / "c.pt", {"model": m.describe(), "state_dict": m.state_dict(),
                                                "extra_state": m.extra_state()})
    assert model_from_checkpoint(path).barrier_t == pytest.approx(7.5)


def test_size_term_penalises_a_full_mask_more_than_a_balanced_one():
    from medwsol.methods.minmax import extended_log_barrier

    t, s = 5.0, 0.05
    def cost(area):
        fg, bg = torch.tensor(s - area), torch.tensor(s - (1 - area))
        return float(extended_log_barrier(fg, t) + extended_log_barrier(bg, t))
    assert cost(1.0) > cost(0.5) and cost(0.0) > cost(0.5)


def test_minmax_without_fg_loss_predicts_with_the_localizer():
    m = make("minmax_entropy", fg_loss=False).eval()
    with torch.no_grad():
        out = m(batch()["image"])
    assert torch.equal(out.logits, out.extras["loc_logits"])
