"""The evaluation protocol (Choe et al. CVPR 2020; Belharbi et al. TMI 2022).

* tau is chosen on the pixel-labelled validation subset (``valpx``) by best mIoU and
  applied to the test set; tau = 0.5 is reported too;
* PxAP over the whole set (thresholds every 0.001);
* per-image mean F1+ / F1- (Belharbi) and dataset-level Dice fg / bg (pixel counts pooled,
  the survey's), IoU, mIoU, boundary F1, classification error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from medwsol.engine.runtime import amp_dtype, autocast, select_device, to_device
from medwsol.io import write_json, write_text

__all__ = ["evaluate", "predict", "score_split", "evaluate_model", "make_eval_loader", "metrics_table"]

_MEAN = (0.485, 0.456, 0.406)


def _pad_collate(pad_to: int):
    """Collate images of different sizes: pad bottom/right with the ImageNet mean colour."""

    def collate(items: list[dict]) -> dict:
        hs = [int(it["image"].shape[-2]) for it in items]
        ws = [int(it["image"].shape[-1]) for it in items]
        H = -(-max(hs) // pad_to) * pad_to
        W = -(-max(ws) // pad_to) * pad_to
        imgs = torch.empty(len(items), 3, H, W)
        for c in range(3):
            imgs[:, c] = _MEAN[c]
        masks = None
        if all("mask" in it for it in items):
            masks = torch.zeros(len(items), 1, H, W)
        for i, it in enumerate(items):
            im = torch.as_tensor(it["image"])
            imgs[i, :, : hs[i], : ws[i]] = im[:3]
            if masks is not None:
                masks[i, :, : hs[i], : ws[i]] = torch.as_tensor(it["mask"])[:1]
        out = {
            "image": imgs,
            "label": torch.as_tensor([int(torch.as_tensor(it["label"]).item()) for it in items]),
            "size": torch.as_tensor(list(zip(hs, ws))),
            "name": [str(it.get("name", i)) for i, it in enumerate(items)],
        }
        if masks is not None:
            out["mask"] = masks
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


@torch.no_grad()
def predict(model, loader, device: torch.device, dtype=None, channels_last: bool = False) -> Iterator[dict]:
    """Yield one dict per image: name, label, probs [C], map HxW float32, mask HxW bool|None, image HxWx3."""
    model.eval()
    for batch in loader:
        b = to_device(batch, device, channels_last)
        with autocast(device, dtype):
            out = model(b["image"])
        if not (torch.isfinite(out.weight_map).all() and torch.isfinite(out.logits).all()):
            from medwsol.errors import TrainingError

            raise TrainingError(
                f"the model produced NaN/inf outputs (first batch: {batch['name'][0]}); the weights diverged; "
                "fix: use an earlier checkpoint, lower train.lr or enable train.grad_clip"
            )
        probs = F.softmax(out.logits.float(), dim=1).cpu().numpy()
        maps = out.weight_map.float().clamp(0, 1).cpu().numpy()[:, 0]
        masks = batch.get("mask")
        for i, (h, w) in enumerate(batch["size"].tolist()):
            yield {
                "name": batch["name"][i],
                "label": int(batch["label"][i]),
                "probs": probs[i],
                "map": maps[i, :h, :w],
                "mask": None if masks is None else masks[i, 0, :h, :w].numpy() > 0.5,
                "image": batch["image"][i, :, :h, :w],
            }


def score_split(model, loader, device, dtype=None, channels_last=False, n_bins: int = 1000) -> dict[str, float]:
    """Quick scores of a split for model selection: error, loss, PxAP and best mIoU (when masks exist)."""
    from medwsol.metrics import PixelPR

    pr = PixelPR(n_bins=n_bins)
    n, wrong, loss, has_mask = 0, 0, 0.0, False
    for r in predict(model, loader, device, dtype, channels_last):
        n += 1
        wrong += int(np.argmax(r["probs"]) != r["label"])
        loss += float(-np.log(max(r["probs"][r["label"]], 1e-12)))
        if r["mask"] is not None:
            has_mask = True
            pr.update(r["map"], r["mask"])
    out = {"error": 100.0 * wrong / max(n, 1), "loss": loss / max(n, 1), "n": n}
    if has_mask:
        tau, miou = pr.best_threshold("miou")
        out.update({"pxap": 100.0 * pr.pxap(), "miou": 100.0 * miou, "tau": tau})
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


def evaluate_model(model, cfg, df, device, out_dir: Path | None = None, console: Console | None = None,
                   classes: list[str] | None = None) -> dict[str, Any]:
    """Run the protocol on ``df`` (a loaded manifest); write files to ``out_dir`` when given."""
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
    grid_rows: list[dict] = []
    for split in ev.splits:
        records = split_records(df, split)
        if not records:
            console.print(f"[yellow]warning:[/] split {split!r} is empty in {cfg.data.manifest}; skipped")
            continue
        results = []
        for r in predict(model, make_eval_loader(records, cfg), device, dtype, cl):
            img = r.pop("image")
            if len(grid_rows) < ev.n_overlays and split == ev.splits[0]:
                grid_rows.append({**r, "image": img.permute(1, 2, 0).numpy()})
            results.append(r)
        m = _split_metrics(results, tau, n_bins, ev.boundary_tolerance)
        pr = m.pop("_pr", None)
        metrics[split] = m
        if out_dir is not None and pr is not None:
            from medwsol.export.overlay import plot_pr_curve

            p, rc = pr.precision_recall()
            plot_pr_curve(p, rc, out_dir / f"pr_curve_{split}.png", label=f"{split}: PxAP {m['pxap']:.1f}")
    if out_dir is not None:
        write_json(out_dir / "metrics.json", metrics)
        write_text(out_dir / "table.md", metrics_table(metrics))
        if grid_rows:
            from medwsol.export.overlay import overlay_grid

            names = classes or list(cfg.data.classes)
            rows = [
                dict(image=r["image"], gt=r["mask"], weight_map=r["map"], threshold=tau, name=r["name"],
                     label=names[r["label"]], pred=names[int(np.argmax(r["probs"]))])
                for r in _balanced(grid_rows, ev.n_overlays)
            ]
            overlay_grid(rows, out_dir / "overlays.png", title=f"{cfg.model.method}: weight maps (tau={tau:.3f})")
    return metrics


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
    for split, m in metrics.items():
        if split == "threshold" or not isinstance(m, dict):
            continue
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
    for split, m in metrics.items():
        if split == "threshold" or not isinstance(m, dict):
            continue
        for k, v in m.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    out[f"{split}.{k}.{k2}"] = v2
            elif isinstance(v, (int, float)):
                out[f"{split}.{k}"] = v
    return out


def evaluate(ctx) -> dict[str, Any]:
    """The ``evaluate`` stage."""
    from medwsol.data.manifest import load_manifest
    from medwsol.engine.models import describe_ref, load_model

    cfg = ctx.cfg
    console = Console(stderr=True)
    device = select_device(cfg.train.device)
    model = load_model(ctx.model_ref, ctx.run_dir, cfg.tracking.uri, list(cfg.data.classes), device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    df = load_manifest(cfg.data.manifest, list(cfg.data.classes))
    out_dir = ctx.run_dir / "eval"
    metrics = evaluate_model(model, cfg, df, device, out_dir=out_dir, console=console)
    metrics["model"] = describe_ref(ctx.model_ref, ctx.run_dir)
    write_json(out_dir / "metrics.json", metrics)
    ctx.tracker.log_metrics(flat_metrics(metrics))
    for f in sorted(out_dir.iterdir()):
        ctx.tracker.log_artifact(f, "eval")
    console.print(metrics_table(metrics))
    return metrics
