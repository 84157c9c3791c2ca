"""Cohort inference on Dask: real LocalCluster and a real external scheduler on 127.0.0.1, no mocks.

Every cohort here is compared with the serial path (``infer_cohort`` in this process): the heatmaps of
the slides that finish must match to 1e-6 (torch threads differ between the two, so reductions may
round differently in the last bit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medwsol.config import SlidesConfig, parse_cluster

from conftest import free_port  # noqa: E402 - tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cli(args, cwd, timeout=600, env=None):
    return subprocess.run([str(BIN / "medwsol"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines and "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny package (tile 64 px at 2 um/px) and 4 small slides, the last one corrupt; serial outputs."""
    from test_infer import islands, write_slide
    from test_package import make_package

    from medwsol.engine.infer import infer_cohort
    from medwsol.package import load_package
    from medwsol.stages import serving_setup

    root = tmp_path_factory.mktemp("cohort")
    pkg = make_package(root / "pkg", method="cam")
    (root / "slides").mkdir()
    slides = []
    for i in range(4):
        discs = [(120 + 60 * i, 150, 90), (380, 250 - 20 * i, 80)]
        slides.append(write_slide(root / "slides" / f"s{i}.tif", islands(384, 512, discs), mpp=1.0, tile=128))
    bad = slides[-1]
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated: OpenSlide cannot open it
    served, settings = serving_setup(load_package(pkg), SlidesConfig(num_workers=0))
    serial = infer_cohort(served, slides, settings, root / "serial", "cpu", progress=False)
    assert list(serial.status) == ["ok", "ok", "ok", "failed"]
    return {"root": root, "pkg": pkg, "slides": slides, "serial": root / "serial"}


def _same_heatmaps(a: Path, b: Path, names, runtime: str | None = None):
    """``b``'s heatmaps equal ``a``'s (the serial torch path); with ``runtime``, b ran that ONNX graph instead."""
    for n in names:
        x, y = np.load(a / n / "heatmap.npy"), np.load(b / n / "heatmap.npy")
        assert x.shape == y.shape and float(np.abs(x - y).max()) <= (1e-6 if runtime is None else 1e-4), n
        ka = json.loads((a / n / "meta.json").read_text())["key"]["model"]
        kb = json.loads((b / n / "meta.json").read_text())["key"]["model"]
        if runtime is not None:  # the resume key names the graph, so a torch run never skips an ONNX output
            assert kb.pop("runtime") == runtime and len(kb.pop("graph_sha256")) == 64
        assert ka == kb


def test_cluster_specs_parse_and_bad_ones_are_one_line(tmp_path):
    assert parse_cluster("local:2") == ("local", 2)
    assert parse_cluster("tcp://127.0.0.1:8786") == ("remote", "tcp://127.0.0.1:8786")
    for bad in ("local:0", "local", "http://x:1", "tcp://nohost", "2"):
        with pytest.raises(ValueError):
            parse_cluster(bad)
    from medwsol.config import load_config

    from medwsol.errors import ConfigError

    with pytest.raises(ConfigError, match="slides.cluster"):
        load_config(ROOT / "pipelines" / "demo.yaml", overrides=["slides.cluster=lokal:2"], stages=[])


def test_cohort_import_stays_out_of_help_and_validate():
    code = ("import sys; from typer.testing import CliRunner; from medwsol.cli import app; "
            "r = CliRunner().invoke(app, ['validate', 'pipelines/demo.yaml', '--set', 'slides.cluster=local:2']); "
            "assert r.exit_code == 0, r.output; bad = [m for m in ('dask', 'distributed', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.slow
def test_local2_cohort_with_a_corrupt_slide_matches_serial_and_resumes(cohort, tmp_path):
    """local:2, 4 slides, one corrupt: 3 ok rows equal to the serial outputs, 1 failed row, exit 2; a re-run skips."""
    out = tmp_path / "out"
    args = ["infer", *map(str, cohort["slides"]), "--model", str(cohort["pkg"]), "--out", str(out), "--no-export",
            "--cluster", "local:2", "--set", "train.device=cpu", "--set", "slides.runtime=onnx"]
    res = _cli(args, tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "1 slide(s) failed" in _one_line(res.stderr) and "slides/h" in res.stderr
    df = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert list(df.status) == ["ok", "ok", "ok", "failed"]
    assert df.error[3].startswith(str(cohort["slides"][3])) and "fix:" in df.error[3]
    assert sorted(p.name for p in (out / "records").iterdir()) == [f"s{i}.json" for i in range(4)]
    # the workers ran the ONNX graph the driver built beside their package copy: the serial fp32 torch maps
    _same_heatmaps(cohort["serial"], out, ["s0", "s1", "s2"], runtime="onnx")
    assert (out / "package" / "package.json").is_file()
    assert list((out / "package" / "runtimes").rglob("fp32_*.onnx"))
    assert not list(out.glob(".*.tmp"))  # no half-written slide folder
    mtimes = {n: (out / n / "meta.json").stat().st_mtime_ns for n in ("s0", "s1", "s2")}
    res = _cli(args, tmp_path)
    assert res.returncode == 2
    df = pd.read_csv(out / "slides.csv", keep_default_na=False)
    assert list(df.status) == ["skipped", "skipped", "skipped", "failed"]
    assert mtimes == {n: (out / n / "meta.json").stat().st_mtime_ns for n in ("s0", "s1", "s2")}


def _start(cmd, env=None, log=None):
    return subprocess.Popen(cmd, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def _scheduler(tmp_path):
    port = free_port()
    sched = _start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--dashboard-address", ":0", "--no-show"], log=open(tmp_path / "scheduler.log", "w"))
    addr = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return sched, addr
        except OSError:
            time.sleep(0.3)
    _stop([sched])
    raise RuntimeError(f"dask scheduler did not start: {(tmp_path / 'scheduler.log').read_text()[-2000:]}")


def _worker(addr, tmp_path, name, env=None):
    return _start([str(BIN / "dask"), "worker", addr, "--nthreads", "1", "--nworkers", "1", "--name", name,
                   "--dashboard-address", ":0", "--memory-limit", "0", "--local-directory", str(tmp_path / name)],
                  env={"OMP_NUM_THREADS": "1", **(env or {})}, log=open(tmp_path / f"{name}.log", "w"))


def _wait_workers(addr, n, timeout=120):
    from distributed import Client

    with Client(addr, timeout=30) as c:
        c.wait_for_workers(n, timeout=timeout)


@pytest.mark.slow
def test_external_scheduler_survives_a_killed_worker(cohort, tmp_path):
    """A scheduler and two workers started here; one worker killed mid-slide; every good slide still finishes."""
    sched, addr = _scheduler(tmp_path)
    procs = [sched]
    try:
        a, b = _worker(addr, tmp_path, "wa"), _worker(addr, tmp_path, "wb")
        procs += [a, b]
        _wait_workers(addr, 2)
        out = tmp_path / "out"
        slides = [str(s) for s in cohort["slides"][:3]]
        driver = subprocess.Popen([str(BIN / "medwsol"), "infer", *slides, "--model", str(cohort["pkg"]), "--out",
                                   str(out), "--no-export", "--cluster", addr, "--set", "train.device=cpu",
                                   "--set", "slides.runtime=torch",
                                   "--set", "slides.batch_size=1"],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(out.glob(".*.tmp"))) < 2 and driver.poll() is None:
            time.sleep(0.02)  # both workers are writing a slide
        os.killpg(a.pid, signal.SIGKILL)  # the worker (and its nanny) die while a slide is being written
        stdout, stderr = driver.communicate(timeout=600)
        assert driver.returncode == 0, stderr[-3000:]
        df = pd.read_csv(out / "slides.csv", keep_default_na=False)
        assert list(df.status) == ["ok", "ok", "ok"], df.to_string()
        _same_heatmaps(cohort["serial"], out, ["s0", "s1", "s2"])
    finally:
        _stop(procs)


@pytest.mark.slow
def test_bad_clusters_are_one_line_and_write_nothing(cohort, tmp_path):
    """Unreachable scheduler, more local workers than cores, a worker that lacks a dependency: exit 2, no output."""
    base = ["infer", str(cohort["slides"][0]), "--model", str(cohort["pkg"]), "--no-export"]
    res = _cli([*base, "--out", "o1", "--cluster", f"tcp://127.0.0.1:{free_port()}"], tmp_path)
    line = _one_line(res.stderr)
    assert res.returncode == 2 and "--cluster" in line and "no Dask scheduler answers" in line and "fix:" in line
    res = _cli([*base, "--out", "o2", "--cluster", f"local:{(os.cpu_count() or 1) + 64}"], tmp_path)
    line = _one_line(res.stderr)
    assert res.returncode == 2 and "core(s)" in line and "fix: use local:" in line
    res = _cli([*base, "--out", "o3", "--cluster", "lokal:2"], tmp_path)
    assert res.returncode == 2 and "--cluster" in _one_line(res.stderr)
    # a worker whose environment lacks a dependency of the package loader (safetensors shadowed by a broken one)
    broken = tmp_path / "broken"
    (broken / "safetensors").mkdir(parents=True)
    (broken / "safetensors" / "__init__.py").write_text("raise ImportError('No module named safetensors')\n")
    sched, addr = _scheduler(tmp_path)
    procs = [sched]
    try:
        procs.append(_worker(addr, tmp_path, "wbroken", env={"PYTHONPATH": str(broken)}))
        _wait_workers(addr, 1)
        res = _cli([*base, "--out", "o4", "--cluster", addr], tmp_path)
        line = _one_line(res.stderr)
        assert res.returncode == 2 and "cannot load the model package" in line and "safetensors" in line
        assert "fix: install medwsol" in line
    finally:
        _stop(procs)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []


def test_resume_key_reads_back_equal_and_reserved_names_are_never_slides(tmp_path):
    """slide_key is what meta.json holds (a map range tuple reads back a list: re-runs used to recompute);
    a slide called package.tif or records.svs never takes the cohort's own folders."""
    import torch

    from medwsol.engine.infer import output_names, slide_key
    from medwsol.engine.served import ServedModel
    from medwsol.methods.base import WSOLOutput

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return WSOLOutput(logits=torch.zeros(len(x), 2), weight_map=x[:, :1])

    served = ServedModel(Tiny(), ["a", "b"], "b", map_range=(0.1, 2.5), digest="sha256:x")
    f = tmp_path / "s.tif"
    f.write_bytes(b"x")
    key = slide_key(served, f, SlidesConfig())
    assert json.loads(json.dumps(key)) == key and key["model"]["map_range"] == [0.1, 2.5]
    names = output_names([tmp_path / "package.tif", tmp_path / "records.svs", tmp_path / "s.tif"])
    assert names[0].startswith("package-") and names[1].startswith("records-") and names[2] == "s"
