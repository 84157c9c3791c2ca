"""Files in and out: atomic writes (a failure never leaves a half-written output behind), output
locations checked before any work, and text files read with errors that name them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_text",
    "write_json",
    "writable_problem",
    "ensure_writable",
    "read_text_file",
    "read_json_file",
    "read_csv_table",
    "decode_text",
]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary name keeps the target's suffix so writers that look at the
    extension (PIL, tifffile, SimpleITK) keep working. On error it is removed.

    Example:
        >>> from medwsol.io import atomic_path
        >>> with atomic_path("/tmp/medwsol_example.txt") as tmp:
        ...     _ = tmp.write_text("hello")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(target.suffixes)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{sfx}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it replaces ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are meant to be shared like any folder
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON (indented, sorted keys) atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _nearest_existing(p: Path) -> Path:
    q = p
    while True:
        try:
            if q.exists() or q.is_symlink():
                return q
        except OSError:  # e.g. a name too long for the file system
            pass
        if q.parent == q:
            return q
        q = q.parent


def writable_problem(path: str | os.PathLike[str], kind: str = "dir") -> str | None:
    """Why ``path`` cannot be written as a folder (``kind="dir"``) or a file (``"file"``), or None.

    Nothing is left behind: the check looks at the path, walks up to the nearest existing folder,
    and creates (then removes) a temporary entry there, which also catches read-only and
    pseudo file systems where permission bits say yes.

    Example:
        >>> from medwsol.io import writable_problem
        >>> writable_problem("/tmp/medwsol_doc/out") is None
        True
        >>> writable_problem("/proc/version/out")
        "cannot create it: '/proc/version' is a file, not a folder"
    """
    p = Path(os.path.abspath(os.fspath(path)))
    if "\x00" in str(p):
        return "the path holds a NUL character"
    try:
        if kind == "dir" and p.exists() and not p.is_dir():
            return "it is a file, not a folder"
        if kind == "file" and p.is_dir():
            return "it is a folder, not a file"
    except OSError as err:
        return f"cannot use it ({err.strerror or err})"
    base = _nearest_existing(p.parent if kind == "file" else p)
    if base.exists() and not base.is_dir():
        return f"cannot create it: {str(base)!r} is a file, not a folder"
    if not base.exists():
        return f"cannot create it: {str(base)!r} does not exist"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot write into {str(base)!r} (permission denied)"
    try:
        probe = tempfile.mkdtemp(prefix=".medwsol-write-check.", dir=base)
        os.rmdir(probe)
    except OSError as err:
        return f"cannot write into {str(base)!r} ({err.strerror or err})"
    return None


def ensure_writable(path: str | os.PathLike[str], label: str, kind: str = "dir", fix: str | None = None) -> None:
    """Raise a one-line ``ConfigError`` naming ``label`` when ``path`` cannot be written.

    Args:
        path: the output folder (``kind="dir"``) or file (``kind="file"``).
        label: what the user wrote it as, e.g. ``--out`` or ``run_root``.
        kind: ``"dir"`` or ``"file"``.
        fix: the fix (default: choose another location).
    """
    from medwsol.errors import ConfigError

    problem = writable_problem(path, kind)
    if problem is not None:
        raise ConfigError(f"{label} {str(path)!r}: {problem}; fix: {fix or 'choose a writable location'}")


def read_text_file(
    path: str | os.PathLike[str], what: str = "file", max_bytes: int | None = None, error: type | None = None
) -> str:
    """A UTF-8 text file's content (a BOM is accepted); any failure is one ``DataError`` naming it.

    Args:
        path: the file.
        what: what it is, for the message (``"GeoJSON"``, ``"manifest"``...).
        max_bytes: refuse larger files (None: no limit).
        error: the ``MedwsolError`` class to raise (default ``DataError``).

    Example:
        >>> from medwsol.io import read_text_file
        >>> read_text_file("/nonexistent.json", "meta.json")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        medwsol.errors.DataError: /nonexistent.json: meta.json not found; fix: check the path
    """
    from medwsol.errors import DataError

    DataError = error or DataError  # noqa: N806 - the class raised below
    p = Path(path)
    try:
        if p.is_dir():
            raise DataError(f"{p}: is a folder, not a {what}; fix: give the {what} itself")
        size = p.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DataError(f"{p}: {what} is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:g} MB limit; "
                            f"fix: give the right file")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: {what} not found; fix: check the path") from None
    except OSError as err:
        raise DataError(f"{p}: cannot read the {what} ({err.strerror or err}); fix: check the path and its "
                        "permissions") from None
    return decode_text(raw, p, what, error=DataError)


def decode_text(raw: bytes, path: str | os.PathLike[str], what: str = "file", error: type | None = None) -> str:
    """UTF-8 (optionally with a BOM) bytes as text; anything else is a one-line ``DataError``."""
    from medwsol.errors import DataError

    DataError = error or DataError  # noqa: N806

    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = raw[err.start : err.start + 1].hex()
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: the {what} is not UTF-8 text (byte 0x{bad} on line {line}); "
                        "fix: save it as UTF-8") from None


def read_json_file(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """Parse a UTF-8 JSON file (``.gz`` is decompressed); any failure is one ``DataError`` naming it."""
    import gzip
    import zlib

    from medwsol.errors import DataError

    p = Path(path)
    if p.suffix == ".gz":
        try:
            raw = gzip.decompress(p.read_bytes())
        except FileNotFoundError:
            raise DataError(f"{p}: {what} not found; fix: check the path") from None
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{p}: not a readable gzip file ({one_reason(err)}); fix: re-export it") from None
        text = decode_text(raw, p, what)
    else:
        text = read_text_file(p, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{p}: not valid JSON ({one_reason(err)}); fix: re-export or restore the {what}") from None


def one_reason(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when empty), shortened."""
    text = str(err).strip()
    return (text.splitlines()[0][:limit] if text else type(err).__name__)


def read_csv_table(
    path: str | os.PathLike[str],
    what: str = "CSV file",
    error: type | None = None,
    raw: bytes | None = None,
    empty_fix: str = "add a header line and one row per item",
):
    """A UTF-8 CSV file as a pandas DataFrame of strings (empty cells ``""``, column names stripped).

    Every way a table can be unreadable is one line naming the file: missing, a folder, not UTF-8, NUL
    bytes, empty, a header naming a column twice, rows pandas cannot parse.

    Args:
        path: the file.
        what: what it is, for the messages (``"manifest"``, ``"slides.csv"``).
        error: the ``MedwsolError`` class to raise (default ``DataError``).
        raw: the file's bytes when already read.
        empty_fix: the fix for an empty file.
    """
    import csv
    import io as _io

    import pandas as pd

    from medwsol.errors import DataError

    Error = error or DataError  # noqa: N806
    p = Path(path)
    if raw is None:
        try:
            if not p.is_file():
                raise Error(f"{p}: {'is a folder, not a ' + what if p.is_dir() else what + ' not found'}; "
                            "fix: check the path")
            raw = p.read_bytes()
        except OSError as err:
            raise Error(f"{p}: cannot read the {what} ({err.strerror or err}); fix: check the path") from None
    text = decode_text(raw, p, what, error=Error)
    if "\x00" in text:
        raise Error(f"{p}: not a text CSV (it holds NUL bytes); fix: save the {what} as comma-separated UTF-8")
    try:
        header = [c.strip() for c in next(csv.reader(_io.StringIO(text)), [])]
    except csv.Error as err:
        raise Error(f"{p}: not a readable CSV ({err}); fix: save the {what} as comma-separated UTF-8") from None
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        shown = ", ".join(repr(c[:40]) for c in dup)
        raise Error(f"{p}: column{'s' if len(dup) > 1 else ''} {shown} repeated in the header; fix: name each "
                    "column once")
    try:
        df = pd.read_csv(_io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise Error(f"{p}: the {what} is empty; fix: {empty_fix}") from None
    except (pd.errors.ParserError, ValueError, csv.Error) as err:
        msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise Error(f"{p}: not a readable CSV ({msg}); fix: save the {what} as comma-separated UTF-8") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df.fillna("")
