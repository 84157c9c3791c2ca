"""Every loss term of every method, recomputed by hand in NumPy from the network's raw outputs.

Hooks record what the networks produce (backbone inputs and features, head scores and class maps,
generator logits); everything after that — softmax-weighted maps, bilinear resizing, min-max
normalisation, the pseudo-binary mask, masking, cross-entropies, the log-barrier, trust and
erasing, areas, total variation, triplets — is written here again in NumPy from the papers'
formulas and the authors' code (cited per function), and compared with what ``loss()`` returns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medwsol.methods.base import build_method

torch.set_num_threads(1)

MEAN = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
SMALL_UNET = (4, 4, 8, 8, 16, 4)


# ------------------------------------------------------------------------------------------ NumPy reference
def np_norm(x):
    return (x - MEAN) / STD


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_ce(logits, y):
    """Mean over the batch of -log softmax(logits)[y]."""
    return float(-np_log_softmax(logits)[np.arange(len(y)), y].mean())


def np_ce_per_sample(logits, y):
    return -np_log_softmax(logits)[np.arange(len(y)), y]


def np_ce_uniform(logits):
    """CE to the uniform distribution: mean over classes of -log softmax (2019 criteria.py TotalLoss)."""
    return float((-np_log_softmax(logits).mean(axis=1)).mean())


def _axis_weights(n_in, n_out, align_corners):
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        if align_corners:
            src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:  # half-pixel centres, clamped at 0 (PyTorch's bilinear, align_corners=False)
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        out[i, i0] += 1 - lam
        out[i, i1] += lam
    return out


def np_resize(a, size, align_corners=False):
    """Bilinear resize of [B, C, h, w] to size (H, W), separable."""
    wy = _axis_weights(a.shape[2], size[0], align_corners)
    wx = _axis_weights(a.shape[3], size[1], align_corners)
    return np.einsum("Hh,bchw,Ww->bcHW", wy, a, wx)


def np_minmax(m, per_image=True):
    if per_image:
        lo = m.reshape(len(m), -1).min(1).reshape(-1, 1, 1, 1)
        hi = m.reshape(len(m), -1).max(1).reshape(-1, 1, 1, 1)
    else:  # the authors' get_pseudo_binary_mask: one min and max over the whole batch
        lo, hi = m.min(), m.max()
    return np.clip((m - lo) / (hi - lo + 1e-6), 0, 1)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_elb(z, t):
    """Extended log-barrier (Kervadec et al.; TMI criteria.py _LossExtendedLB.forward), elementwise."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    inside = z <= -1.0 / t**2
    out[inside] = -np.log(-z[inside]) / t
    out[~inside] = t * z[~inside] - np.log(1.0 / t**2) / t + 1.0 / t
    return out


def np_loc_mask(scores, maps, size, per_image, w, sigma):
    """Localizer: sum_c softmax(scores)_c * map_c, bilinear to the input size, min-max, sigmoid(w (m - sigma))."""
    p = np_softmax(scores)
    m = (p[:, :, None, None] * maps).sum(axis=1, keepdims=True)
    raw = np_minmax(np_resize(m, size), per_image)
    return raw, np_sigmoid(w * (raw - sigma))


def np_triplet(a, p, n, margin, eps=1e-6):
    """Mean hinge of ||a - p + eps|| - ||a - n + eps|| + margin (torch.nn.functional.triplet_margin_loss)."""
    dp = np.linalg.norm(a - p + eps, axis=1)
    dn = np.linalg.norm(a - n + eps, axis=1)
    return float(np.maximum(dp - dn + margin, 0).mean())


def np_tv(w):
    return float(np.abs(np.diff(w, axis=2)).mean() + np.abs(np.diff(w, axis=3)).mean())


def np_l2n(e):
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------ recording
class Recorder:
    """Forward hooks that keep every input/output of the given modules, as float64 NumPy arrays."""

    def __init__(self, **modules):
        self.calls = {k: [] for k in modules}
        self.handles = []
        for key, mod in modules.items():
            self.handles.append(mod.register_forward_hook(self._hook(key)))

    def _hook(self, key):
        def hook(mod, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            self.calls[key].append(([_np(a) for a in args], [_np(o) for o in outs]))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _np(t):
    return t.detach().double().numpy() if isinstance(t, torch.Tensor) else t


def batch(n=4, size=(32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, *size, generator=g), "label": torch.tensor([0, 1] * (n // 2))}


def close(got, want, tol=2e-5):
    got = float(got.detach()) if isinstance(got, torch.Tensor) else float(got)
    assert got == pytest.approx(want, rel=tol, abs=tol), (got, want)


# ------------------------------------------------------------------------------------------ CAM / Grad-CAM
@pytest.mark.parametrize("name", ["cam", "gradcam"])
def test_cam_ce_is_the_cross_entropy_of_gap_then_linear(name):
    torch.manual_seed(0)
    m = build_method(name, num_classes=2).train()
    b = batch()
    rec = Recorder(backbone=m.backbone)
    terms = m.loss(b)
    rec.close()
    (inp,), (feats,) = rec.calls["backbone"][0]
    np.testing.assert_allclose(inp, np_norm(b["image"].double().numpy()), atol=1e-5)
    w, bias = _np(m.fc.weight).reshape(2, -1), _np(m.fc.bias)
    logits = feats.mean(axis=(2, 3)) @ w.T + bias
    close(terms["ce"], np_ce(logits, b["label"].numpy()))
    close(terms["total"], np_ce(logits, b["label"].numpy()))
    assert set(terms) == {"ce", "total"}


# ------------------------------------------------------------------------------------------ min-max entropy
MINMAX_CASES = {
    "defaults": {},
    "tmi": {"mask_norm": "batch", "cls_input_scale": 0.8, "view_batches": "separate", "size_constraints": True,
            "size_mode": "nonempty_pixels",
            "sigmoid_w": 5.0, "sigmoid_sigma": 0.15, "bg_weight": 1e-7 / math.log(2), "kmax": 0.3, "kmin": 0.0},
    "fraction_size": {"size_constraints": True, "size_min_fraction": 0.3, "size_weight": 2.0, "bg_weight": 3.0,
                      "sigmoid_w": 5.0, "sigmoid_sigma": 0.2},
    "detached_fg_only": {"detach_mask": True, "bg_loss": False, "cls_input_scale": 0.5},
}


@pytest.mark.parametrize("case", sorted(MINMAX_CASES))
def test_minmax_terms_match_numpy(case):
    params = MINMAX_CASES[case]
    torch.manual_seed(0)
    m = build_method("minmax_entropy", num_classes=2, params=params).train()
    m.barrier_t = 6.5  # any t: the barrier's t is an input of the formula
    p = m.params
    b = batch(size=(40, 56))
    x, y = b["image"].double().numpy(), b["label"].numpy()
    rec = Recorder(backbone=m.backbone, loc=m.loc_head, cls=m.cls_head)
    terms = m.loss(b)
    rec.close()
    n_views = 2 if p.bg_loss else 1
    separate = p.view_batches == "separate" and n_views == 2
    assert len(rec.calls["loc"]) == 1 and len(rec.calls["cls"]) == (2 if separate else 1)
    _, (loc_scores, loc_maps) = rec.calls["loc"][0]
    cls_scores = np.concatenate([outs[0] for _, outs in rec.calls["cls"]])  # one pass, or X+ then X-
    (bb_loc_in,), _ = rec.calls["backbone"][0]
    bb_cls_in = np.concatenate([args[0] for args, _ in rec.calls["backbone"][1:]])
    xn = np_norm(x)
    np.testing.assert_allclose(bb_loc_in, xn, atol=1e-5)
    _, mask = np_loc_mask(loc_scores, loc_maps, x.shape[-2:], p.mask_norm == "image", p.sigmoid_w, p.sigmoid_sigma)
    views = [xn * mask] + ([xn * (1 - mask)] if p.bg_loss else [])
    cls_in = np.concatenate(views)
    if p.cls_input_scale != 1.0:  # the authors' classify(): F.interpolate(..., align_corners=True)
        h, w = x.shape[-2:]
        cls_in = np_resize(cls_in, (int(h * p.cls_input_scale), int(w * p.cls_input_scale)), align_corners=True)
    np.testing.assert_allclose(bb_cls_in, cls_in, atol=2e-5)
    n = len(y)
    want = {"fg": np_ce(cls_scores[:n], y), "loc": np_ce(loc_scores, y)}
    if p.bg_loss:
        want["bg"] = p.bg_weight * np_ce_uniform(cls_scores[n:])
    if p.size_constraints:
        fg_area = mask.reshape(n, -1).sum(1)
        if p.size_mode == "nonempty_pixels":  # TMI size_const: elb(-sum(bg)) + elb(-sum(fg)), / batch size
            z_fg, z_bg = -fg_area, -(mask.size / n - fg_area)
        else:
            frac = fg_area / (mask.size / n)
            z_fg, z_bg = p.size_min_fraction - frac, p.size_min_fraction - (1 - frac)
        want["size"] = p.size_weight * float((np_elb(z_fg, 6.5) + np_elb(z_bg, 6.5)).mean())
    assert set(terms) == set(want) | {"total"}
    for k, v in want.items():
        close(terms[k], v)
    close(terms["total"], sum(want.values()))


def np_erasing(xn, y, rounds, loc_outputs, mode, ce_check, w, sigma, per_image):
    """The 2019 erasing loop (deepmil/train.py train_one_epoch) and medwsol's variant, from recorded rounds.

    Returns the image each round must have seen, the accumulated mask and the per-round mean CE.
    """
    n = len(y)
    seen, ces = [xn], []
    history = np.ones(n)
    m_pos, first = None, None
    data = xn
    for er, (scores, maps) in enumerate(loc_outputs):
        _, mask = np_loc_mask(scores, maps, xn.shape[-2:], per_image, w, sigma)
        ce = np_ce_per_sample(scores, y)
        ces.append(ce.mean())
        first = ce if first is None else first
        probs = np_softmax(scores)
        p_y, pred = probs.max(1), probs.argmax(1)
        check_label = (pred == y).astype(float)
        check_loss = (ce <= first).astype(float) if ce_check else np.ones(n)
        trust = math.exp(-er / 10.0) * check_label * check_loss * p_y
        history = np.minimum(check_label, history)
        trust = (trust * history).reshape(-1, 1, 1, 1)
        m_pos = trust * mask if m_pos is None else np.maximum(m_pos, trust * mask)
        if er + 1 < rounds and history.sum() > 0:
            if mode == "accumulated":
                data = data * (1 - m_pos) * (trust != 0) + data * (trust == 0)
            else:
                data = data * (1 - mask)
            seen.append(data)
    return seen, m_pos, ces


@pytest.mark.parametrize("mode,ce_check,reduce", [("current", False, "mean"), ("accumulated", True, "sum"),
                                                  ("accumulated", False, "mean")])
def test_minmax_erasing_matches_the_2019_loop_in_numpy(mode, ce_check, reduce):
    params = {"erase_steps": 3, "erase_mode": mode, "erase_ce_check": ce_check, "erase_loss": reduce,
              "mask_norm": "batch" if mode == "accumulated" else "image", "detach_mask": mode == "accumulated"}
    torch.manual_seed(0)
    m = build_method("minmax_entropy", num_classes=2, params=params).eval()  # eval: no dropout/BN noise
    b = batch(size=(32, 48))
    with torch.no_grad():  # labels = the first round's prediction, but one sample wrong: trust is not trivial
        pred = m.localize(m.norm(b["image"]))[0].argmax(1)
    b["label"] = pred.clone()
    b["label"][0] = 1 - pred[0]
    x, y = b["image"].double().numpy(), b["label"].numpy()
    rec = Recorder(backbone=m.backbone, loc=m.loc_head, cls=m.cls_head)
    terms = m.loss(b)
    rec.close()
    loc_outputs = [outs for _, outs in rec.calls["loc"]]
    seen, m_pos, ces = np_erasing(np_norm(x), y, 3, loc_outputs, mode, ce_check, m.params.sigmoid_w,
                                  m.params.sigmoid_sigma, mode != "accumulated")
    assert len(loc_outputs) == len(seen)  # one localizer pass per round actually run
    for i, want in enumerate(seen):
        np.testing.assert_allclose(rec.calls["backbone"][i][0][0], want, atol=2e-5, err_msg=f"round {i}")
    (cls_in,), _ = rec.calls["backbone"][len(seen)]
    xn = np_norm(x)
    np.testing.assert_allclose(cls_in, np.concatenate([xn * m_pos, xn * (1 - m_pos)]), atol=2e-5)
    close(terms["loc"], float(np.sum(ces) if reduce == "sum" else np.mean(ces)))
    _, (cls_scores, _) = rec.calls["cls"][0]
    close(terms["fg"], np_ce(cls_scores[: len(y)], y))
    assert (m_pos[0] == 0).all()  # the mispredicted sample never contributes


def test_minmax_erasing_starts_at_erase_start_epoch():
    m = build_method("minmax_entropy", num_classes=2, params={"erase_steps": 3, "erase_start_epoch": 1}).train()
    rec = Recorder(loc=m.loc_head)
    m.loss(batch())
    assert len(rec.calls["loc"]) == 1  # epoch 0: no erasing
    m.on_epoch_end(0)
    m.loss(batch())
    rec.close()
    assert len(rec.calls["loc"]) > 2  # from epoch 1: several localizer rounds


def test_sigma_grows_per_epoch_up_to_its_cap_and_survives_a_checkpoint():
    m = build_method("minmax_entropy", num_classes=2, params={"sigmoid_sigma": 0.15, "sigma_growth": 0.02,
                                                              "sigma_max": 0.2})
    sig = [m.sigma]
    for e in range(4):
        m.on_epoch_end(e)
        sig.append(m.sigma)
    assert sig == pytest.approx([0.15, 0.17, 0.19, 0.2, 0.2])
    other = build_method("minmax_entropy", num_classes=2, params=m.params.model_dump())
    other.load_extra_state(m.extra_state())
    assert other.sigma == pytest.approx(0.2)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = m.eval()(x)
    assert torch.allclose(out.weight_map, torch.sigmoid(m.params.sigmoid_w * (out.extras["norm_map"] - 0.2)))


# ------------------------------------------------------------------------------------------ weight maps
def _f_logits_emb(m, feats):
    pooled = feats.mean(axis=(2, 3))
    w, bias = _np(m.classifier.fc.weight).reshape(m.num_classes, -1), _np(m.classifier.fc.bias)
    return pooled @ w.T + bias, np_l2n(pooled)


def _np_w(gen_out):
    return np_sigmoid(gen_out)  # 32 x 32 inputs: no padding or crop around the U-Net


@pytest.mark.parametrize("target", ["label", "prediction"])
def test_weightmap_ce_terms_match_numpy(target):
    torch.manual_seed(0)
    params = {"unet_features": SMALL_UNET, "ce_weight": 0.7, "embed_weight": 1.3, "area_weight": 0.4,
              "area_target": 0.1, "tv_weight": 0.2, "cls_weight": 0.9, "ce_target": target}
    m = build_method("weightmap_ce", num_classes=2, params=params).train()
    b = batch()
    x, y = b["image"].double().numpy(), b["label"].numpy()
    rec = Recorder(gen=m.generator, fb=m.classifier.backbone)
    terms = m.loss(b)
    rec.close()
    _, (g,) = rec.calls["gen"][0]
    w = _np_w(g)
    (in_cls,), (f_cls,) = rec.calls["fb"][0]  # f on I, train mode (the "cls" term)
    (in_anchor,), (f_anchor,) = rec.calls["fb"][1]  # f on I, fixed (anchor, prediction)
    (in_view,), (f_view,) = rec.calls["fb"][2]  # f on I*W, fixed
    xn = np_norm(x)
    np.testing.assert_allclose(in_cls, xn, atol=1e-5)
    np.testing.assert_allclose(in_anchor, xn, atol=1e-5)
    rgb_view = MEAN + w * (x - MEAN)  # I*W in normalised space: removed pixels = mean colour
    np.testing.assert_allclose(in_view, np_norm(rgb_view), atol=2e-5)
    cls_logits, _ = _f_logits_emb(m, f_cls)
    anchor_logits, e_img = _f_logits_emb(m, f_anchor)
    view_logits, e_fg = _f_logits_emb(m, f_view)
    t = y if target == "label" else anchor_logits.argmax(1)
    want = {
        "cls": np_ce(cls_logits, y),
        "fg_ce": np_ce(view_logits, t),
        "embed": float(((e_img - e_fg) ** 2).sum(1).mean()),
        "area": float(np.maximum(w.reshape(len(y), -1).mean(1) - 0.1, 0).mean()),
        "tv": np_tv(w),
    }
    assert set(terms) == set(want) | {"total"}
    for k, v in want.items():
        close(terms[k], v)
    close(terms["total"], 0.9 * want["cls"] + 0.7 * want["fg_ce"] + 1.3 * want["embed"] + 0.4 * want["area"]
          + 0.2 * want["tv"])


def np_class_triplets(y):
    return [(i, j, k) for i in range(len(y)) for j in range(len(y)) for k in range(len(y))
            if y[j] == y[i] and j != i and y[k] != y[i]]


@pytest.mark.parametrize("embedder", ["classifier", "siamese"])
def test_weightmap_triplet_terms_match_numpy(embedder):
    torch.manual_seed(0)
    params = {"unet_features": SMALL_UNET, "margin_fg": 0.7, "margin_class": 0.4, "class_weight": 1.5,
              "area_weight": 0.3, "tv_weight": 0.25, "cls_weight": 1.1, "embedder": embedder}
    m = build_method("weightmap_triplet", num_classes=2, params=params).train()
    b = batch(n=6)
    x, y = b["image"].double().numpy(), b["label"].numpy()
    mods = {"gen": m.generator, "fb": m.classifier.backbone}
    if embedder == "siamese":
        mods["emb"] = m.embedder
    rec = Recorder(**mods)
    terms = m.loss(b)
    rec.close()
    _, (g,) = rec.calls["gen"][0]
    w = _np_w(g)
    n = len(y)
    fg_rgb, bg_rgb = MEAN + w * (x - MEAN), MEAN + (1 - w) * (x - MEAN)
    (_, (f_cls,)) = rec.calls["fb"][0]
    cls_logits, _ = _f_logits_emb(m, f_cls)
    if embedder == "classifier":
        (_, (f_anchor,)), ((in_views,), (f_views,)) = rec.calls["fb"][1], rec.calls["fb"][2]
        np.testing.assert_allclose(in_views, np_norm(np.concatenate([fg_rgb, bg_rgb])), atol=2e-5)
        _, e_img = _f_logits_emb(m, f_anchor)
        _, e_views = _f_logits_emb(m, f_views)
        e_fg, e_bg = e_views[:n], e_views[n:]
    else:
        assert len(rec.calls["fb"]) == 1  # f only sees the plain image (its CE); the triplets use the embedder
        (in_emb,), (f_emb,) = rec.calls["emb"][0]
        np.testing.assert_allclose(in_emb, np_norm(np.concatenate([x, fg_rgb, bg_rgb])), atol=2e-5)
        e = np_l2n(f_emb.mean(axis=(2, 3)))
        e_img, e_fg, e_bg = e[:n], e[n : 2 * n], e[2 * n :]
    trip = np_class_triplets(y)
    assert len(trip) == 6 * 2 * 3
    a, p_, n_ = (np.array(v) for v in zip(*trip))
    want = {
        "cls": np_ce(cls_logits, y),
        "triplet_fg": np_triplet(e_img, e_fg, e_bg, 0.7),
        "triplet_class": np_triplet(e_fg[a], e_fg[p_], e_fg[n_], 0.4),
        "area": float(w.reshape(n, -1).mean(1).mean()),
        "tv": np_tv(w),
    }
    assert set(terms) == set(want) | {"total"}
    for k, v in want.items():
        close(terms[k], v)
    close(terms["total"], 1.1 * want["cls"] + want["triplet_fg"] + 1.5 * want["triplet_class"]
          + 0.3 * want["area"] + 0.25 * want["tv"])


def test_siamese_triplets_train_the_embedder_and_g_but_not_f():
    torch.manual_seed(0)
    m = build_method("weightmap_triplet", num_classes=2,
                     params={"unet_features": SMALL_UNET, "embedder": "siamese"}).train()
    t = m.loss(batch())
    (t["triplet_fg"] + t["triplet_class"]).backward()
    assert all(p.grad is None or not p.grad.any() for p in m.classifier.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.embedder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.parameters())
