"""Methods benchmark: every method on the same split, one table; over several seeds, mean ± sd.

Each method is trained and evaluated with the pipeline's own settings (only
``model.method`` changes, with that method's default knobs unless the pipeline
configures that very method). ``gradcam`` is post hoc: it is evaluated on the
weights trained for ``cam`` (the same architecture), as Grad-CAM is used in the
literature. Two sanity rows calibrate the numbers: an all-ones map (F1- = 0 and
PxAP = the foreground fraction) and a uniformly random map.

With ``seeds`` (``medwsol benchmark methods FILE --seeds 0,1,2``) every method is
trained once per seed (``seed`` is the pipeline's top-level ``seed``: weight
initialisation, shuffling, augmentation); the data, the split and the pixel
validation set stay the same. The table then shows ``mean ± sd`` per metric and
method (sample standard deviation, n - 1), see :func:`aggregate_rows`.

Results go to stdout, to ``docs/benchmarks.md`` (between markers named after the
pipeline) and to MLflow as a parent run with one nested run per method and seed.
"""

from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from medwsol.config import PipelineConfig
from medwsol.io import write_json, write_text

__all__ = [
    "run_methods_benchmark", "ConstantMap", "RandomMap", "format_table", "aggregate_rows", "parse_seeds", "METRICS",
]

METRICS = ("pxap", "f1_pos", "f1_neg", "miou", "boundary_f1", "error", "tau", "train_s")
"""The numeric columns of a benchmark row, in table order."""


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


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; raises ValueError naming the bad item.

    Example:
        >>> parse_seeds("0, 1,2")
        [0, 1, 2]
    """
    seeds = []
    for item in str(text).split(","):
        item = item.strip()
        if not item.isdigit():
            raise ValueError(f"--seeds {text!r}: {item!r} is not a non-negative integer; fix: e.g. --seeds 0,1,2")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: a seed repeats; fix: list each seed once")
    return seeds


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (n - 1) per method and metric over per-seed rows.

    Args:
        rows: rows with ``method``, the :data:`METRICS` (``None`` when not applicable) and ``seed``.

    Returns:
        One row per method, in first-seen order: each metric is the mean, ``<metric>_sd`` its
        standard deviation (``None`` for a single value), ``n`` the number of seeds and
        ``seeds`` the list of seeds.

    Example:
        >>> r = aggregate_rows([{"method": "cam", "pxap": 40.0, "seed": 0}, {"method": "cam", "pxap": 44.0, "seed": 1}])
        >>> r[0]["pxap"], round(r[0]["pxap_sd"], 4), r[0]["n"]
        (42.0, 2.8284, 2)
    """
    order: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] not in groups:
            order.append(r["method"])
            groups[r["method"]] = []
        groups[r["method"]].append(r)
    out = []
    for name in order:
        g = groups[name]
        agg: dict[str, Any] = {"method": name, "n": len(g), "seeds": [r.get("seed") for r in g]}
        for k in METRICS:
            vals = [float(r[k]) for r in g if r.get(k) is not None]
            if vals:
                agg[k], agg[f"{k}_sd"] = _mean_sd(vals)
            else:
                agg[k], agg[f"{k}_sd"] = None, None
        out.append(agg)
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of benchmark rows; a metric with a ``<metric>_sd`` shows as ``mean ± sd``."""

    def f(r, k, d=1):
        v = r.get(k)
        if v is None:
            return "—"
        sd = r.get(f"{k}_sd")
        return f"{v:.{d}f}" if sd is None else f"{v:.{d}f} ± {sd:.{d}f}"

    head = ("| method | PxAP | F1+ | F1− | mIoU | boundary F1 (2 px) | cls error (%) | τ | train s |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    body = [
        f"| {r['method']} | {f(r, 'pxap')} | {f(r, 'f1_pos')} | {f(r, 'f1_neg')} | {f(r, 'miou')} | "
        f"{f(r, 'boundary_f1')} | {f(r, 'error')} | {f(r, 'tau', 3)} | {f(r, 'train_s', 0)} |"
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
                          out_md: Path | None = None, seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """Train and evaluate each method on the same data, once per seed; return the table rows.

    Args:
        cfg: the pipeline configuration (its ``seed`` is used when ``seeds`` is None).
        config_path: the YAML it came from (named in the markdown).
        methods: registered method names (default: all).
        out_md: markdown file whose ``methods:<pipeline name>`` block is rewritten.
        seeds: training seeds; with more than one the rows are ``mean ± sd`` over them
            (:func:`aggregate_rows`).

    Returns:
        One row per method (aggregated over the seeds) plus the two sanity rows.
    """
    from medwsol.data.manifest import load_manifest
    from medwsol.checkpoint import model_from_checkpoint
    from medwsol.engine.evaluate import evaluate_model, flat_metrics
    from medwsol.engine.runtime import select_device
    from medwsol.methods.catalog import METHOD_PARAMS, METHODS
    from medwsol.pipeline import RunContext, run_pipeline
    from medwsol.stages import stage_prepare
    from medwsol.tracking import NullTracker, make_tracker

    console = Console(stderr=True)
    names = methods or [m for m in METHODS.names()]
    for n in names:
        METHODS.check(n)
    seeds = list(seeds) if seeds else [cfg.seed]
    multi = len(seeds) > 1
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
    parent.set_tags({"benchmark": "methods", "pipeline": cfg.name, "seeds": ",".join(map(str, seeds))})
    split = cfg.evaluate.splits[0]
    per_seed: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        if "prepare" in cfg.stages:
            stage_prepare(RunContext(cfg=cfg, run_dir=root, tracker=NullTracker()))
        df = load_manifest(cfg.data.manifest, list(cfg.data.classes))
        trained: dict[tuple[str, int], tuple[Path, float]] = {}
        for name in names:  # method by method, so that a long run has whole rows early (logged per seed)
            for seed in seeds:
                mcfg = copy.deepcopy(cfg)
                mcfg.seed = seed
                train_name = "cam" if name == "gradcam" else name
                if train_name != cfg.model.method:
                    mcfg.model.method = train_name
                    mcfg.model.params = METHOD_PARAMS[train_name]().model_dump()
                mcfg.tracking.register_as = None
                mcfg.stages = ["train", "evaluate"]
                tag = f"{name}/seed{seed}" if multi else name
                child = parent.child(tag.replace("/", "-"))
                run_dir = root / (f"seed{seed}" if multi else "") / train_name
                if (train_name, seed) not in trained:
                    console.rule(f"[bold]benchmark: {train_name}" + (f", seed {seed}" if multi else ""))
                    t0 = time.perf_counter()
                    run_pipeline(mcfg, config_path, run_dir=run_dir, stages=["train"], tracker=child, package=False,
                                 create_run_dir=True)
                    trained[train_name, seed] = (run_dir / "checkpoints" / "best.pt", time.perf_counter() - t0)
                ckpt, secs = trained[train_name, seed]
                device = select_device(cfg.train.device)
                model = model_from_checkpoint(ckpt).to(device).eval()
                if name == "gradcam":
                    from medwsol.methods.base import build_method

                    gc = build_method("gradcam", num_classes=len(cfg.data.classes), backbone=cfg.model.backbone,
                                      output_stride=cfg.model.output_stride)
                    gc.load_state_dict(model.state_dict())
                    model = gc.to(device).eval()
                out_dir = run_dir.parent / "gradcam" / "eval" if name == "gradcam" else run_dir / "eval"
                metrics = evaluate_model(model, mcfg, df, device, out_dir=out_dir, console=console).metrics
                child.log_metrics(flat_metrics(metrics))
                child.log_artifact(out_dir, "eval")
                child.close("FINISHED")
                row = {**_row(name, metrics, secs, split), "seed": seed}
                per_seed.append(row)
                write_json(root / "per_seed.json", per_seed)  # what a stopped run has measured so far
                console.print(format_table([{**row, "method": f"{name} (seed {seed})" if multi else name}]))
        rows = aggregate_rows(per_seed) if multi else [dict(r) for r in per_seed]
        device = torch.device("cpu")
        for label, model in (("all-ones map", ConstantMap(len(cfg.data.classes))),
                             ("random map", RandomMap(len(cfg.data.classes)))):
            metrics = evaluate_model(model.eval(), cfg, df, device, out_dir=None, console=console).metrics
            rows.append(_row(label, metrics, None, split))
        table = format_table(rows)
        write_json(root / "benchmark.json", {"seeds": seeds, "rows": rows, "per_seed": per_seed})
        write_text(root / "benchmark.md", table + "\n")
        parent.log_artifact(root / "benchmark.md")
        parent.log_artifact(root / "benchmark.json")
        for r in rows:
            key = re.sub(r"[^A-Za-z0-9_.-]", "_", r["method"])
            parent.log_metrics({f"{key}.{k}": v for k, v in r.items() if isinstance(v, (int, float))})
        if out_md is not None:
            s = cfg.data.synthetic
            pre = cfg.model.pretrained
            init = "random init" if pre is None else ("ImageNet weights" if pre == "imagenet" else f"weights {pre}")
            seed_txt = (f"seeds {', '.join(map(str, seeds))} (mean ± sd over {len(seeds)} trainings per method; "
                        "same data and split, only the training seed changes)" if multi else f"seed {seeds[0]}")
            desc = (f"`{config_path or cfg.name}`, split `{split}`, {seed_txt}, {cfg.train.epochs} epochs, "
                    f"backbone {cfg.model.backbone} ({init}), τ chosen on `{cfg.evaluate.threshold_split}` by "
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

    if torch.cuda.is_available():
        return f"{platform.machine()} CUDA {torch.cuda.get_device_name(0)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU{f' ({model})' if model else ''}, {os.cpu_count()} cores, {threads} torch threads"
