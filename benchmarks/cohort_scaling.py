"""Cohort inference on Dask vs serial, measured side by side in one run (not part of the test suite).

On ``--slides`` synthetic slides (``make_synthetic_slide``, JPEG-tiled pyramidal TIFFs), prints a Markdown
table of wall time and slides/hour for

* ``serial``: :func:`medwsol.engine.infer.infer_cohort` in this process (torch threads = all cores);
* ``local:1``: the Dask driver (:func:`medwsol.engine.cohort.run_cohort`) on one worker with all cores;
* ``local:2``: two workers, cores // 2 torch threads each;

for two models: a **near-free** one (a 1x1 convolution: the run is bound by reading, tissue detection,
stitching and writing, so 2 cores are not the limit of 2 workers) and a **real** one (``cam`` on a randomly
initialised resnet18, the demo's network). Derived figures: Dask overhead = local:1 / serial - 1 at equal
total threads (target <= 5 %), scaling efficiency = (local:1 time / local:2 time) / 2 (target >= 0.8 on
the near-free model), and slides/hour per worker for the capacity plan (docs/scaling.md). Cluster
start-up (worker processes importing torch) is reported apart: a cohort pays it once.

Usage::

    nice python benchmarks/cohort_scaling.py                  # 8 slides of 4096 x 3072 px, a few minutes
    python benchmarks/cohort_scaling.py --slides 16 --repeats 2 --no-real
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=3072)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--target-mpp", type=float, default=1.0)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="best of N per configuration")
    p.add_argument("--no-real", action="store_true", help="skip the resnet18 model")
    p.add_argument("--out", type=Path, default=Path("/tmp/medwsol_cohort_bench"))
    return p.parse_args(argv)


class NearFree(nn.Module):
    """A read-bound model: one 1x1 convolution for the map, the mean colour for the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(0.3)
            self.conv.bias.fill_(-0.2)

    def forward(self, x):
        from medwsol.methods.base import WSOLOutput

        m = x.mean(dim=(2, 3))
        return WSOLOutput(logits=torch.stack([m[:, 0], m[:, 2]], 1), weight_map=torch.sigmoid(self.conv(x)))


def near_free_served():
    from medwsol.engine.served import ServedModel

    return ServedModel(NearFree().eval(), ["normal", "tumour"], "tumour", "weight_x_prob", map_range=None, tau=0.5,
                       tau_source="benchmark", digest="sha256:near-free")


def near_free_task(package_dir, digest, serve, slide, settings, out_root, name, device, amp):
    """:func:`medwsol.engine.cohort.slide_task` with the near-free model instead of a package."""
    from pathlib import Path

    from medwsol.config import SlidesConfig
    from medwsol.engine.infer import failed_row, infer_slide

    cfg = SlidesConfig.model_validate(settings)
    try:
        return infer_slide(near_free_served(), Path(slide), cfg, Path(out_root), device, progress=False, amp=amp,
                           name=name)
    except Exception as err:  # noqa: BLE001
        return failed_row(slide, err, name=name)


def make_slides(args) -> list[Path]:
    from medwsol.data.synthetic_slide import make_synthetic_slide

    folder = args.out / f"slides_{args.width}x{args.height}_{args.mpp}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(args.slides):
        tif = folder / f"slide{i:02d}.tif"
        if not tif.is_file():
            make_synthetic_slide(tif, width=args.width, height=args.height, mpp=args.mpp, seed=100 + i)
        out.append(tif)
    return out


def real_package(args) -> Path:
    from medwsol.methods.base import build_method
    from medwsol.package import build_package, is_package_dir

    folder = args.out / f"package_cam_{args.tile}_{args.target_mpp}"
    if is_package_dir(folder):
        return folder
    torch.manual_seed(0)
    net = build_method("cam", num_classes=2, output_stride=16).eval()
    cal = {"map_range": [0.0, 1.0], "map_range_fitted_on": "benchmark", "score": "weight_x_prob",
           "positive_class": "tumour", "tau": 0.5, "tau_chosen_on": "benchmark"}
    return build_package(folder, net.state_dict(), {**net.describe(), "extra_state": net.extra_state()},
                         ["normal", "tumour"], "tumour",
                         {"tile_size": args.tile, "target_mpp": args.target_mpp, "mpp_source": "benchmark"}, cal,
                         {"run_id": None})


def main(argv=None) -> None:
    args = parse_args(argv)
    import logging
    import subprocess

    from medwsol.config import SlidesConfig
    from medwsol.engine.cohort import check_workers, connect, cores, run_cohort, serve_kwargs
    from medwsol.engine.infer import infer_cohort, output_names
    from medwsol.engine.served import served_from_package
    from medwsol.package import load_package

    logging.getLogger("distributed").setLevel(logging.ERROR)
    c = cores()
    slides = make_slides(args)
    names = output_names(slides)
    settings = SlidesConfig(tile_size=args.tile, target_mpp=args.target_mpp, batch_size=args.batch, num_workers=1,
                            overwrite=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), "unknown CPU")
    models = [("near-free", None)]
    if not args.no_real:
        models.append(("resnet18 (cam)", real_package(args)))
    rows = []
    load0 = os.getloadavg()
    for label, pkg_dir in models:
        if pkg_dir is None:
            served, task = near_free_served(), near_free_task
        else:
            served, task = served_from_package(load_package(pkg_dir)), None
        times: dict[str, list[float]] = {"serial": [], "local:1": [], "local:2": []}
        startup: dict[str, float] = {}
        tiles = 0
        for rep in range(args.repeats):
            torch.set_num_threads(c)
            t0 = time.perf_counter()
            df = infer_cohort(served, slides, settings, args.out / "serial", "cpu", progress=False)
            times["serial"].append(time.perf_counter() - t0)
            tiles = int(df.tiles.sum())
            assert (df.status == "ok").all(), df.to_string()
            for spec in ("local:1", "local:2"):
                t0 = time.perf_counter()
                handle = connect(spec)
                try:
                    check_workers(handle, pkg_dir or args.out, served.digest, serve_kwargs(served)) if pkg_dir else None
                    startup[spec] = time.perf_counter() - t0
                    t1 = time.perf_counter()
                    df = run_cohort(handle, pkg_dir or args.out, served, slides, names, settings,
                                    args.out / spec.replace(":", "_"), "cpu", progress=False, task=task)
                    times[spec].append(time.perf_counter() - t1)
                    assert (df.status == "ok").all(), df.to_string()
                finally:
                    handle.close()
        best = {k: min(v) for k, v in times.items()}
        n = len(slides)
        for k, t in best.items():
            workers = 1 if k != "local:2" else 2
            rows.append((label, k, t, 3600 * n / t, 3600 * n / t / workers, tiles / t, startup.get(k)))
        overhead = best["local:1"] / best["serial"] - 1
        eff = best["local:1"] / best["local:2"] / 2
        rows.append((label, "derived", overhead, eff, None, None, None))
    load1 = os.getloadavg()
    print(f"\n{len(slides)} slides of {args.width} x {args.height} px at {args.mpp} um/px, tiles {args.tile} px at "
          f"{args.target_mpp} um/px, batch {args.batch}, {tiles} tiles; {c} cores ({cpu}); load average "
          f"{load0[0]:.1f} before, {load1[0]:.1f} after; best of {args.repeats}\n")
    print("| model | run | wall s | slides/h | slides/h per worker | tiles/s | cluster start s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label, k, a, b, pw, tps, st in rows:
        if k == "derived":
            print(f"| {label} | Dask overhead (local:1 vs serial) {100 * a:+.1f} %; scaling 1 -> 2 workers "
                  f"{b:.2f} | | | | | |")
        else:
            print(f"| {label} | {k} | {a:.1f} | {b:.1f} | {pw:.1f} | {tps:.1f} | {'' if st is None else f'{st:.1f}'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
