"""The trainer: one loop for every registered method.

* SGD / AdamW, none / step / cosine schedules with optional linear warm-up;
* AMP on CUDA (bf16, or fp16 with a GradScaler), bf16 autocast on CPU opt-in, channels_last;
* gradient clipping; a NaN/inf loss stops training with a clear message (the last
  good checkpoint is kept);
* seeded and deterministic on CPU: the shuffling, the augmentation and the torch RNG are
  re-seeded from ``(seed, epoch)`` at each epoch, so ``--resume`` reaches exactly the
  metrics of an uninterrupted run;
* ``checkpoints/last.pt`` written atomically every epoch, ``best.pt`` on improvement of
  ``train.select_metric`` (among the epochs whose ``val_error`` is at most
  ``train.select_max_val_error``, when set: see :func:`selection_key`); early stopping after
  ``train.patience`` epochs without one;
* per-epoch metrics to ``train_log.csv`` and the tracker; the best model is logged to the
  tracker and registered (champion alias moves only on improvement).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medwsol.checkpoint import read_checkpoint, write_checkpoint
from medwsol.engine.runtime import amp_dtype, autocast, seed_everything, select_device, set_threads, to_device
from medwsol.errors import CheckpointError, DataError, TrainingError
from medwsol.io import write_text

__all__ = ["train", "SELECT", "selection_key", "build_optimizer", "build_scheduler"]

# select_metric -> (key in the validation scores, higher is better)
SELECT: dict[str, tuple[str, bool]] = {
    "val_error": ("val_error", False),
    "val_loss": ("val_loss", False),
    "valpx_miou": ("valpx_miou", True),
    "valpx_pxap": ("valpx_pxap", True),
    "valpx_dice": ("valpx_dice", True),
    "last": ("epoch", True),
}


def selection_key(row: dict[str, Any], key: str, higher: bool, max_val_error: float | None) -> tuple[bool, float]:
    """The rank of an epoch for model selection (the larger tuple is the better epoch).

    Without ``max_val_error`` it is ``(True, metric)`` (negated when lower is better). With it, an
    epoch whose ``val_error`` exceeds the bound ranks below every epoch that meets it, and among
    such epochs the lower ``val_error`` wins: ``(False, -val_error)``.

    Example:
        >>> from medwsol.engine.train import selection_key
        >>> collapsed = selection_key({"valpx_pxap": 62.7, "val_error": 50.0}, "valpx_pxap", True, 10.0)
        >>> working = selection_key({"valpx_pxap": 45.8, "val_error": 0.0}, "valpx_pxap", True, 10.0)
        >>> working > collapsed
        True
    """
    value = float(row.get(key, row["epoch"]))
    if max_val_error is not None and row["val_error"] > max_val_error:
        return False, -float(row["val_error"])
    return True, value if higher else -value


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                               nesterov=bool(tc.nesterov and tc.momentum > 0))
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, tc) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch multiplicative schedule (stepped once per epoch), floored at ``tc.min_lr``."""

    def factor(epoch: int) -> float:
        return max(_factor(epoch), tc.min_lr / tc.lr)

    def _factor(epoch: int) -> float:
        if tc.warmup_epochs and epoch < tc.warmup_epochs:
            return (epoch + 1) / (tc.warmup_epochs + 1)
        if tc.schedule == "cosine":
            span = max(tc.epochs - tc.warmup_epochs, 1)
            t = min(max(epoch - tc.warmup_epochs, 0) / span, 1.0)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))
        if tc.schedule == "step":
            return tc.gamma ** (epoch // tc.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _records(df, split: str) -> list[dict]:
    from medwsol.data.manifest import split_records

    return split_records(df, split)


def _write_log(path: Path, history: list[dict]) -> None:
    import pandas as pd

    write_text(path, pd.DataFrame(history).to_csv(index=False))


def train(cfg, run_dir: Path, tracker=None, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data.manifest`` into ``run_dir``.

    Writes ``run_dir/checkpoints/{last,best}.pt`` and ``run_dir/train_log.csv``; per-epoch metrics go to
    ``tracker`` (any :class:`medwsol.tracking.Tracker`, or None). Packaging, registration and the
    training curves are the pipeline's business.

    Returns:
        A summary (best epoch and metric, whether the classification guard was met, checkpoint paths).
    """
    from medwsol.data.datasets import make_dataset, make_loader
    from medwsol.data.manifest import load_manifest
    from medwsol.data.transforms import train_transforms
    from medwsol.engine.evaluate import make_eval_loader, score_split
    from medwsol.methods.base import build_method

    log_metrics = tracker.log_metrics if tracker is not None else (lambda *_a, **_k: None)
    run_dir = Path(run_dir)
    tc, dc = cfg.train, cfg.data
    console = Console(stderr=True)
    set_threads(tc.threads)
    seed_everything(cfg.seed, tc.deterministic)
    device = select_device(tc.device)
    dtype = amp_dtype(device, tc.amp)
    classes = list(dc.classes)

    df = load_manifest(dc.manifest, classes)
    train_recs = _records(df, "train")
    if not train_recs:
        raise DataError(f"{dc.manifest}: no rows with split 'train'; fix: assign splits (medwsol prepare pipeline)")
    val_recs = _records(df, "valid")
    valpx_recs = [r for r in _records(df, "valpx") if "mask" in r]
    key, higher = SELECT[tc.select_metric]
    if tc.select_metric.startswith("valpx") and not valpx_recs:
        raise DataError(f"{dc.manifest}: train.select_metric={tc.select_metric} needs pixel-labelled 'valpx' rows; "
                        "fix: mark some valid images valpx=1 or use select_metric=val_error")
    if tc.select_metric.startswith("val_") and not val_recs:
        raise DataError(f"{dc.manifest}: train.select_metric={tc.select_metric} needs 'valid' rows; "
                        "fix: add a valid split or use select_metric=last")

    train_tf = train_transforms(dc)
    train_ds = make_dataset(train_recs, train_tf, dc)
    val_loader = make_eval_loader(val_recs, cfg) if val_recs else None
    valpx_loader = make_eval_loader(valpx_recs, cfg) if valpx_recs else None

    if cfg.model.pretrained is None:
        console.print("[yellow]warning:[/] model.pretrained is not set: the backbone starts from random weights "
                      "(set it to imagenet or a local ImageNet .pth for paper-like results)")
    model = build_method(cfg.model.method, num_classes=len(classes), backbone=cfg.model.backbone,
                         pretrained=cfg.model.pretrained, output_stride=cfg.model.output_stride,
                         params=cfg.model.params).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16))

    ckdir = run_dir / "checkpoints"
    last_path, best_path = ckdir / "last.pt", ckdir / "best.pt"
    start_epoch, best_val, best_epoch, stale, history = 0, None, -1, 0, []
    best_key: tuple[bool, float] | None = None  # selection_key of the best epoch (derived from history on resume)
    guard = tc.select_max_val_error
    if guard is not None and not val_recs:
        raise DataError(f"{dc.manifest}: train.select_max_val_error={guard} needs 'valid' rows; "
                        "fix: add a valid split or remove train.select_max_val_error")
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path}: nothing to resume; fix: drop --resume or pass the right --run-dir")
        ck = read_checkpoint(last_path)
        if ck.get("model", {}).get("method") != cfg.model.method:
            raise CheckpointError(f"{last_path}: checkpoint is of method {ck.get('model', {}).get('method')!r}, "
                                  f"config says {cfg.model.method!r}; fix: resume with the run's own config")
        model.load_state_dict(ck["state_dict"])
        model.load_extra_state(ck.get("extra_state") or {})
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start_epoch = int(ck["epoch"]) + 1
        best_val, best_epoch, stale = ck.get("best_value"), int(ck.get("best_epoch", -1)), int(ck.get("stale", 0))
        history = list(ck.get("history") or [])
        best_row = next((r for r in history if r["epoch"] == best_epoch), None)
        best_key = None if best_row is None else selection_key(best_row, key, higher, guard)
        console.print(f"resuming from {last_path} at epoch {start_epoch}")

    n_train = len(train_recs)
    console.print(f"training {cfg.model.method} ({cfg.model.backbone}) on {n_train} images, "
                  f"{len(val_recs)} valid, {len(valpx_recs)} valpx; device {device}, "
                  f"amp {dtype if dtype else 'off'}; select {tc.select_metric}")

    def payload(epoch: int) -> dict[str, Any]:
        return {
            "model": model.describe(),
            "classes": classes,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra_state": model.extra_state(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch,
            "best_value": best_val,
            "best_epoch": best_epoch,
            "stale": stale,
            "history": history,
            "config": cfg.model_dump(mode="json"),
        }

    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    t_start = time.perf_counter()
    stopped_early = False
    with Progress(*columns, console=console, transient=False) as progress:
        for epoch in range(start_epoch, tc.epochs):
            # everything random in an epoch derives from (seed, epoch): resume == uninterrupted
            ep_seed = cfg.seed * 1000 + epoch
            torch.manual_seed(ep_seed)
            np.random.seed(ep_seed % 2**32)
            if hasattr(train_tf, "set_random_state"):
                train_tf.set_random_state(seed=ep_seed % 2**32)
            loader = make_loader(train_ds, batch_size=dc.batch_size, shuffle=True, num_workers=dc.num_workers,
                                 seed=ep_seed, drop_last=n_train > dc.batch_size)
            model.train()
            task = progress.add_task("train", total=len(loader), epoch=f"{epoch + 1}/{tc.epochs}", loss=float("nan"),
                                     ips=0.0)
            sums: dict[str, float] = {}
            nb, nimg, t0 = 0, 0, time.perf_counter()
            for batch in loader:
                b = to_device(batch, device, tc.channels_last)
                with autocast(device, dtype):
                    losses = model.loss(b)
                total = losses["total"].float()
                if not torch.isfinite(total):
                    raise TrainingError(
                        f"loss became {total.item()} at epoch {epoch + 1}, batch {nb + 1} "
                        f"({', '.join(f'{k}={v.item():.4g}' for k, v in losses.items())}); the last good checkpoint "
                        f"is {last_path if last_path.is_file() else 'not written yet'}; fix: lower train.lr, "
                        "enable train.grad_clip or turn off train.amp"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if tc.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                scaler.step(opt)
                scaler.update()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float())
                nb += 1
                nimg += int(b["image"].shape[0])
                progress.update(task, advance=1, loss=sums["total"] / nb, ips=nimg / (time.perf_counter() - t0))
            train_seconds = time.perf_counter() - t0
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise TrainingError(
                    f"weights became NaN/inf at epoch {epoch + 1} (first: {bad[0]}; the loss diverged); the last good "
                    f"checkpoint is {last_path if last_path.is_file() else 'not written yet'}; fix: lower train.lr, "
                    "enable train.grad_clip or turn off train.amp"
                )
            sched.step()
            model.on_epoch_end(epoch)
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                                   "train_images_per_s": nimg / max(train_seconds, 1e-9)}
            row.update({f"train_{k}": v / max(nb, 1) for k, v in sums.items()})
            if val_loader is not None:
                s = score_split(model, val_loader, device, dtype, tc.channels_last)
                row.update({"val_error": s["error"], "val_loss": s["loss"]})
            if valpx_loader is not None:
                s = score_split(model, valpx_loader, device, dtype, tc.channels_last)
                row.update({"valpx_pxap": s["pxap"], "valpx_miou": s["miou"], "valpx_dice": s["dice"],
                            "valpx_tau": s["tau"]})
            value = row.get(key, row["epoch"])
            rank = selection_key(row, key, higher, guard)
            improved = best_key is None or rank > best_key or (tc.select_ties == "last" and rank == best_key)
            if improved:
                best_val, best_key, best_epoch, stale = value, rank, epoch + 1, 0
            else:
                stale += 1
            row["best"] = int(improved)
            history.append(row)
            if improved:
                write_checkpoint(best_path, payload(epoch))
            write_checkpoint(last_path, payload(epoch))
            _write_log(run_dir / "train_log.csv", history)
            log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("val", "train_total")))
            progress.console.print(f"epoch {epoch + 1}: {shown}{'  [green]best[/]' if improved else ''}")
            if tc.stop_after and epoch + 1 - start_epoch >= tc.stop_after and epoch + 1 < tc.epochs:
                progress.console.print(f"stopping after {tc.stop_after} epoch(s) (train.stop_after); "
                                       "continue with --resume")
                return {"stopped_after": epoch + 1, "best_checkpoint": str(best_path)}
            if tc.patience and stale >= tc.patience:
                progress.console.print(f"early stopping: no improvement of {tc.select_metric} for {stale} epochs")
                stopped_early = True
                break
    summary = {
        "best_epoch": best_epoch,
        "best_value": best_val,
        "select_metric": tc.select_metric,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "seconds": time.perf_counter() - t_start,
        "best_checkpoint": str(best_path),
    }
    if guard is not None and not (best_key and best_key[0]):
        console.print(f"[yellow]warning:[/] no epoch reached val_error <= {guard} (train.select_max_val_error); "
                      f"kept the epoch with the lowest val_error ({best_epoch})")
    summary["guard_met"] = bool(guard is None or (best_key and best_key[0]))
    log_metrics({"best_epoch": best_epoch, "train_seconds": summary["seconds"],
                         f"best_{tc.select_metric}": best_val or 0.0})
    return summary
