"""Learned weight-map methods B1 (weightmap_ce) and B2 (weightmap_triplet)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from medwsol.checkpoint import model_from_checkpoint, write_checkpoint
from medwsol.errors import CheckpointError
from medwsol.methods.base import WSOLOutput, build_method
from medwsol.methods.catalog import WeightMapCEParams, WeightMapTripletParams
from medwsol.methods.weightmap import class_triplets, total_variation

torch.set_num_threads(1)  # the suite shares 2 cores; as in tests/test_methods.py

METHODS = ["weightmap_ce", "weightmap_triplet"]
SMALL = (4, 4, 8, 8, 16, 4)
KEYS = {
    "weightmap_ce": {"cls", "area", "tv", "fg_ce", "embed", "total"},
    "weightmap_triplet": {"cls", "area", "tv", "triplet_fg", "triplet_class", "total"},
}


def _model(method: str, **params) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(method, num_classes=2, params={"unet_features": SMALL, **params})


def _batch(n: int = 2, size: tuple[int, int] = (32, 32), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1] * (n // 2) + [0] * (n % 2))
    return {"image": torch.rand(n, 3, *size, generator=g), "label": labels}


def _write_cam(path, num_classes=2, backbone="resnet18", output_stride=16, method="cam"):
    torch.manual_seed(1)
    m = build_method(method, num_classes=num_classes, backbone=backbone, output_stride=output_stride)
    write_checkpoint(path, {"model": m.describe(), "classes": [str(i) for i in range(num_classes)],
                            "state_dict": m.state_dict(), "extra_state": m.extra_state(), "epoch": 1})
    return m


@pytest.fixture(scope="module")
def cam_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cam") / "best.pt"
    _write_cam(path)
    return path


# ---------------------------------------------------------------------------------------------- forward / loss
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_forward_full_resolution_map_in_unit_range(method, size):
    m = _model(method).eval()
    with torch.no_grad():
        out = m(torch.rand(1, 3, *size))
    assert isinstance(out, WSOLOutput)
    assert out.logits.shape == (1, 2)
    assert out.weight_map.shape == (1, 1, *size)
    assert out.weight_map.dtype == torch.float32
    assert float(out.weight_map.min()) >= 0.0 and float(out.weight_map.max()) <= 1.0
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_logits_are_the_classifier_on_the_plain_image(method):
    m = _model(method).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        ref = m.classifier.classify_features(m.classifier.embed(x))
    assert torch.allclose(out.logits, ref, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_loss_terms_finite_and_documented(method):
    m = _model(method).train()
    losses = m.loss(_batch(size=(35, 45)))
    assert set(losses) == KEYS[method]
    for k, v in losses.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and math.isfinite(float(v.detach())), k
    m_off = _model(method, tv_weight=0.0, area_weight=0.0)
    keys = set(m_off.loss(_batch()))
    assert keys == KEYS[method] - {"tv", "area"}


def test_loss_total_is_the_weighted_sum():
    m = _model("weightmap_ce", ce_weight=0.5, embed_weight=2.0, area_weight=0.3, tv_weight=0.1, cls_weight=0.7)
    t = m.loss(_batch())
    expected = 0.5 * t["fg_ce"] + 2.0 * t["embed"] + 0.3 * t["area"] + 0.1 * t["tv"] + 0.7 * t["cls"]
    assert torch.allclose(t["total"], expected, atol=1e-5)
    m = _model("weightmap_triplet", class_weight=0.25, area_weight=0.5, tv_weight=0.2)
    t = m.loss(_batch(4))
    assert float(t["triplet_class"].detach()) > 0
    expected = t["triplet_fg"] + 0.25 * t["triplet_class"] + 0.5 * t["area"] + 0.2 * t["tv"] + t["cls"]
    assert torch.allclose(t["total"], expected, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_losses_float32(method):
    m = _model(method).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m.loss(_batch())
        out = m(torch.rand(1, 3, 24, 40))
    for k, v in losses.items():
        assert v.dtype == torch.float32 and math.isfinite(float(v.detach())), k
    assert out.weight_map.dtype == torch.float32 and out.weight_map.shape == (1, 1, 24, 40)
    losses["total"].backward()


@pytest.mark.parametrize("method", METHODS)
def test_sgd_step_changes_generator_and_joint_classifier(method):
    m = _model(method).train()
    g0 = copy.deepcopy(m.generator.state_dict())
    f0 = copy.deepcopy(m.classifier.fc.weight.detach())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.loss(_batch())["total"].backward()
    opt.step()
    assert any(not torch.equal(g0[k], v) for k, v in m.generator.state_dict().items())
    assert not torch.equal(f0, m.classifier.fc.weight)


@pytest.mark.parametrize("method", METHODS)
def test_masked_views_do_not_train_the_classifier(method):
    """Only CE(f(I)) reaches f: the masked-view terms update g alone and leave BN statistics alone."""
    m = _model(method).train()
    batch = _batch(4)
    ref = copy.deepcopy(m.classifier).train()
    with torch.no_grad():
        ref.features(batch["image"])  # the one train-mode pass the loss is allowed to make
    losses = m.loss(batch)
    names = ("fg_ce", "embed") if method == "weightmap_ce" else ("triplet_fg", "triplet_class")
    masked = losses[names[0]] + losses[names[1]]
    masked.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.classifier.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
    for (k, a), b in zip(m.classifier.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert m.classifier.training  # restored after the fixed pass


# ---------------------------------------------------------------------------------------------- triplets
def test_class_triplets_enumerates_valid_triplets():
    a, p, n = class_triplets(torch.tensor([0, 0, 1, 1]))
    assert len(a) == 4 * 1 * 2
    y = torch.tensor([0, 0, 1, 1])
    assert torch.equal(y[a], y[p]) and (a != p).all() and (y[a] != y[n]).all()
    assert len(class_triplets(torch.tensor([0, 1, 2]))[0]) == 0  # no same-class partner
    assert len(class_triplets(torch.tensor([1, 1, 1]))[0]) == 0  # no other class


@pytest.mark.parametrize("labels", [[0, 1], [1, 1]])
def test_class_triplet_skipped_gracefully(labels):
    m = _model("weightmap_triplet").train()
    losses = m.loss({"image": torch.rand(2, 3, 32, 32), "label": torch.tensor(labels)})
    assert float(losses["triplet_class"]) == 0.0
    assert math.isfinite(float(losses["total"].detach()))
    losses["total"].backward()


def test_total_variation():
    assert float(total_variation(torch.ones(2, 1, 8, 8))) == 0.0
    stripes = torch.zeros(1, 1, 4, 4)
    stripes[..., ::2] = 1.0
    assert float(total_variation(stripes)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- frozen classifier
@pytest.mark.parametrize("method", METHODS)
def test_frozen_classifier_stays_fixed_and_in_eval(method, cam_ckpt):
    m = _model(method, classifier="frozen", classifier_checkpoint=str(cam_ckpt))
    m.train()
    assert m.training and m.generator.training and not m.classifier.training
    assert all(not p.requires_grad for p in m.classifier.parameters())
    f0 = copy.deepcopy(m.classifier.state_dict())
    g0 = copy.deepcopy(m.generator.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    losses = m.loss(_batch())
    assert "cls" not in losses
    losses["total"].backward()
    opt.step()
    for k, v in m.classifier.state_dict().items():
        assert torch.equal(f0[k], v), k
    assert any(not torch.equal(g0[k], v) for k, v in m.generator.state_dict().items())
    assert not m.classifier.training


def test_frozen_classifier_weights_come_from_the_checkpoint(tmp_path):
    ref = _write_cam(tmp_path / "cam.pt")
    m = _model("weightmap_ce", classifier="frozen", classifier_checkpoint=str(tmp_path / "cam.pt"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x).logits, ref.eval()(x).logits, atol=1e-5)


def test_gradcam_checkpoint_is_accepted(tmp_path):
    _write_cam(tmp_path / "gradcam.pt", method="gradcam")
    m = _model("weightmap_ce", classifier="frozen", classifier_checkpoint=str(tmp_path / "gradcam.pt"))
    assert m.frozen


def test_frozen_model_checkpoint_rebuilds_without_the_classifier_file(tmp_path):
    cam = tmp_path / "cam.pt"
    _write_cam(cam)
    m = _model("weightmap_triplet", classifier="frozen", classifier_checkpoint=str(cam)).eval()
    write_checkpoint(tmp_path / "wm.pt", {"model": m.describe(), "state_dict": m.state_dict(),
                                          "extra_state": m.extra_state(), "epoch": 0})
    cam.unlink()
    m2 = model_from_checkpoint(tmp_path / "wm.pt")
    assert m2.frozen and m2.params.classifier == "frozen"
    m2.train()
    assert not m2.classifier.training and all(not p.requires_grad for p in m2.classifier.parameters())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = m(x), m2.eval()(x)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.weight_map, b.weight_map, atol=1e-6)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("backbone", "backbone is 'resnet34', expected 'resnet18'"),
        ("classes", "3 classes, expected 2"),
        ("stride", "output_stride is 32, expected 16"),
        ("method", "'weightmap_ce' model, expected a 'cam'"),
        ("garbage", "not a readable checkpoint"),
        ("foreign", "not a medwsol checkpoint"),
        ("missing", "not found"),
    ],
)
def test_wrong_frozen_checkpoint_is_a_one_line_error(tmp_path, kind, match):
    path = tmp_path / f"wrong_{kind}.pt"
    if kind == "backbone":
        _write_cam(path, backbone="resnet34")
    elif kind == "classes":
        _write_cam(path, num_classes=3)
    elif kind == "stride":
        _write_cam(path, output_stride=32)
    elif kind == "method":
        other = _model("weightmap_ce")
        write_checkpoint(path, {"model": other.describe(), "state_dict": other.state_dict(), "epoch": 0})
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=match) as info:
        _model("weightmap_ce", classifier="frozen", classifier_checkpoint=str(path))
    msg = str(info.value)
    assert path.name in msg and "fix:" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    "model, params",
    [
        (WeightMapTripletParams, {"margin_fg": 0}),
        (WeightMapTripletParams, {"margin_class": -1}),
        (WeightMapTripletParams, {"class_weight": -0.1}),
        (WeightMapCEParams, {"area_weight": -1}),
        (WeightMapCEParams, {"classifier": "frozen"}),
        (WeightMapCEParams, {"cls_weight": 0}),
        (WeightMapCEParams, {"ce_weight": 0, "embed_weight": 0}),
        (WeightMapCEParams, {"unet_features": (16, 32, 0, 128, 256, 16)}),
        (WeightMapCEParams, {"unet_features": (16, 32)}),
        (WeightMapCEParams, {"area_target": 1.0}),
        (WeightMapCEParams, {"bogus": 1}),
    ],
)
def test_invalid_params_rejected(model, params):
    with pytest.raises(ValidationError):
        model.model_validate(params)


def test_valid_params_accepted():
    WeightMapCEParams.model_validate({"classifier": "frozen", "classifier_checkpoint": "x.pt", "cls_weight": 0})
    WeightMapTripletParams.model_validate({"class_weight": 0, "tv_weight": 0.05, "area_target": 0.3})


# it learns: tests/test_learning.py (each method's map must find a planted square); the terms' values:
# tests/test_loss_formulas.py (NumPy).
