"""The evaluation protocol (Choe et al. CVPR 2020; Belharbi et al. TMI 2022).

* tau is chosen on the pixel-labelled validation subset (``valpx``) by best mIoU and
  applied to the test set; tau = 0.5 is reported too;
* PxAP over the whole set (thresholds every 0.001);
* per-image mean F1+ / F1- (Belharbi) and dataset-level Dice fg / bg (pixel counts pooled,
  the survey's), IoU, mIoU, boundary F1, classification error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from medwsol.engine.runtime import amp_dtype, autocast, to_device
from medwsol.io import write_json, write_text

__all__ = ["predict", "score_split", "evaluate_model", "make_eval_loader", "metrics_table", "flat_metrics",
           "calibrate", "EvalResult", "EVAL_PAD_VALUE"]

#: Value of padded pixels, as the training chain pads (MONAI ``SpatialPadd``, constant 0).
EVAL_PAD_VALUE = 0.0


def _pad_collate(pad_to: int):
    """Pad each image on its own (bottom/right, to a multiple of ``pad_to``); group equal sizes.

    Returns a list of sub-batches (dicts as a normal collate makes them, plus ``size``): the padding
    of an image never depends on the other images of the loader's batch.
    """

    def collate(items: list[dict]) -> list[dict]:
        groups: dict[tuple[int, int], list[int]] = {}
        padded = []
        for i, it in enumerate(items):
            h, w = (int(v) for v in it["image"].shape[-2:])
            H, W = -(-h // pad_to) * pad_to, -(-w // pad_to) * pad_to
            groups.setdefault((H, W), []).append(i)
            padded.append((h, w, H, W))
        out = []
        for (H, W), idx in groups.items():
            imgs = torch.full((len(idx), 3, H, W), EVAL_PAD_VALUE)
            masks = torch.zeros(len(idx), 1, H, W) if all("mask" in items[i] for i in idx) else None
            for j, i in enumerate(idx):
                h, w = padded[i][:2]
                imgs[j, :, :h, :w] = torch.as_tensor(items[i]["image"])[:3]
                if masks is not None:
                    masks[j, :, :h, :w] = torch.as_tensor(items[i]["mask"])[:1]
            b = {
                "image": imgs,
                "label": torch.as_tensor([int(torch.as_tensor(items[i]["label"]).item()) for i in idx]),
                "size": torch.as_tensor([padded[i][:2] for i in idx]),
                "name": [str(items[i].get("name", i)) for i in idx],
                "order": idx,  # positions in the loader's batch: predict yields images in manifest order
            }
            if masks is not None:
                b["mask"] = masks
            out.append(b)
        return out

    return collate


def make_eval_loader(records: list[dict], cfg, cache: bool = True):
    """A deterministic loader over full images (padded per batch, cropped back in ``predict``)."""
    from torch.utils.data import DataLoader

    from medwsol.data.datasets import make_dataset
    from medwsol.data.transforms import eval_transforms

    ds = make_dataset(records, eval_transforms(cfg.data), cfg.data) if cache else None
    if ds is None:
        from monai.data import Dataset

        ds = Dataset(records, eval_transforms(cfg.data))
    return DataLoader(
        ds,
        batch_size=cfg.evaluate.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
        collate_fn=_pad_collate(cfg.data.eval_pad_to),
        pin_memory=torch.cuda.is_available(),
    )


def _batches(loader) -> Iterator[dict]:
    for batch in loader:
        yield from (batch if isinstance(batch, list) else [batch])


def _in_order(loader) -> Iterator[list[dict]]:
    """The size groups of each loader batch (one list per batch, to be re-ordered by ``order``)."""
    for batch in loader:
        yield batch if isinstance(batch, list) else [batch]


@torch.no_grad()
def predict(model, loader, device: torch.device, dtype=None, channels_last: bool = False,
            served=None) -> Iterator[dict]:
    """Yield one dict per image: name, label, probs [C], map HxW float32, mask HxW bool|None, image 3xHxW.

    ``model`` is a ``WSOLMethod`` (``map`` = its weight map) or a
    :class:`~medwsol.engine.served.ServedModel` (``map`` = the served score). With ``served`` (the
    ServedModel of ``model``) each dict also has ``served_probs`` and ``served_map``, from the same
    forward pass.
    """
    model.eval()
    for groups in _in_order(loader):
        done: list[tuple[int, dict]] = []
        for batch in groups:
            done += _predict_group(model, batch, device, dtype, channels_last, served)
        yield from (r for _, r in sorted(done, key=lambda t: t[0]))


def _predict_group(model, batch: dict, device, dtype, channels_last: bool, served) -> list[tuple[int, dict]]:
    """One forward pass over a group of equal-size images; ``(position in the loader batch, result)`` each."""
    from medwsol.engine.served import ServedModel

    b = to_device(batch, device, channels_last)
    sp = ss = None
    with autocast(device, dtype):
        if isinstance(model, ServedModel):
            probs_t, _, maps_t = model(b["image"])
        else:
            out = model(b["image"])
            probs_t, maps_t = F.softmax(out.logits.float(), dim=1), out.weight_map
            if served is not None:  # the served view: the same forward pass unless it serves another map class
                sp, _, ss = served.serve(out if served.target_class is None else served.run_network(b["image"]))
    if not (torch.isfinite(maps_t).all() and torch.isfinite(probs_t).all()):
        from medwsol.errors import TrainingError

        raise TrainingError(
            f"the model produced NaN/inf outputs (first batch: {batch['name'][0]}); the weights diverged; "
            "fix: use an earlier checkpoint, lower train.lr or enable train.grad_clip"
        )
    probs = probs_t.float().cpu().numpy()
    maps = maps_t.float().clamp(0, 1).cpu().numpy()[:, 0]
    if ss is not None:
        sp, ss = sp.float().cpu().numpy(), ss.float().clamp(0, 1).cpu().numpy()[:, 0]
    masks = batch.get("mask")
    order = batch.get("order") or list(range(len(batch["name"])))
    rows = []
    for i, (h, w) in enumerate(batch["size"].tolist()):
        r = {
            "name": batch["name"][i],
            "label": int(batch["label"][i]),
            "probs": probs[i],
            "map": maps[i, :h, :w],
            "mask": None if masks is None else masks[i, 0, :h, :w].numpy() > 0.5,
            "image": batch["image"][i, :, :h, :w],
        }
        if ss is not None:
            r["served_probs"], r["served_map"] = sp[i], ss[i, :h, :w]
        rows.append((order[i], r))
    return rows


def score_split(model, loader, device, dtype=None, channels_last=False, n_bins: int = 1000) -> dict[str, float]:
    """Quick scores of a split for model selection: error, loss, and (when masks exist) PxAP, the
    best-mIoU threshold ``tau``, mIoU and the dataset-level foreground Dice at ``tau``."""
    return scores_from_state(split_state(model, loader, device, dtype, channels_last, n_bins))


def split_state(model, loader, device, dtype=None, channels_last=False, n_bins: int = 1000) -> dict[str, Any]:
    """The counts behind :func:`score_split`: images, errors, summed loss, the PxAP histograms (``PixelPR``).

    States of disjoint parts of a split merge exactly (:func:`merge_split_states`): data-parallel
    training scores each rank's share and merges them.
    """
    from medwsol.metrics import PixelPR

    pr = PixelPR(n_bins=n_bins)
    n, wrong, losses, has_mask = 0, 0, [], False
    for r in predict(model, loader, device, dtype, channels_last):
        n += 1
        wrong += int(np.argmax(r["probs"]) != r["label"])
        losses.append(float(-np.log(max(r["probs"][r["label"]], 1e-12))))
        if r["mask"] is not None:
            has_mask = True
            pr.update(r["map"], r["mask"])
    return {"n": n, "wrong": wrong, "losses": losses, "has_mask": has_mask, "pr": pr}


def merge_split_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state from the states of disjoint parts (histograms and counts added)."""
    from medwsol.metrics import PixelPR

    pr = PixelPR(n_bins=states[0]["pr"].n_bins)
    for st in states:
        pr.merge(st["pr"])
    return {"n": sum(st["n"] for st in states), "wrong": sum(st["wrong"] for st in states),
            "losses": [v for st in states for v in st["losses"]], "has_mask": any(st["has_mask"] for st in states),
            "pr": pr}


def scores_from_state(state: dict[str, Any]) -> dict[str, float]:
    """:func:`score_split`'s numbers from a (merged) :func:`split_state`."""
    pr, n, wrong = state["pr"], state["n"], state["wrong"]
    loss = float(np.sum(np.sort(np.asarray(state["losses"], np.float64)))) if state["losses"] else 0.0
    out = {"error": 100.0 * wrong / max(n, 1), "loss": loss / max(n, 1), "n": n}
    if state["has_mask"]:
        tau, miou = pr.best_threshold("miou")
        out.update({"pxap": 100.0 * pr.pxap(), "miou": 100.0 * miou, "tau": tau,
                    "dice": 100.0 * float(pr.dice_at(tau)[0])})
    return out


def _split_metrics(results: list[dict], tau: float, n_bins: int, tol: int) -> dict[str, Any]:
    from medwsol.metrics import PerImageF1, PixelPR, boundary_f1, classification_error

    pr = PixelPR(n_bins=n_bins)
    per = {t: PerImageF1(threshold=t) for t in (tau, 0.5)}
    bf1 = {t: [] for t in (tau, 0.5)}
    y_true = [r["label"] for r in results]
    y_pred = [int(np.argmax(r["probs"])) for r in results]
    masked = [r for r in results if r["mask"] is not None]
    for r in masked:
        pr.update(r["map"], r["mask"])
        for t in per:
            per[t].update(r["map"], r["mask"])
            bf1[t].append(boundary_f1(r["map"] >= t, r["mask"], tolerance=tol))
    out: dict[str, Any] = {"n_images": len(results), "n_masked": len(masked),
                           "classification_error": classification_error(y_true, y_pred)}
    if masked:
        out["pxap"] = 100.0 * pr.pxap()
        iou_fg, iou_bg, miou = pr.iou_per_threshold()
        for name, t in (("tau", tau), ("t0.5", 0.5)):
            k = min(int(round(t * n_bins)), n_bins - 1)
            dice_fg, dice_bg = pr.dice_at(t)
            out[name] = {
                "threshold": t,
                "f1_pos": 100.0 * per[t].f1_pos,
                "f1_neg": 100.0 * per[t].f1_neg,
                "iou_per_image": 100.0 * per[t].iou,
                "dice_fg": 100.0 * dice_fg,
                "dice_bg": 100.0 * dice_bg,
                "iou_fg": 100.0 * float(iou_fg[k]),
                "iou_bg": 100.0 * float(iou_bg[k]),
                "miou": 100.0 * float(miou[k]),
                "boundary_f1": 100.0 * float(np.mean(bf1[t])),
            }
        out["_pr"] = pr
    return out


@dataclass
class EvalResult:
    """What :func:`evaluate_model` measured; the pipeline draws the pictures from it.

    Attributes:
        metrics: the ``metrics.json`` content (protocol per split, ``threshold``, ``served``).
        pr_curves: ``{name: (precision, recall, label)}`` per evaluated split (``served_<split>`` too).
        overlay_rows: rows for :func:`medwsol.export.overlay.overlay_grid` (first split, balanced by label).
    """

    metrics: dict[str, Any]
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray, str]] = field(default_factory=dict)
    overlay_rows: list[dict[str, Any]] = field(default_factory=list)


def calibrate(network, cfg, df, device: torch.device, score: str, positive_class: str,
              map_class: str = "predicted") -> dict[str, Any]:
    """Fit what the package serves: the fixed map range, then ``tau`` on the served score.

    * ``map_range`` (methods that normalise per image): :func:`~medwsol.engine.served.fit_map_range`
      over the ``valid`` images (else ``valpx``, else the first 64 ``train`` images);
    * ``tau``: best mIoU of the served score (``score``: ``weight`` or ``weight_x_prob`` of
      ``positive_class``) over the ``evaluate.threshold_split`` images with masks; 0.5 when there are none.

    Returns:
        The package's ``calibration`` dict.
    """
    from medwsol.data.manifest import split_records
    from medwsol.engine.served import ServedModel, choose_tau, fit_map_range

    ev = cfg.evaluate
    n_bins = int(round(1.0 / ev.threshold_step))
    dtype = amp_dtype(device, cfg.train.amp)
    classes = list(getattr(network, "classes", None) or cfg.data.classes)
    probe = ServedModel(network, classes, positive_class, score, map_class=map_class)
    fitted, where = None, None
    for split, recs in (("valid", split_records(df, "valid")), ("valpx", split_records(df, "valpx")),
                        ("train", split_records(df, "train")[:64])):
        if recs:
            with autocast(device, dtype):
                fitted = fit_map_range(network, _batches(make_eval_loader(recs, cfg, cache=False)), device,
                                       target_class=probe.target_class)
            where = split
            break
    served = ServedModel(network, classes, positive_class, score, map_range=fitted and fitted["map_range"],
                         map_class=map_class)
    recs = [r for r in split_records(df, ev.threshold_split) if "mask" in r]
    cal: dict[str, Any] = {
        "map_range": fitted and fitted["map_range"],
        "map_range_fitted_on": (f"medians of the per-image raw-map min and max over {fitted['n_images']} {where} "
                                "images" if fitted else "none needed (the method's map is not rescaled per image)"),
        "score": score,
        "positive_class": positive_class,
        "map_class": served.map_class if served.target_class is not None else "predicted",
        "tau": 0.5,
        "tau_chosen_on": "default 0.5 (no pixel-labelled validation images)",
    }
    if recs:
        sel = choose_tau(predict(served, make_eval_loader(recs, cfg), device, dtype, cfg.train.channels_last), n_bins)
        cal.update(tau=sel["tau"], tau_chosen_on=f"best mIoU of the served {score} score on {ev.threshold_split} "
                   f"({sel['n']} images)", tau_miou=sel["miou"], tau_pxap=sel["pxap"], tau_dice=sel["dice"])
    return cal


def evaluate_model(model, cfg, df, device, served=None, out_dir: Path | None = None,
                   console: Console | None = None, classes: list[str] | None = None) -> EvalResult:
    """Run the protocol (and the served view, when ``served`` is given) on ``df`` (a loaded manifest).

    Args:
        model: a ``WSOLMethod`` in eval mode.
        cfg: the pipeline config (``evaluate``, ``data``, ``train.amp``).
        df: a loaded manifest.
        device: where to run.
        served: the :class:`~medwsol.engine.served.ServedModel` of this model (its ``tau`` is used as is).
        out_dir: writes ``metrics.json`` and ``table.md`` there when given.
        console: for warnings.
        classes: class names for the overlay labels (default ``data.classes``).
    """
    from medwsol.data.manifest import split_records

    console = console or Console(stderr=True)
    ev = cfg.evaluate
    n_bins = int(round(1.0 / ev.threshold_step))
    dtype = amp_dtype(device, cfg.train.amp)
    cl = cfg.train.channels_last
    tau, tau_src, tau_val = 0.5, "default (no pixel-labelled validation images)", None
    recs = [r for r in split_records(df, ev.threshold_split) if "mask" in r]
    if recs:
        s = score_split(model, make_eval_loader(recs, cfg), device, dtype, cl, n_bins=n_bins)
        tau, tau_val = float(s["tau"]), float(s["miou"])
        tau_src = f"best mIoU on {ev.threshold_split} ({len(recs)} images)"
    metrics: dict[str, Any] = {"threshold": {"tau": tau, "chosen_on": tau_src, "miou_on_selection": tau_val}}
    result = EvalResult(metrics)
    names = classes or list(cfg.data.classes)
    served_metrics: dict[str, Any] = {}
    for split in ev.splits:
        records = split_records(df, split)
        if not records:
            console.print(f"[yellow]warning:[/] split {split!r} is empty in {cfg.data.manifest}; skipped")
            continue
        results, sres = [], []
        for r in predict(model, make_eval_loader(records, cfg), device, dtype, cl, served=served):
            img = r.pop("image")
            if served is not None:
                sres.append({**r, "probs": r.pop("served_probs"), "map": r.pop("served_map")})
            if len(result.overlay_rows) < 4 * ev.n_overlays and split == ev.splits[0]:
                result.overlay_rows.append(dict(
                    image=img.permute(1, 2, 0).numpy(), gt=r["mask"], weight_map=r["map"], threshold=tau,
                    name=r["name"], label=names[r["label"]], pred=names[int(np.argmax(r["probs"]))]))
            results.append(r)
        m = _split_metrics(results, tau, n_bins, ev.boundary_tolerance)
        pr = m.pop("_pr", None)
        metrics[split] = m
        if pr is not None:
            p, rc = pr.precision_recall()
            result.pr_curves[split] = (p, rc, f"{split}: PxAP {m['pxap']:.1f}")
        if served is not None:
            sm = _split_metrics(sres, served.tau, n_bins, ev.boundary_tolerance)
            spr = sm.pop("_pr", None)
            served_metrics[split] = sm
            if spr is not None:
                p, rc = spr.precision_recall()
                result.pr_curves[f"served_{split}"] = (p, rc, f"{split} (served {served.score_mode}): "
                                                              f"PxAP {sm['pxap']:.1f}")
    result.overlay_rows = _balanced(result.overlay_rows, ev.n_overlays)
    if served is not None:
        metrics["served"] = {"score": served.score_mode, "tau": served.tau, "tau_source": served.tau_source,
                             "map_range": served.map_range, "positive_class": served.positive_class, **served_metrics}
    if out_dir is not None:
        write_json(out_dir / "metrics.json", metrics)
        write_text(out_dir / "table.md", metrics_table(metrics))
    return result


def _balanced(rows: list[dict], n: int) -> list[dict]:
    by = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    out = []
    while len(out) < min(n, len(rows)):
        for k in sorted(by):
            if by[k] and len(out) < n:
                out.append(by[k].pop(0))
    return out


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown table: one column block per split, rows per metric, at tau* and at 0.5."""
    th = metrics["threshold"]
    lines = [f"Threshold tau = {th['tau']:.3f} ({th['chosen_on']}).", ""]
    served = metrics.get("served")
    blocks = [(k, v) for k, v in metrics.items() if k not in ("threshold", "served", "model") and isinstance(v, dict)]
    if served:
        lines += [f"Served (the model package: {served['score']} score, fixed map range, tau = {served['tau']:.3f} "
                  f"from {served['tau_source']}): second block per split.", ""]
        blocks += [(f"{k}, served", v) for k, v in served.items() if isinstance(v, dict) and "n_images" in v]
    for split, m in blocks:
        lines += [f"### {split} ({m['n_images']} images, {m['n_masked']} with masks)", ""]
        lines += ["| metric | tau* | tau=0.5 |", "| --- | ---: | ---: |"]
        lines.append(f"| classification error (%) | {m['classification_error']:.2f} | |")
        if "pxap" in m:
            lines.append(f"| PxAP | {m['pxap']:.2f} | |")
            for key, label in [("f1_pos", "F1+ (per image)"), ("f1_neg", "F1- (per image)"),
                               ("dice_fg", "Dice fg (dataset)"), ("dice_bg", "Dice bg (dataset)"),
                               ("iou_fg", "IoU fg"), ("miou", "mIoU"), ("boundary_f1", "boundary F1")]:
                lines.append(f"| {label} | {m['tau'][key]:.2f} | {m['t0.5'][key]:.2f} |")
        lines.append("")
    return "\n".join(lines)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``test.pxap``-style keys for the tracker."""
    out = {"tau": metrics["threshold"]["tau"]}
    served = metrics.get("served") or {}
    if "tau" in served:
        out["served.tau"] = served["tau"]
    items = [(k, v) for k, v in metrics.items() if k not in ("threshold", "served")]
    items += [(f"served.{k}", v) for k, v in served.items() if isinstance(v, dict) and "n_images" in v]
    for split, m in items:
        if not isinstance(m, dict):
            continue
        for k, v in m.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    out[f"{split}.{k}.{k2}"] = v2
            elif isinstance(v, (int, float)):
                out[f"{split}.{k}"] = v
    return out
