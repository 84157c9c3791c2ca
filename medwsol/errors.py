"""Errors that the CLI turns into one red line and exit code 2.

Every message names the offending file or key and ends with a fix. See docs/errors.md for the
contract (exit codes, message shape, cleanup, signals).
"""

from __future__ import annotations

import re

__all__ = [
    "MedwsolError",
    "ConfigError",
    "DataError",
    "ManifestError",
    "RegistryError",
    "CheckpointError",
    "PackageError",
    "TrackingError",
    "SlideError",
    "TrainingError",
    "NotAvailableError",
    "Terminated",
    "interrupt_reached_cleanup",
    "user_error",
    "one_line",
]


class MedwsolError(Exception):
    """Base of every error the user can fix; the CLI prints it as one line.

    The message is one line by construction: line breaks (a file name or a YAML key can hold
    them) become spaces.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and ("\n" in args[0] or "\r" in args[0]):
            args = (" ".join(args[0].split()),)
        super().__init__(*args)


class ConfigError(MedwsolError):
    """A pipeline YAML (or a --set override, or a command-line option) is invalid."""


class DataError(MedwsolError):
    """A manifest, image, mask or dataset folder is invalid."""


class ManifestError(DataError):
    """A manifest CSV (columns, rows, the files it lists) is invalid."""


class RegistryError(MedwsolError, KeyError):
    """An unknown name was looked up in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class CheckpointError(MedwsolError):
    """A checkpoint is missing, corrupted or does not match the model."""


class PackageError(CheckpointError):
    """A model package is missing, of a newer schema, corrupt, or does not fit its config."""


class TrackingError(MedwsolError):
    """The tracking server or model registry cannot be used."""


class SlideError(MedwsolError):
    """A slide cannot be opened or processed."""


class TrainingError(MedwsolError):
    """Training cannot go on (e.g. the loss became NaN)."""


class NotAvailableError(MedwsolError):
    """A stage or feature that is not implemented yet."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, SLURM, Kubernetes) raised in the main thread.

    A subclass of ``KeyboardInterrupt`` so that every clean-up written for Ctrl-C (temporary
    files and folders, the MLflow run's status) runs for it too; the CLI exits with 128 + signum.
    """

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = int(signum)


def interrupt_reached_cleanup() -> None:
    """Called by clean-up code that an interrupt (Ctrl-C, SIGTERM) has reached: the CLI's timer that
    raises a swallowed interrupt again is disarmed, so a long clean-up is not interrupted itself."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


_WORKER_ERROR = re.compile(r"medwsol\.errors\.(\w+): ")
_CHAINED = ("\n\nThe above exception", " The above exception", "\n\nDuring handling", " During handling")


def _from_worker_text(text: str) -> MedwsolError | None:
    """The last ``medwsol.errors.X: message`` in a traceback copied as text (DataLoader workers)."""
    found = list(_WORKER_ERROR.finditer(text))
    if not found:
        return None
    m = found[-1]
    msg = text[m.end():]
    for stop in _CHAINED:
        msg = msg.split(stop, 1)[0]
    msg = msg.strip().splitlines()[0] if msg.strip() else ""
    cls = globals().get(m.group(1))
    cls = cls if isinstance(cls, type) and issubclass(cls, MedwsolError) else MedwsolError
    return cls(msg.strip()) if msg.strip() else None


def user_error(err: BaseException) -> MedwsolError | None:
    """The ``MedwsolError`` behind ``err``, if any: itself, one in its cause/context chain, or
    one re-raised from a worker (MONAI wraps transform errors in ``RuntimeError``; a DataLoader
    worker re-raises its exception with the worker's traceback as text).

    Example:
        >>> from medwsol.errors import DataError, user_error
        >>> try:
        ...     try:
        ...         raise DataError("a.png: truncated; fix: re-export it")
        ...     except DataError as e:
        ...         raise RuntimeError("applying transform LoadImaged") from e
        ... except RuntimeError as outer:
        ...     str(user_error(outer))
        'a.png: truncated; fix: re-export it'
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MedwsolError) and "Original Traceback" not in str(e):
            return e
        found = _from_worker_text(str(e)) if "Traceback" in str(e) else None
        if found is not None:
            return found
        e = e.__cause__ or e.__context__
    return None


def one_line(err: BaseException | str, limit: int = 2000) -> str:
    """A message on one line: worker tracebacks reduced to their last line, newlines joined."""
    if isinstance(err, BaseException):
        inner = user_error(err)
        text = str(inner) if inner is not None else str(err).strip()
        if inner is None and "Traceback" in text:
            lines = [ln for ln in text.splitlines() if ln.strip()]
            text = lines[-1].strip() if lines else text
        if not text:
            text = type(err).__name__
    else:
        text = err
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"
