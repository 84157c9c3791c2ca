"""Whole-slide inference throughput and memory, measured in one run (not part of the test suite).

On one synthetic slide (``make_synthetic_slide``) and one registered method (default ``cam`` on a
randomly initialised resnet18), prints a Markdown table of

* read-only tiles/s (our tile reader over the tissue tiles, no model),
* model-only tiles/s (a preloaded uint8 batch, same conversion and model),
* end-to-end tiles/s (``infer_slide``: tissue mask, grid, inference, stitching, writing) and the
  ratio end-to-end / min(read, model)  (target >= 0.9 on CPU),
* MONAI ``PatchInferer`` + ``WSISlidingWindowSplitter`` (OpenSlide) + ``AvgMerger`` tiles/s on the
  same slide, model and tile size (level 0: run with --target-mpp equal to --mpp), and ours / MONAI,
* one row per slide runtime (``--runtimes torch,onnx,onnx-int8``, :mod:`medwsol.engine.runtimes`) with
  its faithfulness to the fp32 torch model (Dice of the maps at τ, class agreement, max |Δ score|) on
  validation tiles: the package's own validation split with ``--package``, else tissue tiles of the
  benchmark slide; MONAI always runs the fp32 torch model, so "ours / MONAI" of a runtime row is that
  runtime's end to end against MONAI with the same weights,
* peak RSS of ``infer_slide`` on three slide sizes, each in its own subprocess (VmHWM reset just
  before the call; target: flat in slide size), optionally on a huge (e.g. 100k x 100k) slide made of
  two pre-encoded tiles (``--huge``; target: <= 1.5 GB at 100k x 100k).

Usage::

    python benchmarks/slide_throughput.py                      # defaults: a few minutes on 2 CPU cores
    python benchmarks/slide_throughput.py --width 2048 --height 2048 --rss-sizes 2048,4096,8192
    python benchmarks/slide_throughput.py --device cuda --workers 8 --batch 64
    python benchmarks/slide_throughput.py --huge 25000,50000,100000 --rss-sizes ''   # memory up to 100k x 100k
    # runtimes on a trained package, >= 1000 tissue tiles, slide made at the package's mpp (MONAI reads level 0)
    python benchmarks/slide_throughput.py --package runs/slides/<stamp>/package --mpp 2 --width 8192 \
        --height 6144 --runtimes torch,onnx,onnx-int8 --no-pipeline-model --rss-sizes ''
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=6144, help="throughput slide width (level-0 px)")
    p.add_argument("--height", type=int, default=4096, help="throughput slide height (level-0 px)")
    p.add_argument("--mpp", type=float, default=0.5, help="slide µm/px")
    p.add_argument("--target-mpp", type=float, default=0.5, help="model resolution (= --mpp to compare with MONAI at level 0)")
    p.add_argument("--tile", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the main process (0: torch's default)")
    p.add_argument("--method", default="cam")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--model-batches", type=int, default=6, help="timed batches for model-only")
    p.add_argument("--skip-monai", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="best of N for each timing (the machine may be shared)")
    p.add_argument("--no-pipeline-model", action="store_true",
                   help="skip the second pass with a near-free 1x1-conv model (pipeline-bound numbers)")
    p.add_argument("--rss-sizes", default="4096,8192,16384", help="square slide sides for the RSS runs ('' = skip)")
    p.add_argument("--rss-target-mpp", type=float, default=4.0, help="coarse model resolution for the RSS runs")
    p.add_argument("--huge", default="",
                   help="also measure memory on huge two-tile slides of these sides (e.g. 25000,50000,100000)")
    p.add_argument("--huge-target-mpp", type=float, default=16.0, help="model resolution for the --huge slide")
    p.add_argument("--runtimes", default="torch",
                   help="comma-separated slide runtimes to measure (torch, onnx, onnx-int8), one row each")
    p.add_argument("--package", type=Path, default=None,
                   help="a model package: its network, tile size, calibration and validation data (default: "
                   "--method on a random-init --backbone)")
    p.add_argument("--calibration-tiles", type=int, default=64, help="int8 calibration / check tiles")
    p.add_argument("--runtime-threads", type=int, default=0, help="ONNX Runtime threads (0: the CPUs we may use)")
    p.add_argument("--out", type=Path, default=Path("/tmp/medwsol_bench"))
    p.add_argument("--rss-child", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(args):
    from medwsol.methods.base import build_method

    import torch

    model = build_method(args.method, num_classes=2, backbone=args.backbone).eval()
    return model.to(memory_format=torch.channels_last)  # as infer_slide runs it


def served(model):
    """The network as the slide path serves it (no map range: the benchmark measures speed, not maps).

    A :class:`ServedModel` (a package's) or a runtime is returned as it is.
    """
    from medwsol.engine.served import ServedModel

    if isinstance(model, ServedModel) or hasattr(model, "runtime"):
        return model
    return ServedModel(model, ["benign", "malignant"], "malignant", "weight", map_range=None, tau=0.5)


def slides_cfg(args, target_mpp, workers=None, overwrite=True):
    from medwsol.config import SlidesConfig

    return SlidesConfig(target_mpp=target_mpp, tile_size=args.tile, overlap=0, batch_size=args.batch,
                        num_workers=args.workers if workers is None else workers, overwrite=overwrite)


def synthetic(args, w, h, seed=0) -> Path:
    from medwsol.data.synthetic_slide import make_synthetic_slide

    path = args.out / f"synthetic_{w}x{h}_mpp{args.mpp:g}_s{seed}.tif"
    if not path.exists():
        t = time.perf_counter()
        make_synthetic_slide(path, width=w, height=h, mpp=args.mpp, seed=seed)
        print(f"made {path.name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def proc_mb(key: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM (Linux: ``echo 5 > /proc/self/clear_refs``) so the peak of one call can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def fast_slide(path: Path, side: int, mpp: float, tile: int = 256) -> Path:
    """A ``side x side`` pyramidal JPEG TIFF built from two pre-encoded tiles (tissue discs on glass).

    Writing costs seconds even at 100k x 100k (nothing is encoded per tile), so peak RSS can be measured
    on slide sizes the H&E-like generator would take many minutes to make. Levels: downsample 4, 16, ...
    """
    import imagecodecs
    import numpy as np
    import tifffile

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:tile, 0:tile]
    texture = (8 * np.sin(xx / 5.0) * np.cos(yy / 7.0))[..., None]
    tissue = np.clip(np.array([205, 110, 170]) + texture + rng.normal(0, 2, (tile, tile, 3)), 0, 255).astype(np.uint8)
    glass = np.clip(238 + rng.normal(0, 1, (tile, tile, 3)), 0, 255).astype(np.uint8)

    def enc(a):
        return imagecodecs.jpeg8_encode(a, level=85, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))

    jt, jg = enc(tissue), enc(glass)
    discs = [(0.3, 0.3, 0.18), (0.7, 0.35, 0.2), (0.45, 0.72, 0.22)]  # centre x, y, radius as fractions of side
    dims, w = [], side
    while True:
        dims.append(w)
        if w < 1024 * 4 and len(dims) >= 3 or w < 64:
            break
        w = max(1, w // 4)

    def tiles(k: int):
        ds = side / dims[k]
        n = -(-dims[k] // tile)
        c = (np.arange(n) + 0.5) * tile * ds / side  # tile centres as fractions of side
        for r in range(n):
            inside = np.zeros(n, bool)
            for cx, cy, rad in discs:
                inside |= (c - cx) ** 2 + (c[r] - cy) ** 2 <= rad * rad
            for i in range(n):
                yield jt if inside[i] else jg

    tmp = path.with_suffix(".part.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for k, wk in enumerate(dims):
            res = 1e4 / (mpp * side / wk)
            tif.write(tiles(k), shape=(wk, wk, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                      photometric="rgb", subsampling=(2, 2), resolution=(res, res), resolutionunit="CENTIMETER",
                      subfiletype=0 if k == 0 else 1, metadata=None)
    tmp.replace(path)
    return path


def load_bench_package(args):
    """``--package``: the loaded package; its tile size and µm/px become the benchmark's."""
    if args.package is None:
        return None
    from medwsol.package import load_package

    pkg = load_package(args.package)
    args.tile = int(pkg.meta["input"]["tile_size"])
    args.target_mpp = float(pkg.meta["input"]["target_mpp"])
    if abs(args.target_mpp - args.mpp) > 1e-9:
        print(f"note: the package runs at {args.target_mpp} um/px and the slide is made at {args.mpp}; MONAI reads "
              "level 0, so pass --mpp equal to it for a like-for-like comparison", file=sys.stderr)
    return pkg


def random_package(args, model):
    """The benchmark's random network as a model package (so ONNX runtimes can be built and cached from it)."""
    from medwsol.package import build_package, load_package

    folder = args.out / f"package_{args.method}_{args.backbone}"
    if not (folder / "package.json").is_file():
        import torch

        torch.manual_seed(0)
        net = model.float().cpu().eval()
        desc = {**net.describe(), "extra_state": net.extra_state()}
        cal = {"map_range": None, "map_range_fitted_on": "none (benchmark)", "score": "weight",
               "positive_class": "malignant", "tau": 0.5, "tau_chosen_on": "none (benchmark)"}
        build_package(folder, {k: v.contiguous() for k, v in net.state_dict().items()}, desc, ["benign", "malignant"],
                      "malignant", {"tile_size": args.tile, "target_mpp": args.target_mpp, "mpp_source": "benchmark"},
                      cal, {"run_id": None})
    return load_package(folder)


def rss_child(args) -> None:
    """Run infer_slide once on ``args.rss_child`` and print its memory as JSON."""
    import gc

    import torch  # noqa: F401

    from medwsol.engine.infer import infer_slide

    model = build_model(args)
    gc.collect()
    has_reset = reset_peak()
    before = proc_mb("VmRSS")
    cfg = slides_cfg(args, args.rss_target_mpp)
    t = time.perf_counter()
    row = infer_slide(served(model), args.rss_child, cfg, args.out / "rss_out", args.device, progress=False,
                      amp=args.amp)
    meta = json.loads((Path(row["outputs"]) / "meta.json").read_text())
    print(json.dumps({"before_mb": before, "peak_mb": proc_mb("VmHWM") if has_reset else float("nan"),
                      "maxrss_mb": maxrss_mb(), "workers_peak_mb": maxrss_mb(resource.RUSAGE_CHILDREN),
                      "tiles": row["tiles"], "seconds": time.perf_counter() - t, "heatmap": meta["heatmap_shape"],
                      "format": meta["heatmap_format"], "size": [meta["width"], meta["height"]]}))


def _pipeline_model_cls():
    import torch

    from medwsol.methods.base import WSOLOutput

    class PipelineModel(torch.nn.Module):
        """A near-free model (1x1 conv + sigmoid, global mean logits): measures the pipeline, not the network."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def forward(self, x):
            w = torch.sigmoid(self.conv(x))
            return WSOLOutput(logits=torch.cat([w.mean((2, 3)), 1 - w.mean((2, 3))], 1), weight_map=w)

    return PipelineModel


def measure(args, model, dev, dtype, cfg, slide_path, xy, base, monai: bool = True) -> dict:
    """read-only, model-only, end-to-end and MONAI tiles/s for one model (best of ``args.repeats``).

    ``model``: a network, a :class:`ServedModel` or a runtime; MONAI runs it too (when ``monai``).
    """
    import torch

    from medwsol.engine.infer import SlideTileDataset, TileLoader, infer_slide, model_input
    from medwsol.engine.runtime import autocast

    res: dict = {}
    best = lambda key, v: res.__setitem__(key, max(res.get(key, 0.0), v))  # noqa: E731
    batch = torch.randint(0, 256, (cfg.batch_size, cfg.tile_size, cfg.tile_size, 3), dtype=torch.uint8).to(dev)

    srv = served(model)

    def step():  # the conversion infer_slide makes (channels_last floats for torch, NCHW for ONNX)
        with autocast(dev, dtype):
            p, w, sc = srv(model_input(batch, srv, dev))
        return sc.float().mean().item() + p.float().sum().item()

    for _ in range(args.repeats):
        # read-only: the tile reader infer_slide uses (a thread on a CPU, processes on CUDA), no model
        ds = SlideTileDataset(slide_path, xy, cfg.tile_size, cfg.target_mpp, base)
        loader = TileLoader(ds, cfg.batch_size, cfg.num_workers, dev)
        t = time.perf_counter()
        seen = sum(len(imgs.to(dev, non_blocking=True)) for imgs, _ in loader)
        best("read", seen / (time.perf_counter() - t))
        loader.stop()
        ds.close()
        # model-only: preloaded uint8 batch, same conversion, autocast, outputs synchronised
        with torch.inference_mode():
            step()
            t = time.perf_counter()
            for _ in range(args.model_batches):
                step()
            best("model", args.model_batches * cfg.batch_size / (time.perf_counter() - t))
        # end to end: mask + grid + inference + stitching + writing
        row = infer_slide(srv, slide_path, cfg, args.out / "e2e_out", dev, progress=False, amp=args.amp)
        best("e2e", row["tiles"] / row["seconds"])
        if not args.skip_monai and monai:
            from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter

            count = {"n": 0}

            def net(x):
                count["n"] += len(x)
                with autocast(dev, dtype):
                    return srv(x)[2].float()

            keep = {(int(x), int(y)) for x, y in xy}  # the same tissue tiles; MONAI's location is (row, col)
            same_grid = abs(cfg.target_mpp - base) < 1e-9
            inferer = PatchInferer(
                splitter=WSISlidingWindowSplitter(
                    patch_size=cfg.tile_size, overlap=0, reader="OpenSlide", level=0,
                    filter_fn=(lambda patch, loc: (int(loc[1]), int(loc[0])) in keep) if same_grid else None),
                merger_cls=AvgMerger, batch_size=cfg.batch_size,
                preprocessing=lambda p: p.to(dev, non_blocking=True).float().div_(255.0),
                postprocessing=lambda o: o.cpu(),
            )
            with torch.inference_mode():
                t = time.perf_counter()
                inferer(str(slide_path), net)
                best("monai", count["n"] / (time.perf_counter() - t))
            res["monai_tiles"] = count["n"]
    return res


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rss_child is not None:
        rss_child(args)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from medwsol.data.slides import open_slide, slide_mpp, tile_grid, tissue_mask
    from medwsol.engine.runtime import amp_dtype, select_device

    PipelineModel = _pipeline_model_cls()

    dev = select_device(args.device)
    pkg = load_bench_package(args)  # sets args.tile / args.target_mpp from a given package
    slide_path = synthetic(args, args.width, args.height)
    model = build_model(args).to(dev) if pkg is None else None
    cfg = slides_cfg(args, args.target_mpp)
    slide = open_slide(slide_path)
    base, _ = slide_mpp(slide)
    mask, mask_mpp = tissue_mask(slide, cfg.tissue_mpp, base)
    xy = tile_grid(slide.dimensions, base, cfg.target_mpp, cfg.tile_size, 0, mask, mask_mpp, cfg.min_tissue)
    slide.close()
    n = len(xy)
    dtype = amp_dtype(dev, args.amp)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if pkg is None and runtimes != ["torch"]:
        pkg = random_package(args, model)  # the random network as a package, so that runtimes can be built
    if pkg is not None:
        from medwsol.engine.served import served_from_package

        base_served = served_from_package(pkg).eval().to(memory_format=torch.channels_last)  # as infer_slide runs it
        label = f"{pkg.meta['model']['method']}/{pkg.meta['model']['backbone']}"
    else:
        base_served, label = served(model), f"{args.method}/{args.backbone}"
    passes, checks = [], {}
    for rt_name in runtimes:
        if rt_name == "torch":
            passes.append((f"{label} torch fp32", base_served.to(dev)))
            continue
        from medwsol.engine.runtimes import build_runtime

        own_data = bool((pkg.meta.get("provenance") or {}).get("data_manifest")) and args.package is not None
        rt = build_runtime(pkg, base_served, rt_name, cfg.tile_size, threads=args.runtime_threads or None,
                           calibration_slides=[] if own_data else [slide_path], n_calibration=args.calibration_tiles,
                           min_dice=None, log=lambda m: print(m, file=sys.stderr))
        checks[f"{label} {rt_name}"] = rt.info.get("check")
        passes.append((f"{label} {rt_name}", rt))
    if not args.no_pipeline_model:
        passes.append(("1x1-conv (pipeline-bound)", PipelineModel().to(dev).eval()))
    all_results = []
    monai_ref = None
    for name, m in passes:
        first = monai_ref is None or name.startswith("1x1")
        r = measure(args, m, dev, dtype, cfg, slide_path, xy, base, monai=first)
        if name.startswith("1x1"):
            pass
        elif monai_ref is None:
            monai_ref = (r.get("monai"), r.get("monai_tiles"))
        else:  # runtimes against MONAI with the fp32 torch model: same slide, same weights
            r["monai"], r["monai_tiles"] = monai_ref
        all_results.append((name, r))

    # 5. memory of infer_slide on several slide sizes, each in a fresh process
    jobs = [(synthetic(args, side, side), "synthetic", args.rss_target_mpp)
            for side in (int(v) for v in args.rss_sizes.split(",") if v.strip())]
    for side in (int(v) for v in args.huge.split(",") if v.strip()):
        path = fast_slide(args.out / f"fast_{side}_mpp{args.mpp:g}.tif", side, args.mpp)
        jobs.append((path, "two-tile", args.huge_target_mpp))
    rss_rows = []
    for path, kind, target in jobs:
        cmd = [sys.executable, __file__, "--rss-child", str(path), "--tile", str(args.tile), "--batch", str(args.batch),
               "--workers", str(args.workers), "--device", args.device, "--amp", args.amp, "--method", args.method,
               "--backbone", args.backbone, "--rss-target-mpp", str(target), "--out", str(args.out),
               "--mpp", str(args.mpp)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"RSS run on {path} failed")
        rss_rows.append((kind, target, json.loads(res.stdout.strip().splitlines()[-1])))

    # report
    print(f"\n## Slide inference throughput ({dev}, torch threads {torch.get_num_threads()}, workers {cfg.num_workers}, "
          f"batch {cfg.batch_size}, {args.method}/{args.backbone}, tile {cfg.tile_size} px at {cfg.target_mpp} µm/px)\n")
    print(f"Slide: {slide_path.name} ({args.width} x {args.height} px at {base} µm/px), {n} tissue tiles.\n")
    print("| model / runtime | read only (tile reader) | model only | end to end (`infer_slide`) | e2e / read "
          "| e2e / model | e2e / min(read, model) | MONAI PatchInferer, torch fp32 (tiles) | ours / MONAI | Dice at tau vs fp32 "
          "| class agreement | max abs d score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in all_results:
        bound = min(r["read"], r["model"])
        monai = f"{r['monai']:.1f} ({r['monai_tiles']})" if r.get("monai") else "-"
        ratio = f"{r['e2e'] / r['monai']:.2f}" if r.get("monai") else "-"
        c = checks.get(name)
        faith = (f"{c['dice']:.4f} | {c['agreement']:.3f} | {c['max_abs_score']:.4f}" if c
                 else ("(reference) | (reference) | 0" if "torch" in name else "- | - | -"))
        print(f"| {name} | {r['read']:.1f} | {r['model']:.1f} | {r['e2e']:.1f} | {r['e2e'] / r['read']:.2f} | "
              f"{r['e2e'] / r['model']:.2f} | "
              f"{r['e2e'] / bound:.2f} | {monai} | {ratio} | {faith} |")
    note = f"\nAll numbers in tiles/s, best of {args.repeats} runs."
    if checks:
        src = next((c["source"] for c in checks.values() if c), "-")
        note += (f" Faithfulness: the runtime's served score against the fp32 torch model's on {src}; Dice of the "
                 "two maps thresholded at the package's tau.")
    if not args.skip_monai:
        note += (" MONAI: WSISlidingWindowSplitter(reader='OpenSlide', level=0, filter_fn keeping our tissue tiles: it "
                 "reads every grid tile, infers the same tiles) + AvgMerger at level-0 resolution; ours: tissue tiles "
                 f"only, stitched at {cfg.output_mpp} µm/px.")
        if abs(cfg.target_mpp - base) > 1e-6:
            note += f" MONAI reads level 0 at {base} µm/px (every grid tile), ours at {cfg.target_mpp}."
    print(note)
    if rss_rows:
        print(f"\n## Memory of `infer_slide` (a fresh process per slide; workers {args.workers}; output "
              f"{cfg.output_mpp} µm/px)\n")
        print("| slide | level-0 px | model µm/px | tiles | heatmap | format | RSS before (MB) | peak during infer (MB) "
              "| increase (MB) | worker peak (MB) | seconds |")
        print("| --- | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for kind, target, r in rss_rows:
            print(f"| {kind} | {r['size'][0]} x {r['size'][1]} | {target:g} | {r['tiles']} | "
                  f"{r['heatmap'][0]} x {r['heatmap'][1]} | {r['format']} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | "
                  f"{r['peak_mb'] - r['before_mb']:.0f} | {r['workers_peak_mb']:.0f} | {r['seconds']:.1f} |")
        print("\nRSS before = after imports and model build; peak = VmHWM reset just before infer_slide (main "
              "process); worker peak = ru_maxrss of the largest DataLoader worker (forked: shares the parent's pages).")

if __name__ == "__main__":
    main()
