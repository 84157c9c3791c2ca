"""Run folders: what a run of this project is, which one a command uses, and what a failed
invocation leaves behind (nothing it made, except a training that ``--resume`` can continue).

A run folder is ``<run_root>/<name>/<timestamp>/`` and holds ``medwsol_run.json`` (the marker)::

    {"format": "medwsol-run", "version": 1, "pipeline": "demo", "created": "...",
     "stages": {"train": {"status": "finished", "at": "...", "epochs": 20}, ...}}

``status`` is ``running``, ``finished``, ``stopped`` (``train.stop_after``), ``failed`` or
``interrupted``. Runs written before the marker existed are recognised by their ``config.yaml`` (a
dump of this pipeline's config) next to something a stage wrote; the marker is added on first use.

Rules (docs/errors.md):

* ``--run-dir`` must be an existing run folder of the same pipeline: a missing path, a file, a
  folder that is not a run, or a run of another pipeline is refused before anything is written;
* ``train`` into a run that already has a training needs ``--resume`` or ``--overwrite``;
* without ``--run-dir``, ``prepare``/``train``/``run`` make a new folder, ``train --resume`` takes
  the newest run with a resumable checkpoint, ``evaluate``/``infer`` the newest run with a finished
  training and ``export`` the newest run with a finished inference;
* on failure (an error, Ctrl-C, SIGTERM) a run folder this invocation created is removed unless it
  holds work a re-run continues (``checkpoints/last.pt`` for ``--resume``, finished slide folders)
  (then it is kept, marked failed/interrupted, and ``latest`` skips it for evaluation); in an
  existing run folder, what the failed stage added is removed (but not such work), files this
  invocation rewrote (``config.yaml``, ``mlflow_run_id``) come back, and with ``--overwrite`` the
  previous training comes back.

Example:
    >>> from medwsol.rundir import read_marker
    >>> read_marker("/nonexistent") is None
    True
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from medwsol.errors import ConfigError

__all__ = [
    "MARKER",
    "FORMAT",
    "read_marker",
    "latest_run_dir",
    "new_run_dir_path",
    "check_run_dir",
    "resolve_run_dir",
    "RunSession",
]

MARKER = "medwsol_run.json"
FORMAT = "medwsol-run"
#: Outputs of each stage inside a run folder; ``--overwrite`` sets aside those of train and later stages.
STAGE_OUTPUTS = {
    "train": ("checkpoints", "train_log.csv", "train_curves.png", "package"),
    "evaluate": ("eval",),
    "infer": ("slides",),
    "export": (),
}
#: What a failed invocation leaves that a re-run continues: a training's last checkpoint (``--resume``)
#: and finished slides (their folders are complete; a re-run of ``infer`` skips them).
RESUMABLE = ("checkpoints/last.pt", "slides/*/meta.json")
#: Bookkeeping files of the session itself: restored (or refreshed) by the session, never "new outputs".
BOOKKEEPING = (MARKER, "config.yaml", "mlflow_run_id")
_LEGACY_OUTPUTS = ("mlflow_run_id", "checkpoints", "train_log.csv", "eval", "slides")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_marker(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run folder's marker (``legacy: True`` for runs made before markers), or None if not a run."""
    from medwsol.config import load_yaml_text
    from medwsol.errors import MedwsolError
    from medwsol.io import read_json_file, read_text_file

    d = Path(run_dir)
    try:
        if not d.is_dir():
            return None
        if (d / MARKER).is_file():
            info = read_json_file(d / MARKER, "run marker")
            if isinstance(info, dict) and info.get("format") == FORMAT and isinstance(info.get("pipeline"), str):
                info.setdefault("stages", {})
                return info
            return None
        cfg = d / "config.yaml"
        if cfg.is_file() and any((d / n).exists() for n in _LEGACY_OUTPUTS):
            data = load_yaml_text(read_text_file(cfg, "config.yaml", max_bytes=1_000_000), str(cfg))
            if isinstance(data, dict) and isinstance(data.get("name"), str) and {"stages", "data", "model"} <= set(data):
                return {"format": FORMAT, "version": 1, "pipeline": data["name"], "stages": {}, "legacy": True}
    except (MedwsolError, OSError):
        return None
    return None


def _write_marker(run_dir: Path, info: dict[str, Any]) -> None:
    from medwsol.io import write_json

    info = {k: v for k, v in info.items() if k != "legacy"}
    write_json(run_dir / MARKER, info)


def _stage_status(info: dict[str, Any], stage: str) -> str | None:
    st = info.get("stages", {}).get(stage)
    return st.get("status") if isinstance(st, dict) else None


def _satisfies(d: Path, info: dict[str, Any], need: str | None) -> bool:
    """Whether run ``d`` has what a command needs: a finished training, a resumable one, or slides."""
    if need is None:
        return True
    legacy = info.get("legacy", False)
    if need == "model":
        if legacy:
            return (d / "checkpoints" / "best.pt").is_file()
        return _stage_status(info, "train") == "finished" and (d / "checkpoints" / "best.pt").is_file()
    if need == "resume":
        return (d / "checkpoints" / "last.pt").is_file() and _stage_status(info, "train") != "finished"
    if need == "slides":
        return (d / "slides" / "slides.csv").is_file()
    raise ValueError(need)


_NEEDS = {
    "model": "a finished training (checkpoints/best.pt)",
    "resume": "an unfinished training to resume (checkpoints/last.pt)",
    "slides": "a finished inference (slides/slides.csv)",
}


def latest_run_dir(cfg, need: str | None = None) -> Path | None:
    """The newest run folder of this pipeline (by name: timestamps sort) that has what ``need`` asks.

    Args:
        cfg: the pipeline config (``run_root``, ``name``).
        need: None (any run), ``"model"`` (a finished training), ``"resume"`` (an unfinished
            training with ``checkpoints/last.pt``) or ``"slides"`` (a finished inference).
    """
    base = Path(cfg.run_root) / cfg.name
    if not base.is_dir():
        return None
    for d in sorted((p for p in base.iterdir() if not p.name.startswith(".")), reverse=True):
        info = read_marker(d)
        if info is not None and info.get("pipeline") == cfg.name and _satisfies(d, info, need):
            return d
    return None


def new_run_dir_path(cfg) -> Path:
    """A fresh ``<run_root>/<name>/<YYYYmmdd-HHMMSS>[-i]`` path (not created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    d = Path(cfg.run_root) / cfg.name / stamp
    i = 1
    while d.exists():
        d = Path(cfg.run_root) / cfg.name / f"{stamp}-{i}"
        i += 1
    return d


def check_run_dir(path: str | os.PathLike[str], cfg, label: str = "--run-dir") -> dict[str, Any]:
    """Refuse anything but an existing run folder of this pipeline; return its marker."""
    p = Path(path)
    fix_new = f"omit {label} to start a new run under {Path(cfg.run_root) / cfg.name}"
    if not p.exists():
        raise ConfigError(f"{label} {str(p)!r}: not found; fix: {fix_new}, or give an existing run folder")
    if not p.is_dir():
        raise ConfigError(f"{label} {str(p)!r}: is a file, not a run folder; fix: {fix_new}")
    info = read_marker(p)
    if info is None:
        raise ConfigError(f"{label} {str(p)!r}: not a medwsol run folder (no {MARKER}); medwsol writes only into its "
                          f"own run folders; fix: {fix_new}, or give a folder made by medwsol")
    if info["pipeline"] != cfg.name:
        raise ConfigError(f"{label} {str(p)!r}: is a run of pipeline {info['pipeline']!r}, not {cfg.name!r}; fix: use "
                          f"that pipeline's YAML (or --set name={info['pipeline']}), or {fix_new}")
    return info


def resolve_run_dir(
    cfg,
    run_dir: str | os.PathLike[str] | None,
    stages: list[str],
    model_ref: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    create: bool = False,
) -> tuple[Path, bool]:
    """Which run folder the stages use, and whether it is new (to be created); nothing is written.

    Args:
        cfg: the pipeline config.
        run_dir: ``--run-dir`` (None: chosen as the module docstring says).
        stages: the stages to run, in order.
        model_ref: ``--model`` (evaluation/inference of a given model starts a new run).
        resume: ``--resume``.
        overwrite: ``--overwrite``.
        create: accept a ``run_dir`` that does not exist yet and create it (the Python API, e.g. the
            methods benchmark; the command line never does this).

    Returns:
        ``(path, is_new)``.

    Raises:
        ConfigError: the folder is refused (see :func:`check_run_dir`), training would overwrite a
            training without ``--resume``/``--overwrite``, nothing to resume, no run to continue.
    """
    from medwsol.io import ensure_writable

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one; fix: --resume continues the training, --overwrite "
                          "starts it again from scratch")
    if resume and "train" not in stages:
        raise ConfigError("--resume: only the train stage resumes; fix: drop --resume")
    base = Path(cfg.run_root) / cfg.name
    if run_dir is not None:
        p = Path(run_dir)
        if create and not p.exists():
            ensure_writable(p, "run folder")
            return p, True
        info = check_run_dir(p, cfg)
        if "train" in stages:
            has_training = (p / "checkpoints" / "last.pt").is_file() or (p / "checkpoints" / "best.pt").is_file()
            if resume:
                if not (p / "checkpoints" / "last.pt").is_file():
                    raise ConfigError(f"--run-dir {str(p)!r}: nothing to resume (no checkpoints/last.pt); fix: drop "
                                      "--resume to train from scratch in a new run")
                _check_same_method(p, cfg)
                train = info.get("stages", {}).get("train") or {}
                done = train.get("epochs") if train.get("status") == "finished" else None
                if done is not None and int(done) >= int(cfg.train.epochs):
                    raise ConfigError(f"--run-dir {str(p)!r}: the training is finished ({done} epochs); fix: raise "
                                      f"train.epochs above {done} to continue it, or --overwrite to train again")
            elif has_training and not overwrite:
                state = "a finished" if _stage_status(info, "train") == "finished" else "an unfinished"
                raise ConfigError(f"--run-dir {str(p)!r}: already holds {state} training (checkpoints/); fix: --resume "
                                  "to continue it, --overwrite to train again from scratch, or omit --run-dir for a "
                                  "new run")
        return p, False
    if resume:
        latest = latest_run_dir(cfg, "resume")
        if latest is None:
            raise ConfigError(f"--resume: no run of pipeline {cfg.name!r} under {base} has {_NEEDS['resume']}; "
                              "fix: pass --run-dir, or drop --resume to start a new run")
        _check_same_method(latest, cfg)
        return latest, False
    starts_fresh = stages[0] in ("prepare", "train") or model_ref is not None
    if not starts_fresh:
        need = "slides" if stages[0] == "export" and cfg.slides.out_dir is None else "model"
        if stages[0] == "export" and cfg.slides.out_dir is not None:
            need = None
        latest = latest_run_dir(cfg, need)
        if latest is None:
            what = f" with {_NEEDS[need]}" if need else ""
            raise ConfigError(
                f"no run of pipeline {cfg.name!r}{what} under {base}; "
                "fix: run `medwsol run` first, or pass --run-dir or --model"
            )
        return latest, False
    ensure_writable(base, "run_root", fix="set run_root to a writable folder")
    return new_run_dir_path(cfg), True


def _check_same_method(run_dir: Path, cfg) -> None:
    """``--resume`` with another method than the run's own (its config.yaml) fails before any work."""
    from medwsol.config import load_yaml_text
    from medwsol.errors import MedwsolError
    from medwsol.io import read_text_file

    try:
        data = load_yaml_text(read_text_file(run_dir / "config.yaml", "config.yaml", max_bytes=1_000_000))
        method = data["model"]["method"]
    except (MedwsolError, KeyError, TypeError):
        return  # the checkpoint itself is checked when training resumes
    if method != cfg.model.method:
        raise ConfigError(f"--resume {run_dir}: the run trains {method!r} but the config says {cfg.model.method!r}; "
                          f"fix: resume with the run's own config ({run_dir / 'config.yaml'}) or --set "
                          f"model.method={method}")


class RunSession:
    """The lifetime of one invocation in a run folder: create it, record stages, undo on failure.

    Use as a context manager around the stages; the folder (and any parents) is created on entry
    when new. ``config.yaml`` and the marker are written on entry; ``mlflow_run_id`` by the caller.

    Args:
        run_dir: the folder (from :func:`resolve_run_dir`).
        is_new: create it, and remove it again on failure unless it holds a resumable checkpoint.
        pipeline: the pipeline name (recorded in the marker).
        config_text: the ``config.yaml`` to write.
        overwrite: set the previous training (and everything after it) aside; restored on failure,
            deleted on success.
    """

    def __init__(self, run_dir: Path, is_new: bool, pipeline: str, config_text: str, overwrite: bool = False):
        self.run_dir = Path(run_dir)
        self.is_new = is_new
        self.pipeline = pipeline
        self.config_text = config_text
        self.overwrite = overwrite
        self.created_parents: list[Path] = []
        self.before: set[str] = set()
        self.saved: dict[str, bytes | None] = {}
        self.aside: Path | None = None
        self.current: str | None = None
        self.kept = False
        self.last_stamp: tuple | None = None

    # -- marker ---------------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        info = read_marker(self.run_dir)
        if info is None or info.get("legacy"):
            base = {"format": FORMAT, "version": 1, "pipeline": self.pipeline, "created": _now(), "stages": {}}
            return base if info is None else {**base, "stages": info.get("stages", {})}
        return info

    def mark(self, stage: str, status: str, **extra: Any) -> None:
        """Record a stage's status (``running``, ``finished``, ``stopped``, ``failed``, ``interrupted``).

        A stage that starts again in an existing run (``evaluate``) has its previous outputs set aside
        first: they come back if it fails, so a run never holds a mix of two evaluations.
        """
        if status == "running" and not self.is_new and stage == "evaluate":
            self._set_aside(STAGE_OUTPUTS["evaluate"])
        info = self._info()
        info.setdefault("stages", {})[stage] = {"status": status, "at": _now(), **extra}
        _write_marker(self.run_dir, info)
        self.current = stage if status == "running" else None

    # -- context --------------------------------------------------------------------------------
    def __enter__(self) -> "RunSession":
        from medwsol.io import write_text

        d = self.run_dir
        if self.is_new:
            missing = []
            q = d
            while not q.exists():
                missing.append(q)
                q = q.parent
            d.mkdir(parents=True, exist_ok=False)
            self.created_parents = missing[1:]  # the run folder itself is handled apart
        else:
            self.before = set(os.listdir(d))
            for name in BOOKKEEPING:
                self.saved[name] = (d / name).read_bytes() if (d / name).is_file() else None
            self.last_stamp = self._work_stamp()
        try:
            if self.overwrite and not self.is_new:
                names = [n for stage in ("train", "evaluate", "infer", "export") for n in STAGE_OUTPUTS[stage]]
                self._set_aside([*names, "mlflow_run_id"])  # a new training is a new MLflow run
            write_text(d / "config.yaml", self.config_text)
            _write_marker(d, self._info())
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self.aside is not None:
                shutil.rmtree(self.aside, ignore_errors=True)
            return
        if issubclass(exc_type, KeyboardInterrupt):
            from medwsol.errors import interrupt_reached_cleanup

            interrupt_reached_cleanup()
        # the failed stage is recorded where the invocation left work to continue (a newer
        # checkpoints/last.pt, more finished slides); otherwise an existing run's marker is put back
        # (with --overwrite a failure always puts the previous training back, so nothing new is kept)
        left_work = not self.overwrite and self._resumable() and self._work_stamp() != self.last_stamp
        with contextlib.suppress(Exception):
            if self.current is not None and (left_work or self.is_new):
                status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
                self.mark(self.current, status, error=str(exc).splitlines()[0][:300] if str(exc) else exc_type.__name__)
        self._undo(restore_marker=not left_work)

    # -- undo -----------------------------------------------------------------------------------
    def _resumable(self) -> bool:
        return any(any(self.run_dir.glob(r)) for r in RESUMABLE)

    def _work_stamp(self) -> tuple:
        """What a re-run could continue from: the last checkpoint's (mtime, size) and the finished slides."""
        try:
            st = (self.run_dir / RESUMABLE[0]).stat()
            last = (st.st_mtime_ns, st.st_size)
        except OSError:
            last = None
        return last, frozenset(str(p) for p in self.run_dir.glob(RESUMABLE[1]))

    def _set_aside(self, names: list[str] | tuple[str, ...]) -> None:
        """Move existing outputs into a hidden folder of the run (restored on failure, deleted on success)."""
        d = self.run_dir
        present = [n for n in names if (d / n).exists() or (d / n).is_symlink()]
        if not present:
            return
        if self.aside is None:
            self.aside = d / f".set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.tmp"
            self.aside.mkdir()
        for n in present:
            os.replace(d / n, self.aside / n)

    def _undo(self, restore_marker: bool = True) -> None:
        """Remove what this invocation added; put back what it replaced."""
        d = self.run_dir
        if self.is_new:
            if not self._resumable():
                shutil.rmtree(d, ignore_errors=True)
                for parent in self.created_parents:  # parents this invocation made, if now empty
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            else:
                self.kept = True
            return
        if not d.is_dir():
            return
        keep = set()
        if not self.overwrite and (d / RESUMABLE[0]).is_file():
            keep |= set(STAGE_OUTPUTS["train"])
        if not self.overwrite and any(d.glob(RESUMABLE[1])):
            keep |= set(STAGE_OUTPUTS["infer"])
        for name in set(os.listdir(d)) - self.before:
            if name in BOOKKEEPING or (self.aside is not None and d / name == self.aside) or name in keep:
                continue
            target = d / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    target.unlink()
        if self.aside is not None:
            for item in self.aside.iterdir():
                target = d / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                os.replace(item, target)
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        for name, data in self.saved.items():
            if name == MARKER and not restore_marker:
                continue  # keeps the failed stage's status
            with contextlib.suppress(OSError):
                if data is None:
                    (d / name).unlink(missing_ok=True)
                else:
                    from medwsol.io import atomic_path

                    with atomic_path(d / name) as tmp:
                        tmp.write_bytes(data)
