"""Peak memory and time of writing a large synthetic slide (tile-wise pyramidal TIFF).

Runs ``make_synthetic_slide`` in a fresh subprocess (so the parent's imports do not count) and
prints its peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``), the wall time, the file
size and the pyramid OpenSlide sees. The writer never allocates a full level: the target is
< 1 GB peak RSS for 50k x 50k.

Usage:
    python benchmarks/synthetic_slide_rss.py                 # 50000 x 50000 at 0.5 µm/px
    python benchmarks/synthetic_slide_rss.py --size 16384 --keep /tmp/big.tif
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from medwsol.data.synthetic_slide import make_synthetic_slide
out, w, h, mpp, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
t = time.perf_counter()
res = make_synthetic_slide(out, width=w, height=h, mpp=mpp, seed=0, tumour=True, progress=progress)
print(json.dumps({"seconds": time.perf_counter() - t, "levels": res["levels"],
                  "tissue_fraction": res["tissue"].area / (w * h)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50000, help="square slide side in pixels")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep the slide")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="medwsol_rss_") as tmp:
        out = args.keep or Path(tmp) / "big.tif"
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(out), str(args.size), str(args.size), str(args.mpp),
             "0" if args.no_progress else "1"],
            stdout=subprocess.PIPE, text=True, check=True,
        )
        wall = time.perf_counter() - t
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
        import openslide

        s = openslide.OpenSlide(str(out))
        report = {
            "size": f"{args.size}x{args.size}",
            "mpp": args.mpp,
            "peak_rss_mb": round(peak_mb, 1),
            "write_seconds": round(child["seconds"], 1),
            "subprocess_seconds": round(wall, 1),
            "file_mb": round(out.stat().st_size / 2**20, 1),
            "tissue_fraction": round(child["tissue_fraction"], 3),
            "openslide_levels": s.level_dimensions,
            "openslide_mpp": s.properties.get("openslide.mpp-x"),
            "under_1gb": peak_mb < 1024,
        }
        s.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
