"""Cohort inference on a Dask cluster: one task per slide, the same :func:`~medwsol.engine.infer.infer_slide`.

The driver (this process) connects to a cluster (:func:`connect`: a ``LocalCluster`` of ``N`` worker
processes for ``local:N``, or a running scheduler for ``tcp://HOST:PORT``), checks that every worker
can load the model package (:func:`check_workers`), submits one task per unfinished slide and, as
results arrive (``as_completed``), writes each slide's record, rewrites ``slides.csv`` and moves one
progress bar. Only the driver writes the cohort files and talks to MLflow; workers write their
slide's own folder (built in a temporary folder and renamed, as in the serial path) and nothing else.

What travels to a worker is a *path*: the model package folder (copied into ``<out>/package/`` by the
caller, so workers that share the output filesystem can read it), its digest, the serving choices
(score, positive class, tau) and the slide settings as plain JSON. Each worker process loads the
package once (:func:`served_for`: a per-process cache keyed by digest and serving choices) and
checks the digest - never a pickled module.

Failures: a slide whose task raises is a ``failed`` row with its one-line error, exactly as in the
serial path (the task catches it: a corrupt file is not retried). A worker process that dies
mid-slide (killed, out of memory) loses its task to the scheduler, which runs it again on another
worker (``distributed.scheduler.allowed-failures``, 3 here for ``local:N``); a task that still
cannot finish is a ``failed`` row naming that. Task-level ``retries`` cover errors raised outside
the slide itself (e.g. a worker that cannot deserialize the task).

Tile reading in workers: Dask runs its workers as daemonic processes, which may not start the
``DataLoader`` reader processes of ``slides.num_workers``; :class:`~medwsol.engine.infer.TileLoader`
then reads tiles ahead in a thread of the task (as it always does on a CPU). ``local:N`` clusters are
started with ``distributed.worker.daemon: False``, so a CUDA worker there keeps its reader processes.
``num_workers`` changes speed, never outputs (it is not an output setting).

Example:
    >>> from medwsol.engine.cohort import connect, run_cohort  # doctest: +SKIP
    >>> handle = connect("local:2")  # doctest: +SKIP
    >>> df = run_cohort(handle, "out/package", served, slides, names, settings, "out", "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from distributed import WorkerPlugin

from medwsol.config import parse_cluster
from medwsol.engine.runtime import cores
from medwsol.errors import ConfigError

__all__ = [
    "ClusterHandle",
    "connect",
    "cores",
    "check_workers",
    "run_cohort",
    "served_for",
    "slide_task",
    "ALLOWED_FAILURES",
]

#: Times the scheduler re-runs a slide whose worker died before it gives up (local:N clusters).
ALLOWED_FAILURES = 3
#: Task-level retries (errors raised outside the slide's own failure handling).
RETRIES = 2


@dataclass
class ClusterHandle:
    """A connected Dask client and, for ``local:N``, the cluster this process started."""

    spec: str
    setting: str
    client: Any
    cluster: Any = None
    threads: int | None = None  # torch threads per worker (None: each worker decides)
    workers: list[str] = field(default_factory=list)

    def describe(self) -> str:
        n = len(self.workers)
        t = f", {self.threads} torch thread(s) each" if self.threads else ""
        return f"{self.spec} ({n} worker{'s' if n != 1 else ''}{t})"

    def close(self) -> None:
        try:
            self.client.close(timeout=10)
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        if self.cluster is not None:
            try:
                self.cluster.close(timeout=20)
            except Exception:  # noqa: BLE001
                pass

    def __enter__(self) -> "ClusterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quiet_dask() -> None:
    for name in ("distributed", "distributed.worker", "distributed.nanny", "distributed.scheduler",
                 "distributed.core", "distributed.comm", "distributed.client", "tornado", "bokeh"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(spec: str, worker_threads: int | None = None, setting: str = "--cluster",
            timeout: float = 10.0) -> ClusterHandle:
    """Start ``local:N`` or connect to ``tcp://HOST:PORT``; fail in one line naming ``setting``.

    ``local:N`` starts ``N`` worker processes with one task slot each and ``worker_threads`` (default
    ``cores // N``) torch threads each, so ``N x threads <= cores``; ``N`` may not exceed the cores.
    A remote scheduler must answer within ``timeout`` seconds and have at least one worker.
    """
    import dask
    from distributed import Client, LocalCluster

    try:
        kind, value = parse_cluster(spec)
    except ValueError as err:
        raise ConfigError(f"{setting}: {err}; fix: pass e.g. local:2 or tcp://127.0.0.1:8786") from None
    _quiet_dask()
    if kind == "local":
        n = int(value)
        c = cores()
        if n > c:
            raise ConfigError(f"{setting} {spec}: {n} worker processes but this machine has {c} core(s); "
                              f"fix: use local:{c} or fewer (or a cluster: tcp://HOST:PORT)")
        threads = int(worker_threads) if worker_threads else max(1, c // n)
        if n * threads > c:
            raise ConfigError(f"slides.worker_threads {threads}: {n} workers x {threads} threads > {c} cores; "
                              f"fix: set slides.worker_threads to {max(1, c // n)} or fewer")
        with dask.config.set({"distributed.worker.daemon": False,
                              "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                              "distributed.worker.memory.terminate": False,
                              "distributed.admin.system-monitor.gil.enabled": False}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR, memory_limit=0, host="127.0.0.1",
                                   env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
            client = Client(cluster)
        handle = ClusterHandle(spec, setting, client, cluster, threads)
    else:
        try:
            client = Client(str(value), timeout=timeout)
        except (OSError, TimeoutError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ConfigError(f"{setting} {spec}: no Dask scheduler answers ({first}); fix: start one (dask scheduler "
                              f"--port PORT, then dask worker {spec}), correct the address, or use local:N") from None
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError):
            client.close()
            raise ConfigError(f"{setting} {spec}: the scheduler has no workers; fix: start some (dask worker {spec})"
                              ) from None
        handle = ClusterHandle(spec, setting, client, None, worker_threads)
    handle.client.register_plugin(_WorkerSetup(handle.threads), name="medwsol-worker-setup")
    handle.workers = sorted(handle.client.scheduler_info(n_workers=-1)["workers"])
    return handle


class _WorkerSetup(WorkerPlugin):
    """Dask worker plugin: torch threads of each worker (also of workers that join later)."""

    idempotent = True

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def setup(self, worker) -> None:
        import torch

        n = self.threads or max(1, cores() // max(1, int(getattr(worker.state, "nthreads", 1) or 1)))
        torch.set_num_threads(n)

    def teardown(self, worker) -> None:  # pragma: no cover - nothing to release
        pass


# -------------------------------------------------------------------------------- worker side

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def served_for(package_dir: str, digest: str, serve: dict[str, Any]):
    """This worker's :class:`~medwsol.engine.served.ServedModel` of a package, loaded once per process.

    Keyed by the package digest and the serving choices; the loaded package's digest must be ``digest``.
    """
    key = (digest, tuple(sorted((k, repr(v)) for k, v in serve.items())))
    with _LOCK:
        served = _CACHE.get(key)
        if served is None:
            from medwsol.engine.served import served_from_package
            from medwsol.errors import PackageError
            from medwsol.package import load_package

            pkg = load_package(package_dir)
            if pkg.digest != digest:
                raise PackageError(f"{package_dir}: package digest {pkg.digest[:19]} is not the driver's {digest[:19]} "
                                   "(replaced while the cohort ran); fix: re-run the cohort")
            kw = dict(serve)
            runtime = kw.pop("runtime", None)
            served = served_from_package(pkg, **kw)
            if runtime is not None:  # the graph the driver built (cached beside the package): reused, not rebuilt
                import torch

                from medwsol.engine.runtimes import build_runtime

                served = build_runtime(pkg, served, runtime["name"], runtime["tile_size"],
                                       threads=torch.get_num_threads(), min_dice=None)
            _CACHE.clear()  # one package per worker at a time
            _CACHE[key] = served
        return served


def _worker_info(package_dir: str, digest: str, serve: dict[str, Any]) -> dict[str, Any]:
    """Run on every worker before the cohort: load the package (cached) and say what this worker is."""
    import torch

    served_for(package_dir, digest, serve)
    try:
        from importlib.metadata import version

        v = version("medwsol")
    except Exception:  # noqa: BLE001 - a source tree
        v = "unknown"
    return {"medwsol": v, "torch": torch.__version__, "threads": torch.get_num_threads(), "pid": os.getpid(),
            "cuda": torch.cuda.is_available(), "daemon": multiprocessing.current_process().daemon}


def slide_task(package_dir: str, digest: str, serve: dict[str, Any], slide: str, settings: dict[str, Any],
               out_root: str, name: str, device: str, amp: str) -> dict[str, Any]:
    """One slide on a worker: :func:`~medwsol.engine.infer.infer_slide` with the cached served model.

    Returns the slides.csv row; a failing slide returns its ``failed`` row (not retried).
    """
    from medwsol.config import SlidesConfig
    from medwsol.engine.infer import failed_row, infer_slide

    cfg = SlidesConfig.model_validate(settings)
    try:
        served = served_for(package_dir, digest, serve)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return infer_slide(served, Path(slide), cfg, Path(out_root), device, progress=False, amp=amp, name=name)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one slide must not stop the cohort
        return failed_row(slide, err, name=name)


# -------------------------------------------------------------------------------- driver side


def serve_kwargs(served) -> dict[str, Any]:
    """What a worker needs, beside the package, to rebuild the driver's served model."""
    out = {"score": served.score_mode, "positive_class": served.positive_class, "tau": float(served.tau),
           "tau_source": served.tau_source}
    if getattr(served, "runtime", "torch") != "torch":  # an ONNX runtime the driver built beside the package copy
        out["runtime"] = {"name": served.runtime, "tile_size": int(served.info["tile_size"])}
    return out


def check_workers(handle: ClusterHandle, package_dir: str | Path, digest: str, serve: dict[str, Any]) -> dict:
    """Every worker loads the package (and keeps it); one line naming the first worker that cannot.

    Raises:
        ConfigError: a worker cannot import medwsol or its dependencies, cannot read the package folder
            (not on a shared filesystem), or runs another medwsol version than the driver.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("medwsol")
    except PackageNotFoundError:  # pragma: no cover
        mine = "unknown"
    results = handle.client.run(_worker_info, str(package_dir), digest, serve, on_error="return")
    for addr, res in sorted(results.items()):
        if isinstance(res, BaseException):
            text = (str(res).strip().splitlines() or [""])[0][:200]
            what = f"{type(res).__name__}: {text}" if text else type(res).__name__
            if isinstance(res, (ImportError, ModuleNotFoundError)):
                fix = (f"install medwsol {mine} with its dependencies on every worker (pip install medwsol=={mine}, "
                       "or use the same image/environment as the driver)")
            elif isinstance(res, (FileNotFoundError, PermissionError)) or "not found" in text or "missing" in text:
                fix = (f"put the output folder on a filesystem the workers share at the same path ({package_dir} "
                       "must be readable there)")
            else:
                fix = f"make the worker's environment match the driver's (medwsol {mine})"
            raise ConfigError(f"{handle.setting} {handle.spec}: worker {addr} cannot load the model package ({what}); "
                              f"fix: {fix}")
        if res.get("medwsol") not in (mine, "unknown") and mine != "unknown":
            raise ConfigError(f"{handle.setting} {handle.spec}: worker {addr} runs medwsol {res['medwsol']}, the driver "
                              f"{mine}; fix: install medwsol {mine} on every worker")
    return results


def _progress(enabled: bool, console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn
    from rich.text import Text

    class SlidesPerHour(ProgressColumn):
        def render(self, task) -> Text:
            done = task.fields.get("computed", 0)
            el = task.elapsed or 0.0
            return Text(f"{3600.0 * done / el:7.1f} slides/h" if done and el > 0 else "    ... slides/h")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SlidesPerHour(),
                    TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False, console=console)


def run_cohort(
    handle: ClusterHandle,
    package_dir: str | Path,
    served,
    slides: Sequence[str | Path],
    names: Sequence[str],
    settings,
    out_root: str | Path,
    device: str = "auto",
    amp: str = "auto",
    progress: bool = True,
    summary_csv: str | Path | None = None,
    console=None,
    task=None,
):
    """Infer a cohort on the cluster; the driver writes records and ``slides.csv`` as results arrive.

    Slides whose outputs are current are ``skipped`` here without a task (as in the serial path).

    Args:
        handle: from :func:`connect` (workers already checked with :func:`check_workers`).
        package_dir: the model package folder every worker can read.
        served: the driver's ServedModel (digest, serving choices).
        slides: slide files; ``names``: their output folder names (:func:`~medwsol.engine.infer.output_names`).
        settings: a ``SlidesConfig``.
        out_root: the cohort's output folder (shared with the workers).
        device, amp: as :func:`~medwsol.engine.infer.infer_slide` (each worker resolves ``auto`` itself).
        progress: one rich bar (slides done, slides/hour, failures).
        summary_csv: default ``<out_root>/slides.csv``.
        task: the per-slide function (default :func:`slide_task`; same signature), e.g. a benchmark's.

    Returns:
        The summary DataFrame, rows in the order of ``slides``.
    """
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    from medwsol.engine.infer import _write_record, failed_row, finished_row, write_summary

    out_root = Path(out_root)
    csv = Path(summary_csv) if summary_csv is not None else out_root / "slides.csv"
    digest = str(served.digest)
    serve = serve_kwargs(served)
    payload = settings.model_dump(mode="json")
    rows: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, (s, n) in enumerate(zip(slides, names)):
        done = finished_row(served, s, settings, out_root, n)
        if done is None:
            todo.append(i)
        else:
            rows[i] = done
            _write_record(out_root, done)

    def summary():
        return write_summary([rows[i] for i in sorted(rows)], csv)

    summary()
    futures = {}
    stamp = f"{os.getpid()}-{time.time_ns()}"
    for i in todo:
        fut = handle.client.submit(task or slide_task, str(package_dir), digest, serve, str(slides[i]), payload,
                                   str(out_root), names[i], str(device), str(amp), key=f"medwsol-slide-{i}-{stamp}",
                                   retries=RETRIES, pure=False)
        futures[fut] = i
    failed = 0
    with _progress(progress, console) as bar:
        task = bar.add_task(f"cohort on {handle.spec}", total=len(rows) + len(todo), completed=len(rows),
                            failed=0, computed=0)
        computed = 0
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                row = fut.result()
            except KilledWorker:
                row = failed_row(slides[i], RuntimeError(
                    f"the worker running it died {ALLOWED_FAILURES + 1} times (killed, or out of memory); fix: give "
                    "the workers more memory (dask worker --memory-limit) or lower slides.batch_size"), name=names[i])
            except Exception as err:  # noqa: BLE001 - e.g. a worker that cannot deserialize the task
                row = failed_row(slides[i], err, name=names[i])
            rows[i] = row
            _write_record(out_root, row)
            summary()
            failed += row["status"] == "failed"
            computed += row["status"] in ("ok", "empty")
            bar.update(task, advance=1, failed=failed, computed=computed)
            fut.release()
    return summary()
