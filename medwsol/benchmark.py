"""Methods benchmark: every method on the same split and seed, one table.

Each method is trained and evaluated with the pipeline's own settings (only
``model.method`` changes, with that method's default knobs unless the pipeline
configures that very method). ``gradcam`` is post hoc: it is evaluated on the
weights trained for ``cam`` (the same architecture), as Grad-CAM is used in the
literature. Two sanity rows calibrate the numbers: an all-ones map (F1- = 0 and
PxAP = the foreground fraction) and a uniformly random map.

Results go to stdout, to ``docs/benchmarks.md`` (between markers named after the
pipeline) and to MLflow as a parent run with one nested run per method.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from medwsol.config import PipelineConfig
from medwsol.io import write_json, write_text

__all__ = ["run_methods_benchmark", "ConstantMap", "RandomMap", "format_table"]


class _Baseline(nn.Module):
    """Map-only baselines for the sanity rows (not registered methods)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def _out(self, x: torch.Tensor, m: torch.Tensor):
        from medwsol.methods.base import WSOLOutput

        return WSOLOutput(logits=torch.zeros(x.shape[0], self.num_classes, device=x.device), weight_map=m)


class ConstantMap(_Baseline):
    """Weight map = 1 everywhere (the 'all-ones' row of Belharbi et al.)."""

    def forward(self, x):
        return self._out(x, torch.ones(x.shape[0], 1, *x.shape[-2:], device=x.device))


class RandomMap(_Baseline):
    """Weight map = i.i.d. uniform noise (seeded)."""

    def forward(self, x):
        g = torch.Generator().manual_seed(int(x.shape[-1] * 7919 + x.shape[-2]))
        return self._out(x, torch.rand(x.shape[0], 1, *x.shape[-2:], generator=g).to(x.device))


def _row(name: str, metrics: dict[str, Any], seconds: float | None, split: str) -> dict[str, Any]:
    m = metrics.get(split, {})
    t = m.get("tau", {})
    return {
        "method": name,
        "pxap": m.get("pxap"),
        "f1_pos": t.get("f1_pos"),
        "f1_neg": t.get("f1_neg"),
        "miou": t.get("miou"),
        "boundary_f1": t.get("boundary_f1"),
        "error": m.get("classification_error"),
        "tau": metrics.get("threshold", {}).get("tau"),
        "train_s": seconds,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    def f(v, d=1):
        return "—" if v is None else f"{v:.{d}f}"

    head = ("| method | PxAP | F1+ | F1− | mIoU | boundary F1 (2 px) | cls error (%) | τ | train s |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    body = [
        f"| {r['method']} | {f(r['pxap'])} | {f(r['f1_pos'])} | {f(r['f1_neg'])} | {f(r['miou'])} | "
        f"{f(r['boundary_f1'])} | {f(r['error'])} | {f(r['tau'], 3)} | {f(r['train_s'], 0)} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def _update_markdown(md: Path, key: str, block: str) -> None:
    start, end = f"<!-- methods:{key}:start -->", f"<!-- methods:{key}:end -->"
    text = md.read_text() if md.is_file() else "# Benchmarks\n"
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Methods on `{key}`\n\n{new}\n"
    write_text(md, text)


def run_methods_benchmark(cfg: PipelineConfig, config_path: Path | None = None, methods: list[str] | None = None,
                          out_md: Path | None = None) -> list[dict[str, Any]]:
    """Train and evaluate each method on the same data and seed; return the table rows."""
    from medwsol.data.manifest import load_manifest
    from medwsol.checkpoint import model_from_checkpoint
    from medwsol.engine.evaluate import evaluate_model
    from medwsol.engine.runtime import select_device
    from medwsol.methods.catalog import METHOD_PARAMS, METHODS
    from medwsol.pipeline import RunContext, run_pipeline
    from medwsol.stages import stage_prepare
    from medwsol.tracking import NullTracker, make_tracker

    console = Console(stderr=True)
    names = methods or [m for m in METHODS.names()]
    for n in names:
        METHODS.check(n)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = cfg.run_root / f"{cfg.name}-benchmark" / stamp
    from medwsol.io import ensure_writable

    ensure_writable(root, "run_root", fix="set run_root to a writable folder")
    if "prepare" not in cfg.stages:
        from medwsol.pipeline import preflight

        preflight(cfg, ["train", "evaluate"])
    parent = make_tracker(cfg.tracking, run_name=f"benchmark/{cfg.name}/{stamp}")
    made = [q for q in (root.parent, root) if not q.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except BaseException:
        parent.close("FAILED")
        raise
    parent.set_tags({"benchmark": "methods", "pipeline": cfg.name})
    split = cfg.evaluate.splits[0]
    rows: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        if "prepare" in cfg.stages:
            stage_prepare(RunContext(cfg=cfg, run_dir=root, tracker=NullTracker()))
        trained: dict[str, tuple[Path, float]] = {}
        for name in names:
            mcfg = copy.deepcopy(cfg)
            train_name = "cam" if name == "gradcam" else name
            if train_name != cfg.model.method:
                mcfg.model.method = train_name
                mcfg.model.params = METHOD_PARAMS[train_name]().model_dump()
            mcfg.tracking.register_as = None
            mcfg.stages = ["train", "evaluate"]
            child = parent.child(name)
            run_dir = root / name
            if train_name not in trained:
                console.rule(f"[bold]benchmark: {train_name}")
                t0 = time.perf_counter()
                run_pipeline(mcfg, config_path, run_dir=run_dir, stages=["train"], tracker=child, package=False,
                             create_run_dir=True)
                trained[train_name] = (run_dir / "checkpoints" / "best.pt", time.perf_counter() - t0)
            ckpt, secs = trained[train_name]
            device = select_device(cfg.train.device)
            model = model_from_checkpoint(ckpt).to(device).eval()
            if name == "gradcam":
                from medwsol.methods.base import build_method

                gc = build_method("gradcam", num_classes=len(cfg.data.classes), backbone=cfg.model.backbone,
                                  output_stride=cfg.model.output_stride)
                gc.load_state_dict(model.state_dict())
                model = gc.to(device).eval()
            df = load_manifest(cfg.data.manifest, list(cfg.data.classes))
            metrics = evaluate_model(model, mcfg, df, device, out_dir=run_dir / "eval", console=console).metrics
            from medwsol.engine.evaluate import flat_metrics

            child.log_metrics(flat_metrics(metrics))
            child.log_artifact(run_dir / "eval", "eval")
            child.close("FINISHED")
            rows.append(_row(name, metrics, secs, split))
            console.print(format_table(rows[-1:]))
        df = load_manifest(cfg.data.manifest, list(cfg.data.classes))
        device = torch.device("cpu")
        for label, model in (("all-ones map", ConstantMap(len(cfg.data.classes))),
                             ("random map", RandomMap(len(cfg.data.classes)))):
            metrics = evaluate_model(model.eval(), cfg, df, device, out_dir=None, console=console).metrics
            rows.append(_row(label, metrics, None, split))
        table = format_table(rows)
        write_json(root / "benchmark.json", rows)
        write_text(root / "benchmark.md", table + "\n")
        parent.log_artifact(root / "benchmark.md")
        parent.log_artifact(root / "benchmark.json")
        for r in rows:
            key = re.sub(r"[^A-Za-z0-9_.-]", "_", r["method"])
            parent.log_metrics({f"{key}.{k}": v for k, v in r.items() if isinstance(v, (int, float))})
        if out_md is not None:
            s = cfg.data.synthetic
            desc = (f"`{config_path or cfg.name}`, split `{split}`, seed {cfg.seed}, {cfg.train.epochs} epochs, "
                    f"backbone {cfg.model.backbone} (random init), τ chosen on `{cfg.evaluate.threshold_split}` by "
                    f"best mIoU; data: {cfg.data.source}"
                    + (f" ({s.n_images} images of {s.size}²)" if cfg.data.source == "synthetic" else "")
                    + f"; measured {time.strftime('%Y-%m-%d')} on {_machine()}.")
            _update_markdown(out_md, cfg.name, desc + "\n\n" + table)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.close(status)
        if status != "FINISHED":  # a benchmark is not resumable: a failed one leaves no folder
            import contextlib
            import shutil

            if root in made:
                shutil.rmtree(root, ignore_errors=True)
            if root.parent in made:
                with contextlib.suppress(OSError):
                    root.parent.rmdir()
    Console().print(table)
    return rows


def _machine() -> str:
    import os
    import platform

    dev = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.machine()} {dev}"
