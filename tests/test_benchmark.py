"""medwsol benchmark methods: seeds, mean ± sd (checked against the statistics module), the table, the CLI."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from medwsol.benchmark import METRICS, aggregate_rows, format_table, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("medwsol"))


def _rows():
    rows = []
    for seed, (a, b) in enumerate([(40.0, 70.1), (44.5, 66.0), (47.0, 75.2)]):
        rows.append({"method": "cam", "seed": seed, "pxap": a, "f1_pos": a / 2, "f1_neg": 60.0, "miou": None,
                     "boundary_f1": 10.0 + seed, "error": 0.0, "tau": 0.5 + seed / 10, "train_s": 60.0 + seed})
        rows.append({"method": "minmax_entropy", "seed": seed, "pxap": b, "f1_pos": b / 2, "f1_neg": 70.0,
                     "miou": 50.0, "boundary_f1": 20.0, "error": 2.8 * seed, "tau": 0.4, "train_s": 300.0})
    return rows


def test_mean_and_sd_match_the_statistics_module():
    rows = _rows()
    agg = {r["method"]: r for r in aggregate_rows(rows)}
    assert list(agg) == ["cam", "minmax_entropy"]  # first-seen order
    for name, r in agg.items():
        assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
        for k in METRICS:
            vals = [x[k] for x in rows if x["method"] == name and x[k] is not None]
            if not vals:
                assert r[k] is None and r[f"{k}_sd"] is None
                continue
            assert r[k] == pytest.approx(statistics.mean(vals))
            assert r[f"{k}_sd"] == pytest.approx(statistics.stdev(vals))  # sample sd, n - 1
    one = aggregate_rows([{"method": "cam", "seed": 0, "pxap": 41.0}])[0]
    assert one["pxap"] == 41.0 and one["pxap_sd"] is None


def test_table_shows_mean_plus_minus_sd():
    table = format_table(aggregate_rows(_rows()) + [{"method": "all-ones map", "pxap": 38.6, "f1_pos": 55.5,
                                                      "f1_neg": 0.0, "miou": 19.3, "boundary_f1": 0.0,
                                                      "error": 50.0, "tau": 0.0, "train_s": None}])
    lines = table.splitlines()
    cam = next(line for line in lines if line.startswith("| cam |"))
    sd = statistics.stdev([40.0, 44.5, 47.0])
    assert f"| {statistics.mean([40.0, 44.5, 47.0]):.1f} ± {sd:.1f} |" in cam
    assert "| — |" in cam  # mIoU missing for every seed
    assert "| all-ones map | 38.6 | 55.5 | 0.0 |" in table and "±" not in lines[-1]


@pytest.mark.parametrize("text", ["0,x", "-1", "0,,1", "1,1"])
def test_bad_seeds_are_rejected(text):
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds(text)
    assert parse_seeds(" 2,0 ,1") == [2, 0, 1]


def test_cli_bad_seeds_is_one_line_exit_2():
    res = subprocess.run([EXE, "benchmark", "methods", "pipelines/demo.yaml", "--seeds", "0,a"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--seeds" in res.stderr and "fix:" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_seeds_end_to_end(tmp_path):
    """cam + gradcam, 2 seeds, 1 epoch on tiny data: per-seed rows, mean ± sd in the markdown block."""
    md = tmp_path / "bench.md"
    sets = ["data.synthetic.n_images=16", "data.synthetic.size=64", "data.patch_size=64", "data.batch_size=4",
            "train.epochs=1", "train.threads=1", "evaluate.n_overlays=1", "tracking.enabled=false",
            f"data.manifest={tmp_path}/data/manifest.csv", f"run_root={tmp_path}/runs"]
    cmd = [EXE, "benchmark", "methods", str(ROOT / "pipelines/demo.yaml"), "--seeds", "0,1", "--method", "cam",
           "--method", "gradcam", "--out", str(md)]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = list((tmp_path / "runs" / "demo-benchmark").iterdir())
    data = json.loads((out / "benchmark.json").read_text())
    assert data["seeds"] == [0, 1]
    per = data["per_seed"]
    assert [(r["method"], r["seed"]) for r in per] == [("cam", 0), ("cam", 1), ("gradcam", 0), ("gradcam", 1)]
    assert per[2]["train_s"] == per[0]["train_s"]  # gradcam is evaluated on that seed's cam weights
    assert (out / "seed0" / "cam" / "checkpoints" / "best.pt").is_file()
    assert (out / "seed1" / "gradcam" / "eval").is_dir()
    text = md.read_text()
    assert "<!-- methods:demo:start -->" in text and "seeds 0, 1 (mean ± sd over 2 trainings" in text
    cam = next(line for line in text.splitlines() if line.startswith("| cam |"))
    want = statistics.mean([per[0]["pxap"], per[1]["pxap"]])
    assert f"| {want:.1f} ± " in cam
