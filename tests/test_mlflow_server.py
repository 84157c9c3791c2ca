"""A shared MLflow tracking server: `mlflow server` on 127.0.0.1 (SQLite backend and artifact folder in tmp),
a tiny pipeline tracked over HTTP, then the registered version, its alias and the package served back by it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port  # noqa: E402 - tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture()
def server(tmp_path):
    port = free_port()
    (tmp_path / "server").mkdir()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server/mlflow.db",
         "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # bounded wait: the server imports mlflow, creates the schema, forks uvicorn
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_pipeline_tracked_and_registered_on_an_mlflow_server(server, tmp_path):
    (tmp_path / "demo.yaml").write_text((ROOT / "pipelines" / "demo.yaml").read_text())
    sets = ["data.manifest=data/m/manifest.csv", "data.synthetic.n_images=24", "data.synthetic.size=96",
            "data.patch_size=64", "data.batch_size=8", "model.output_stride=16", "train.epochs=1",
            "train.select_max_val_error=null", "evaluate.n_overlays=2", f"tracking.uri={server}",
            "tracking.register_as=medwsol-http"]
    res = subprocess.run([str(BIN / "medwsol"), "run", "demo.yaml", *[a for s in sets for a in ("--set", s)]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "registered medwsol-http v1" in res.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # nothing tracked locally
    from mlflow.tracking import MlflowClient

    from medwsol.package import read_package_meta
    from medwsol.stages import resolve_package

    client = MlflowClient(tracking_uri=server)
    mv = client.get_model_version_by_alias("medwsol-http", "champion")
    assert mv.version == "1" and mv.tags["select_metric"] == "valpx_pxap"
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.data.params["tracking.uri"] == server
    assert "valpx_pxap" in run.data.metrics
    local = next((tmp_path / "runs" / "demo").iterdir()) / "package"
    pkg = resolve_package("models:/medwsol-http@champion", server)  # artifacts served by the server over HTTP
    assert pkg.digest == read_package_meta(local)["digest"]
    assert json.loads((local / "package.json").read_text())["provenance"]["run_id"] == mv.run_id
    # a server that refuses (nothing listens on this port): one line naming tracking.uri, nothing written
    bad = f"http://127.0.0.1:{free_port()}"
    res = subprocess.run([str(BIN / "medwsol"), "train", "demo.yaml", "--set", f"tracking.uri={bad}",
                          "--set", "run_root=bad", *[a for s in sets[:7] for a in ("--set", s)]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "tracking.uri" in lines[0] and "fix:" in lines[0], res.stderr
    assert not (tmp_path / "bad").exists() or [p for p in (tmp_path / "bad").rglob("*") if p.is_file()] == []
