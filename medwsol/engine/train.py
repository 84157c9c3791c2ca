"""The trainer: one loop for every registered method.

* SGD / AdamW, none / step / cosine schedules with optional linear warm-up;
* AMP on CUDA (bf16, or fp16 with a GradScaler), bf16 autocast on CPU opt-in, channels_last;
* gradient clipping; a NaN/inf loss stops training with a clear message (the last
  good checkpoint is kept);
* seeded and deterministic on CPU: the shuffling and the torch RNG are re-seeded from
  ``(seed, epoch)`` at each epoch and each sample's augmentation from ``(seed, epoch, index)``,
  so ``--resume`` reaches exactly the metrics of an uninterrupted run, and the number of
  processes does not change what is learned;
* data-parallel on ``N`` processes (``medwsol train --nproc N`` or torchrun; see
  :mod:`medwsol.engine.distributed`): ``data.batch_size`` is the global batch, split over the ranks;
  batch norm synchronised; validation split over the ranks and merged; stops agreed; rank 0 alone
  writes the run directory and talks to the tracker;
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
from medwsol.engine.runtime import amp_dtype, autocast, cores, seed_everything, select_device, set_threads, to_device
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


def train(cfg, run_dir: Path | None, tracker=None, resume: bool = False, dist=None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data.manifest`` into ``run_dir``.

    Writes ``run_dir/checkpoints/{last,best}.pt`` and ``run_dir/train_log.csv``; per-epoch metrics go to
    ``tracker`` (any :class:`medwsol.tracking.Tracker`, or None). Packaging, registration and the
    training curves are the pipeline's business.

    With ``dist`` (a :class:`medwsol.engine.distributed.Dist`), every rank calls this; rank 0 passes the
    run directory, which the other ranks receive (they pass None), and rank 0 alone writes files and logs.

    Returns:
        A summary (best epoch and metric, whether the classification guard was met, checkpoint paths).
    """
    from medwsol.data.datasets import make_dataset, make_loader
    from medwsol.data.manifest import load_manifest
    from medwsol.data.transforms import train_transforms
    from medwsol.engine.evaluate import make_eval_loader, score_split
    from medwsol.methods.base import build_method

    from medwsol.engine.distributed import LossForward, SampleSeeded, ShardSampler, sync_batchnorm

    me, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    main = me == 0
    if dist is not None:
        run_dir = dist.broadcast(str(run_dir) if main else None)  # rank 0 made it; the others learn where
        dist.started = True
        if run_dir is None:
            raise _agreed()  # rank 0 failed before training (it says why)
    log_metrics = tracker.log_metrics if (tracker is not None and main) else (lambda *_a, **_k: None)
    run_dir = Path(run_dir)
    tc, dc = cfg.train, cfg.data
    console = Console(stderr=True, quiet=not main)
    if dist is not None and not tc.threads:
        set_threads(max(1, cores() // max(1, dist.local_world)))
    set_threads(tc.threads)
    seed_everything(cfg.seed, tc.deterministic)
    device = dist.device if dist is not None else select_device(tc.device)
    dtype = amp_dtype(device, tc.amp)
    classes = list(dc.classes)
    if dc.batch_size % world:
        raise DataError(f"data.batch_size {dc.batch_size} (the global batch) is not divisible by the {world} "
                        f"processes; fix: set data.batch_size to a multiple of {world}")

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

    if len(train_recs) < world:
        raise DataError(f"{dc.manifest}: {len(train_recs)} training images for {world} processes; fix: use fewer "
                        "processes (--nproc)")
    train_tf = train_transforms(dc)
    train_ds = SampleSeeded(make_dataset(train_recs, train_tf, dc))
    # validation images are split over the ranks (each caches only its share) and the counts merged
    val_loader = make_eval_loader(val_recs[me::world], cfg) if val_recs else None
    valpx_loader = make_eval_loader(valpx_recs[me::world], cfg) if valpx_recs else None

    if cfg.model.pretrained is None:
        console.print("[yellow]warning:[/] model.pretrained is not set: the backbone starts from random weights "
                      "(set it to imagenet or a local ImageNet .pth for paper-like results)")
    model = build_method(cfg.model.method, num_classes=len(classes), backbone=cfg.model.backbone,
                         pretrained=cfg.model.pretrained, output_stride=cfg.model.output_stride,
                         params=cfg.model.params).to(device)
    if dist is not None and world > 1 and tc.sync_batchnorm:
        model = sync_batchnorm(model, device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_module: torch.nn.Module = LossForward(model)
    if dist is not None and world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_module = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                          find_unused_parameters=_may_leave_parameters_unused(model))
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
        described = ck.get("model") if isinstance(ck.get("model"), dict) else {}
        if described.get("method") != cfg.model.method:
            raise CheckpointError(f"{last_path}: checkpoint is of method {described.get('method')!r}, "
                                  f"config says {cfg.model.method!r}; fix: resume with the run's own config")
        try:
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
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{last_path}: cannot resume from it ({type(err).__name__}: {reason}); it does not "
                                  "match the configured model and optimizer; fix: resume with the run's own config "
                                  "(its config.yaml), or --overwrite to train again") from None
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
    local_batch = dc.batch_size // world
    stop_reason = None
    with Progress(*columns, console=console, transient=False, disable=not main) as progress:
        for epoch in range(start_epoch, tc.epochs):
            # everything random in an epoch derives from (seed, epoch): resume == uninterrupted
            ep_seed = cfg.seed * 1000 + epoch
            torch.manual_seed(ep_seed)
            np.random.seed(ep_seed % 2**32)
            train_ds.set_seed(ep_seed)
            sampler = ShardSampler(n_train, ep_seed, me, world, dc.batch_size, drop_last=n_train > dc.batch_size)
            loader = make_loader(train_ds, batch_size=local_batch, shuffle=False, num_workers=dc.num_workers,
                                 seed=ep_seed, sampler=sampler)
            step_module.train()
            task = progress.add_task("train", total=len(loader), epoch=f"{epoch + 1}/{tc.epochs}", loss=float("nan"),
                                     ips=0.0)
            sums: dict[str, float] = {}
            nb, nimg, t0 = 0, 0, time.perf_counter()
            for batch in loader:
                b = to_device(batch, device, tc.channels_last)
                with autocast(device, dtype):
                    losses = step_module(b)
                total = losses["total"].float()
                finite = bool(torch.isfinite(total))
                if dist is not None and world > 1:
                    finite = not dist.any(not finite)  # a NaN on any rank stops every rank at the same step
                if not finite:
                    if not main:
                        raise _agreed()
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
                nimg += int(b["image"].shape[0]) * world
                progress.update(task, advance=1, loss=sums["total"] / nb, ips=nimg / (time.perf_counter() - t0))
            train_seconds = time.perf_counter() - t0
            if dist is not None and world > 1:  # the logged losses: means over the ranks (= the global batch's)
                keys = sorted(sums)
                sums = dict(zip(keys, (v / world for v in dist.sum([sums[k] for k in keys]))))
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if dist is not None and world > 1 and dist.any(bool(bad)) and not main:
                raise _agreed()
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
                s = _scores(model, val_loader, device, dtype, tc.channels_last, dist)
                row.update({"val_error": s["error"], "val_loss": s["loss"]})
            if valpx_loader is not None:
                s = _scores(model, valpx_loader, device, dtype, tc.channels_last, dist)
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
            if main:
                if improved:
                    write_checkpoint(best_path, payload(epoch))
                write_checkpoint(last_path, payload(epoch))
                _write_log(run_dir / "train_log.csv", history)
            log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("val", "train_total")))
            progress.console.print(f"epoch {epoch + 1}: {shown}{'  [green]best[/]' if improved else ''}")
            stop_reason = None
            if tc.stop_after and epoch + 1 - start_epoch >= tc.stop_after and epoch + 1 < tc.epochs:
                stop_reason = "stop_after"
            elif tc.patience and stale >= tc.patience:
                stop_reason = "patience"
            if dist is not None and world > 1:
                stop_reason = dist.broadcast(stop_reason)  # rank 0's decision, on every rank
            if stop_reason == "stop_after":
                progress.console.print(f"stopping after {tc.stop_after} epoch(s) (train.stop_after); "
                                       "continue with --resume")
                _record_replicas(dist, model, run_dir, history)
                return {"stopped_after": epoch + 1, "best_checkpoint": str(best_path)}
            if stop_reason == "patience":
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
    if dist is not None:
        summary["world_size"] = world
        summary["replicas_equal"] = _record_replicas(dist, model, run_dir, history)
    log_metrics({"best_epoch": best_epoch, "train_seconds": summary["seconds"],
                         f"best_{tc.select_metric}": best_val or 0.0})
    return summary




def _agreed():
    """What ranks > 0 raise on a failure every rank detected at once: rank 0 reports it."""
    from medwsol.engine.distributed import AgreedStop

    return AgreedStop(2)


def _may_leave_parameters_unused(model: torch.nn.Module) -> bool:
    """Whether some trainable parameters may get no gradient in a step (DDP must then look for them).

    The weight-map methods with a joint classifier and ``cls_weight: 0`` train ``f`` from no term.
    """
    p = getattr(model, "params", None)
    return bool(p is not None and getattr(p, "classifier", None) == "joint" and not getattr(p, "cls_weight", 1.0))


def _scores(model, loader, device, dtype, channels_last: bool, dist) -> dict[str, float]:
    """:func:`score_split` over this rank's share, merged over the ranks (PxAP histograms and counts)."""
    from medwsol.engine.evaluate import merge_split_states, scores_from_state, split_state

    state = split_state(model, loader, device, dtype, channels_last)
    if dist is not None and dist.world > 1:
        state = merge_split_states(dist.gather(state))
    return scores_from_state(state)


def _record_replicas(dist, model: torch.nn.Module, run_dir: Path, history: list[dict]) -> bool | None:
    """Every rank's parameter digest, compared on rank 0 and written to ``run_dir/ddp.json``."""
    if dist is None:
        return None
    from medwsol.engine.distributed import param_digest
    from medwsol.io import write_json

    digests = dist.gather(param_digest(model))
    equal = len(set(digests)) == 1
    if dist.is_main:
        write_json(run_dir / "ddp.json", {"world_size": dist.world, "backend": dist.backend,
                                          "device": str(dist.device), "epochs": len(history),
                                          "param_digests": digests, "replicas_equal": equal})
        if not equal:
            raise TrainingError(f"the {dist.world} processes ended with different weights ({run_dir / 'ddp.json'}); "
                                "fix: report it - gradients were not synchronised")
    return equal
