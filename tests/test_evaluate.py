"""The evaluator: batch-invariant maps and metrics on images of mixed sizes; the served view and calibration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medwsol.config import PipelineConfig
from medwsol.engine.evaluate import EVAL_PAD_VALUE, calibrate, evaluate_model, make_eval_loader, predict
from medwsol.engine.served import ServedModel
from medwsol.methods.base import build_method

SIZES = [(64, 64), (80, 96), (64, 64), (100, 72), (90, 90), (64, 64)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Images of mixed sizes with masks, and a manifest frame as load_manifest returns it."""
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate(SIZES):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 255
        img[mask > 0] = (img[mask > 0] * 0.4).astype(np.uint8)  # something for a map to find
        Image.fromarray(img).save(d / f"im{i}.png")
        Image.fromarray(mask).save(d / f"im{i}_mask.png")
        rows.append({"image_path": str(d / f"im{i}.png"), "mask_path": str(d / f"im{i}_mask.png"), "label_idx": i % 2,
                     "split": "test" if i < 4 else "valid", "valpx": int(i >= 4)})
    return pd.DataFrame(rows)


def cfg(batch: int, pad_to: int = 32) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "name": "t", "data": {"cache": "none", "eval_pad_to": pad_to},
        "evaluate": {"batch_size": batch, "splits": ["test"], "n_overlays": 0}, "train": {"channels_last": False},
    })


def records(df, split):
    from medwsol.data.manifest import split_records

    return split_records(df, split)


@pytest.mark.parametrize("method", ["cam", "minmax_entropy"])
def test_maps_and_metrics_do_not_depend_on_the_batch(mixed, method):
    torch.manual_seed(0)
    net = build_method(method, num_classes=2, output_stride=16).eval()
    recs = records(mixed, "test")
    dev = torch.device("cpu")
    one = list(predict(net, make_eval_loader(recs, cfg(1), cache=False), dev))
    four = list(predict(net, make_eval_loader(recs, cfg(4), cache=False), dev))
    assert [r["name"] for r in one] == [r["name"] for r in four] == [f"im{i}" for i in range(4)]
    for a, b in zip(one, four):
        assert a["map"].shape == b["map"].shape == a["mask"].shape
        # same image, same padding, same forward: equal up to float rounding of batched convolutions
        np.testing.assert_allclose(a["map"], b["map"], atol=1e-5)
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    m1 = evaluate_model(net, cfg(1), mixed, dev).metrics["test"]
    m4 = evaluate_model(net, cfg(4), mixed, dev).metrics["test"]
    assert m1["pxap"] == pytest.approx(m4["pxap"], abs=1e-3)
    assert m1["tau"]["f1_pos"] == pytest.approx(m4["tau"]["f1_pos"], abs=1e-3)
    assert m1["classification_error"] == m4["classification_error"]


def test_each_image_is_padded_alone_with_the_training_pad_value(mixed):
    """A 64x64 image batched with a 100x72 one is not padded to 100x96: its map cannot see the other's size."""
    recs = records(mixed, "test")
    groups = next(iter(make_eval_loader(recs, cfg(4), cache=False)))
    assert isinstance(groups, list)
    shapes = sorted(tuple(g["image"].shape[-2:]) for g in groups)
    assert shapes == [(64, 64), (96, 96), (128, 96)]  # 64x64 (x2), 80x96 -> 96x96, 100x72 -> 128x96
    g = next(g for g in groups if tuple(g["image"].shape[-2:]) == (128, 96))
    assert torch.all(g["image"][:, :, 100:, :] == EVAL_PAD_VALUE) and torch.all(g["image"][:, :, :, 72:] == EVAL_PAD_VALUE)
    assert g["size"].tolist() == [[100, 72]]


def test_calibration_fits_a_fixed_range_and_tau_on_the_served_score(mixed):
    torch.manual_seed(0)
    net = build_method("cam", num_classes=2, output_stride=16).eval()
    c = cfg(2, pad_to=1)  # no padding: the raw maps below are of the unpadded images
    c = c.model_copy(update={"evaluate": c.evaluate.model_copy(update={"threshold_split": "valpx"})})
    cal = calibrate(net, c, mixed, torch.device("cpu"), "weight_x_prob", "malignant")
    lo, hi = cal["map_range"]
    assert hi > lo and "2 valid images" in cal["map_range_fitted_on"]
    # the range is the median of the valid images' own min / max of the raw map
    with torch.no_grad():
        raws = [net(torch.from_numpy(np.asarray(Image.open(r["image"]), np.float32) / 255).permute(2, 0, 1)[None])
                .extras["raw_map"] for r in records(mixed, "valid")]
    assert lo == pytest.approx(float(np.median([float(r.min()) for r in raws])), rel=1e-4)
    assert hi == pytest.approx(float(np.median([float(r.max()) for r in raws])), rel=1e-4)
    # tau is the best-mIoU threshold of the served score itself
    served = ServedModel(net, ["benign", "malignant"], "malignant", "weight_x_prob", map_range=(lo, hi))
    from medwsol.engine.served import choose_tau

    again = choose_tau(predict(served, make_eval_loader(records(mixed, "valpx"), c, cache=False), torch.device("cpu")))
    assert cal["tau"] == again["tau"] and cal["score"] == "weight_x_prob" and cal["positive_class"] == "malignant"
    # served metrics are measured with that tau
    res = evaluate_model(net, c, mixed, torch.device("cpu"), served=ServedModel(
        net, ["benign", "malignant"], "malignant", "weight_x_prob", map_range=(lo, hi), tau=cal["tau"]))
    assert res.metrics["served"]["tau"] == cal["tau"] and res.metrics["served"]["test"]["tau"]["threshold"] == cal["tau"]
