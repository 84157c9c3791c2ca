"""medwsol.metrics checked against independent implementations (scikit-learn, MONAI, scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_recall_curve,
)

from medwsol.errors import DataError
from medwsol.metrics import (
    PerImageF1,
    PixelPR,
    boundary_f1,
    classification_error,
    f1_scores,
    iou,
)

# ----------------------------------------------------------------------------- data


def blobs(rng: np.random.Generator, n: int = 6, size: tuple[int, int] = (24, 32)):
    """Random masks (a rectangle or two) and noisy score maps correlated with them."""
    maps, masks = [], []
    h, w = size
    for _ in range(n):
        gt = np.zeros(size, bool)
        for _ in range(rng.integers(1, 3)):
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            gt[y0 : y0 + rng.integers(3, h // 2), x0 : x0 + rng.integers(3, w // 2)] = True
        score = np.clip(0.45 * gt + 0.55 * rng.random(size) + rng.normal(0, 0.05, size), 0, 1)
        maps.append(score)
        masks.append(gt)
    return maps, masks


def quantise(maps: list[np.ndarray], n_bins: int) -> list[np.ndarray]:
    """Scores snapped onto the grid k / n_bins (k = 0..n_bins), as PixelPR defines it."""
    return [np.round(m * n_bins) / n_bins for m in maps]


def pooled(maps, masks):
    return np.concatenate([m.ravel() for m in maps]), np.concatenate([g.ravel() for g in masks])


def accumulate(maps, masks, n_bins: int = 1000) -> PixelPR:
    pr = PixelPR(n_bins)
    for m, g in zip(maps, masks):
        pr.update(m, g)
    return pr


# ----------------------------------------------------------------------------- PxAP and the PR curve


@pytest.mark.parametrize("seed,n_bins", [(0, 1000), (1, 1000), (2, 100), (3, 7)])
def test_pxap_equals_sklearn_average_precision_on_quantised_scores(seed, n_bins):
    rng = np.random.default_rng(seed)
    maps, masks = blobs(rng)
    maps = quantise(maps, n_bins)
    pr = accumulate(maps, masks, n_bins)
    s, y = pooled(maps, masks)
    assert pr.pxap() == pytest.approx(average_precision_score(y, s), abs=1e-9)


def test_pxap_float32_maps_on_the_grid_land_in_their_bins():
    rng = np.random.default_rng(10)
    maps, masks = blobs(rng)
    maps = [m.astype(np.float32) for m in quantise(maps, 1000)]
    pr = accumulate(maps, masks)
    s, y = pooled(maps, masks)
    assert pr.pxap() == pytest.approx(average_precision_score(y, s), abs=1e-9)
    # every threshold agrees with a direct float32 comparison
    tp, fp, _, _ = pr.confusion()
    for k in (0, 1, 137, 500, 999):
        t = pr.thresholds[k]
        assert tp[k] == np.count_nonzero((s >= np.float32(t)) & y)
        assert fp[k] == np.count_nonzero((s >= np.float32(t)) & ~y)


def test_pxap_on_continuous_scores_equals_sklearn_on_floor_quantised_scores():
    rng = np.random.default_rng(4)
    maps, masks = blobs(rng)
    pr = accumulate(maps, masks, 1000)
    s, y = pooled(maps, masks)
    assert pr.pxap() == pytest.approx(average_precision_score(y, np.floor(s * 1000) / 1000), abs=1e-9)


@pytest.mark.parametrize("seed", [0, 5])
def test_precision_recall_match_sklearn_curve_at_its_thresholds(seed):
    rng = np.random.default_rng(seed)
    n_bins = 200
    maps, masks = blobs(rng)
    maps = quantise(maps, n_bins)
    pr = accumulate(maps, masks, n_bins)
    precision, recall = pr.precision_recall()
    s, y = pooled(maps, masks)
    sk_p, sk_r, sk_t = precision_recall_curve(y, s)
    checked = 0
    for p_j, r_j, t_j in zip(sk_p[:-1], sk_r[:-1], sk_t):
        k = int(round(t_j * n_bins))
        if k == n_bins:  # threshold 1.0 is not among .thresholds (only used inside PxAP)
            continue
        assert pr.thresholds[k] == pytest.approx(t_j, abs=1e-12)
        assert precision[k] == pytest.approx(p_j, abs=1e-12)
        assert recall[k] == pytest.approx(r_j, abs=1e-12)
        checked += 1
    assert checked > 50
    assert np.all(np.diff(recall) <= 0)  # recall never grows with the threshold
    assert recall[0] == 1.0


def test_thresholds_grid_and_confusion_totals():
    pr = PixelPR(1000)
    assert pr.thresholds.shape == (1000,)
    assert pr.thresholds[0] == 0.0 and pr.thresholds[1] == 0.001 and pr.thresholds[-1] == 0.999
    rng = np.random.default_rng(6)
    maps, masks = blobs(rng)
    for m, g in zip(maps, masks):
        pr.update(m, g)
    tp, fp, fn, tn = pr.confusion()
    assert all(a.dtype == np.int64 and a.shape == (1000,) for a in (tp, fp, fn, tn))
    total = sum(m.size for m in maps)
    assert np.all(tp + fp + fn + tn == total)
    assert tp[0] + fn[0] == sum(g.sum() for g in masks) == pr.n_positive


def test_counts_do_not_overflow_beyond_1e10_pixels():
    rng = np.random.default_rng(7)
    maps, masks = blobs(rng, n=2)
    pr = accumulate(maps, masks, 100)
    p0, r0 = pr.precision_recall()
    tp0, fp0, fn0, tn0 = pr.confusion()
    for _ in range(30):  # 2**30 copies of ~1500 pixels: ~1.6e12 pixels
        pr.merge(pr)
    assert pr.n_pixels == (tp0[0] + fp0[0] + fn0[0] + tn0[0]) * 2**30 > 1e10
    tp, fp, fn, tn = pr.confusion()
    np.testing.assert_array_equal(tp, tp0 * 2**30)
    np.testing.assert_array_equal(tn, tn0 * 2**30)
    p, r = pr.precision_recall()
    np.testing.assert_allclose(p, p0, rtol=1e-12)
    np.testing.assert_allclose(r, r0, rtol=1e-12)


# ----------------------------------------------------------------------------- IoU, Dice, threshold choice


def test_iou_per_threshold_matches_sklearn_jaccard():
    rng = np.random.default_rng(8)
    maps, masks = blobs(rng)
    pr = accumulate(maps, masks, 1000)
    iou_fg, iou_bg, miou = pr.iou_per_threshold()
    s, y = pooled(maps, masks)
    for k in (0, 100, 250, 400, 500, 650, 800, 999):
        pred = s >= pr.thresholds[k]
        j_bg, j_fg = jaccard_score(y, pred, average=None, labels=[0, 1], zero_division=1.0)
        assert iou_fg[k] == pytest.approx(j_fg, abs=1e-12)
        assert iou_bg[k] == pytest.approx(j_bg, abs=1e-12)
        assert miou[k] == pytest.approx((j_fg + j_bg) / 2, abs=1e-12)


def test_iou_at_matches_monai_mean_iou_on_the_pooled_set():
    rng = np.random.default_rng(9)
    maps, masks = blobs(rng)
    pr = accumulate(maps, masks, 1000)
    s, y = pooled(maps, masks)
    tau = 0.6
    pred = s >= tau
    one_hot = lambda b: torch.from_numpy(np.stack([~b, b])[None].astype(np.float32))  # noqa: E731
    metric = MeanIoU(include_background=True, reduction="mean_batch", ignore_empty=False)
    metric(y_pred=one_hot(pred), y=one_hot(y))
    m_bg, m_fg = metric.aggregate().tolist()
    fg, bg, mean = pr.iou_at(tau)
    assert fg == pytest.approx(m_fg, abs=1e-6)
    assert bg == pytest.approx(m_bg, abs=1e-6)
    assert mean == pytest.approx((m_fg + m_bg) / 2, abs=1e-6)


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.72])
def test_dataset_dice_matches_monai_dice_metric_and_sklearn_f1(tau):
    rng = np.random.default_rng(11)
    maps, masks = blobs(rng)
    pr = accumulate(maps, masks, 1000)
    dice_fg, dice_bg = pr.dice_at(tau)
    s, y = pooled(maps, masks)
    pred = s >= tau
    # MONAI: every pixel of the set as one 1-D "image", two one-hot channels (bg, fg)
    one_hot = lambda b: torch.from_numpy(np.stack([~b, b])[None].astype(np.float32))  # noqa: E731
    metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
    metric(y_pred=one_hot(pred), y=one_hot(y))
    m_bg, m_fg = metric.aggregate().tolist()
    assert dice_fg == pytest.approx(m_fg, abs=1e-6)
    assert dice_bg == pytest.approx(m_bg, abs=1e-6)
    assert dice_fg == pytest.approx(f1_score(y, pred, pos_label=1), abs=1e-12)
    assert dice_bg == pytest.approx(f1_score(y, pred, pos_label=0), abs=1e-12)
    # the per-threshold curve agrees with the single-threshold call
    fg_curve, bg_curve = pr.dice_per_threshold()
    k = int(round(tau * 1000))
    assert (fg_curve[k], bg_curve[k]) == pytest.approx((dice_fg, dice_bg), abs=1e-15)


@pytest.mark.parametrize("criterion", ["miou", "dice_fg", "mdice"])
def test_best_threshold_is_argmax_of_the_sklearn_curve(criterion):
    rng = np.random.default_rng(12)
    maps, masks = blobs(rng, n=4, size=(16, 20))
    n_bins = 50
    pr = accumulate(maps, masks, n_bins)
    s, y = pooled(maps, masks)
    curve = []
    for t in np.arange(n_bins) / n_bins:
        pred = s >= t
        if criterion == "miou":
            curve.append(jaccard_score(y, pred, average="macro", labels=[0, 1], zero_division=1.0))
        elif criterion == "dice_fg":
            curve.append(f1_score(y, pred, pos_label=1, zero_division=1.0))
        else:
            curve.append(f1_score(y, pred, average="macro", labels=[0, 1], zero_division=1.0))
    tau, value = pr.best_threshold(criterion)
    k = int(np.argmax(curve))
    assert tau == pytest.approx(k / n_bins)
    assert value == pytest.approx(curve[k], abs=1e-12)


def test_best_threshold_rejects_unknown_criterion_and_empty_accumulator():
    with pytest.raises(ValueError, match="criterion"):
        PixelPR(10).best_threshold("accuracy")
    with pytest.raises(DataError):
        PixelPR(10).best_threshold("miou")


def test_tau_off_the_grid_is_rejected():
    pr = PixelPR(1000)
    pr.update(np.array([0.2, 0.8]), np.array([False, True]))
    with pytest.raises(ValueError, match="grid"):
        pr.dice_at(0.12345)
    assert pr.dice_at(1.0) == (0.0, pytest.approx(2 / 3))  # 1.0 is allowed: nothing reaches it


# ----------------------------------------------------------------------------- streaming, merge, shapes


def test_streaming_in_chunks_equals_one_shot_and_merge():
    rng = np.random.default_rng(13)
    maps, masks = blobs(rng, n=8)
    one = PixelPR(1000)
    one.update(np.stack(maps), np.stack(masks))  # a whole batch at once
    chunks = PixelPR(1000)
    for i in range(0, 8, 3):
        chunks.update(np.stack(maps[i : i + 3]), np.stack(masks[i : i + 3]))
    a, b = PixelPR(1000), PixelPR(1000)
    for m, g in zip(maps[:5], masks[:5]):
        a.update(m, g)
    for m, g in zip(maps[5:], masks[5:]):
        b.update(m, g)
    merged = a.merge(b)
    for other in (chunks, merged):
        for x, y in zip(one.confusion(), other.confusion()):
            np.testing.assert_array_equal(x, y)
        assert other.pxap() == one.pxap()
    with pytest.raises(ValueError):
        a.merge(PixelPR(100))


def test_inputs_torch_batch_shapes_and_ignore():
    rng = np.random.default_rng(14)
    maps, masks = blobs(rng, n=3)
    ref = accumulate(maps, masks)
    pr = PixelPR(1000)
    # [B, 1, H, W] float tensors with a {0, 1} float mask, as batches carry them
    pr.update(torch.from_numpy(np.stack(maps)[:, None]), torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)))
    assert pr.pxap() == ref.pxap()
    # [1, H, W] map against an [H, W] mask
    single = PixelPR(1000)
    single.update(maps[0][None], masks[0])
    assert single.n_pixels == maps[0].size
    # ignore removes pixels from every count: same as dropping them
    ignore = np.zeros_like(masks[0]); ignore[:, :10] = True
    with_ignore, dropped = PixelPR(1000), PixelPR(1000)
    with_ignore.update(maps[0], masks[0], ignore=ignore)
    dropped.update(maps[0][:, 10:], masks[0][:, 10:])
    for x, y in zip(with_ignore.confusion(), dropped.confusion()):
        np.testing.assert_array_equal(x, y)


def test_bad_inputs_raise_data_errors():
    pr = PixelPR(10)
    with pytest.raises(DataError, match="NaN"):
        pr.update(np.array([0.5, np.nan]), np.array([True, False]))
    with pytest.raises(DataError, match="shape"):
        pr.update(np.zeros((4, 4)), np.zeros((4, 5), bool))
    with pytest.raises(DataError, match="binary"):
        pr.update(np.zeros(3), np.array([0.0, 0.4, 1.0]))
    pr.update(np.array([0.2, 0.7]), np.array([False, False]))
    with pytest.raises(DataError, match="foreground"):
        pr.pxap()


def test_scores_outside_unit_interval_are_clipped():
    pr = PixelPR(10)
    pr.update(np.array([-3.0, 0.0, 1.0, 7.0]), np.array([False, False, True, True]))
    tp, fp, _, _ = pr.confusion_at(1.0)
    assert (tp, fp) == (2, 0)
    assert pr.pxap() == 1.0


# ----------------------------------------------------------------------------- sanity (protocol baselines)


def test_all_ones_map_gives_foreground_fraction_and_zero_background_f1():
    rng = np.random.default_rng(15)
    _, masks = blobs(rng)
    pr = PixelPR(1000)
    per_image = PerImageF1(threshold=0.5)
    for g in masks:
        pr.update(np.ones(g.shape), g)
        per_image.update(np.ones(g.shape), g)
    fraction = sum(g.sum() for g in masks) / sum(g.size for g in masks)
    assert pr.pxap() == pytest.approx(fraction, abs=1e-12)
    for tau in (0.001, 0.5, 0.999):
        assert pr.dice_at(tau)[1] == 0.0
    assert per_image.result()["f1_neg"] == 0.0
    for g in masks:
        assert f1_scores(np.ones_like(g), g)[1] == 0.0


def test_perfect_maps_give_pxap_one():
    rng = np.random.default_rng(16)
    maps, masks = blobs(rng)
    binary, soft = PixelPR(1000), PixelPR(1000)
    for m, g in zip(maps, masks):
        binary.update(g.astype(np.float32), g)
        soft.update(np.where(g, 0.5 + 0.5 * m, 0.5 * m), g)  # any map that separates the classes
    assert binary.pxap() == 1.0
    assert soft.pxap() == pytest.approx(1.0, abs=1e-12)
    tau, miou = soft.best_threshold()
    assert miou == 1.0 and soft.dice_at(tau) == (1.0, 1.0)


# ----------------------------------------------------------------------------- per image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_image_f1_and_iou_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    maps, masks = blobs(rng)
    acc = PerImageF1(threshold=0.55)
    expected = {"f1_pos": [], "f1_neg": [], "iou": [], "miou": []}
    for i, (m, g) in enumerate(zip(maps, masks)):
        row = acc.update(m, g, name=f"img{i}")
        pred = m >= 0.55
        f1p = f1_score(g.ravel(), pred.ravel(), pos_label=1, zero_division=1.0)
        f1n = f1_score(g.ravel(), pred.ravel(), pos_label=0, zero_division=1.0)
        jac = jaccard_score(g.ravel(), pred.ravel(), average=None, labels=[0, 1], zero_division=1.0)
        assert f1_scores(pred, g) == (pytest.approx(f1p, abs=1e-12), pytest.approx(f1n, abs=1e-12))
        assert iou(pred, g) == pytest.approx(jac[1], abs=1e-12)
        assert row["f1_pos"] == pytest.approx(f1p, abs=1e-12)
        expected["f1_pos"].append(f1p)
        expected["f1_neg"].append(f1n)
        expected["iou"].append(jac[1])
        expected["miou"].append(jac.mean())
    result = acc.result()
    assert result["n_images"] == len(maps)
    for key, values in expected.items():
        assert result[key] == pytest.approx(np.mean(values), abs=1e-12)
        assert getattr(acc, key) == result[key]


def test_per_image_dice_matches_monai_per_image():
    rng = np.random.default_rng(17)
    maps, masks = blobs(rng, n=5)
    masks[2][:] = False  # an image without foreground: both conventions must agree
    maps[2][:] = 0.1
    acc = PerImageF1(threshold=0.5)
    acc.update_batch(np.stack(maps)[:, None], np.stack(masks)[:, None])
    pred = torch.from_numpy(np.stack(maps)[:, None] >= 0.5).float()
    gt = torch.from_numpy(np.stack(masks)[:, None]).float()
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    metric(y_pred=pred, y=gt)  # one foreground channel: Dice of the foreground per image
    monai_fg = metric.aggregate().squeeze(1).numpy()
    np.testing.assert_allclose(acc.values["f1_pos"], monai_fg, atol=1e-6)
    assert acc.values["f1_pos"][2] == 1.0


def test_empty_masks_convention_and_merge():
    empty = np.zeros((5, 5), bool)
    assert f1_scores(empty, empty) == (1.0, 1.0)
    assert iou(empty, empty) == 1.0
    full = np.ones((5, 5), bool)
    assert f1_scores(full, full) == (1.0, 1.0)
    assert f1_scores(empty, full) == (0.0, 0.0)
    a, b = PerImageF1(0.5), PerImageF1(0.5)
    a.update_binary(empty, empty)
    b.update_binary(empty, full)
    assert a.merge(b).result()["f1_pos"] == 0.5
    assert np.isnan(PerImageF1().result()["f1_pos"])
    with pytest.raises(ValueError):
        a.merge(PerImageF1(0.3))


# ----------------------------------------------------------------------------- boundary F1


def square(shape=(40, 40), y=10, x=10, size=15):
    m = np.zeros(shape, bool)
    m[y : y + size, x : x + size] = True
    return m


def test_boundary_f1_identical_shifted_disjoint():
    a = square()
    assert boundary_f1(a, a, tolerance=0) == 1.0
    shifted = square(x=11)
    assert boundary_f1(shifted, a, tolerance=2) == 1.0
    assert boundary_f1(shifted, a, tolerance=0) < 1.0
    assert boundary_f1(square(x=2, y=2, size=6), square(x=28, y=28, size=6), tolerance=2) == 0.0
    empty = np.zeros_like(a)
    assert boundary_f1(empty, empty) == 1.0
    assert boundary_f1(a, empty) == 0.0


def test_boundary_f1_matches_a_brute_force_definition():
    rng = np.random.default_rng(18)
    a = square(size=12)
    b = square(y=12, x=9, size=14)
    b[rng.random(b.shape) < 0.05] ^= True
    tol = 1.5

    def inner_boundary(m):  # object pixels with a 4-neighbour of the other class (inside the image)
        p = np.pad(m, 1, mode="edge")
        nb = (p[:-2, 1:-1] != m) | (p[2:, 1:-1] != m) | (p[1:-1, :-2] != m) | (p[1:-1, 2:] != m)
        return m & nb

    ba, bb = inner_boundary(a), inner_boundary(b)
    pa, pb = np.argwhere(ba), np.argwhere(bb)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    precision = (d.min(axis=1) <= tol).mean()
    recall = (d.min(axis=0) <= tol).mean()
    expected = 2 * precision * recall / (precision + recall)
    assert boundary_f1(a, b, tolerance=tol) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- classification


def test_classification_error_matches_sklearn():
    rng = np.random.default_rng(19)
    y = rng.integers(0, 2, 50)
    logits = rng.normal(size=(50, 2))
    pred = logits.argmax(1)
    expected = 100 * (1 - accuracy_score(y, pred))
    assert classification_error(y, pred) == pytest.approx(expected)
    assert classification_error(y, logits) == pytest.approx(expected)
    assert classification_error(torch.tensor(y), torch.tensor(logits)) == pytest.approx(expected)
    with pytest.raises(DataError):
        classification_error([0, 1], [0])
