"""Seamless slide heatmaps with a real method on a synthetic slide (issue: the tile checkerboard).

A constant model cannot show a checkerboard; a trained min-max entropy model can: its maps are min-max
rescaled per image, so the old slide path (rescale every tile, plain average) put a pixel at 1.0 in every
tile. The slides pipeline is run end to end on tiny synthetic slides; its held-out slide is scored by the
pipeline itself (``slide_eval.json``), and the same package is then run the old way to show the test can
see the difference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("medwsol"))

SETS = [
    "data.tiles.synthetic.n_train=6", "data.tiles.synthetic.width=3072", "data.tiles.synthetic.height=2048",
    "data.tiles.synthetic.mpp=1.0", "data.tiles.tile_size=64", "data.patch_size=64", "data.batch_size=8",
    "slides.tile_size=64", "slides.overlap=32", "slides.batch_size=16", "slides.runtime=torch", "slides.num_workers=0",
    "train.epochs=4", "train.threads=2", "evaluate.n_overlays=0", "model.output_stride=16", "export.formats=[png]",
    "model.method=minmax_entropy", "train.select_max_val_error=null",
]


@pytest.mark.slow
def test_trained_minmax_slide_heatmap_has_no_tile_seams(tmp_path):
    import torch

    from medwsol.config import SlidesConfig
    from medwsol.engine.infer import infer_slide
    from medwsol.engine.served import ServedModel
    from medwsol.package import load_package
    from medwsol.stages import score_slide

    cmd = [EXE, "run", str(ROOT / "pipelines/slides.yaml")]
    for s in [*SETS, f"data.manifest={tmp_path}/tiles/manifest.csv", f"run_root={tmp_path}/runs",
              "tracking.enabled=false"]:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = sorted((tmp_path / "runs" / "slides").iterdir())[-1]
    assert pd.read_csv(run / "slides" / "slides.csv").status.tolist() == ["ok"]
    scored = json.loads((run / "slides" / "test_000" / "slide_eval.json").read_text())
    # the shipped path: one fixed map transform fitted on validation, tiles cross-faded over the overlap
    assert scored["seam_ratio"] <= 1.5 and scored["seam_ratio_tile_edges"] <= 1.5, scored

    # the same trained network the old way: every tile min-max rescaled on its own, tiles side by side
    pkg = load_package(run / "package")
    cal = pkg.calibration
    old = ServedModel(pkg.network, pkg.classes, pkg.meta["positive_class"], cal["score"], map_range=None,
                      tau=cal["tau"], tau_source="test")
    meta = json.loads((run / "slides" / "test_000" / "meta.json").read_text())
    settings = SlidesConfig(target_mpp=meta["target_mpp"], tile_size=meta["tile_size"], overlap=0, blend="constant",
                            output_mpp=meta["heatmap_mpp"], tissue_mpp=meta["tissue_mpp"], min_tissue=meta["min_tissue"],
                            batch_size=16, num_workers=0, runtime="torch")
    slide = Path(meta["slide"])
    infer_slide(old, slide, settings, tmp_path / "old", torch.device("cpu"), progress=False)
    truth = next(p for p in (slide.with_suffix(".geojson"), slide.parent.parent / "annotations" / f"{slide.stem}.geojson")
                 if p.is_file())
    before = score_slide(tmp_path / "old" / "test_000", truth, None, None)
    # the measurement sees the checkerboard that per-tile rescaling makes
    assert before["seam_ratio_tile_edges"] >= 2.0, before
    assert before["seam_ratio_tile_edges"] >= 2 * scored["seam_ratio_tile_edges"], (before, scored)
