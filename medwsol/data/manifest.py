"""Manifests: the CSV that lists a dataset's images, masks, labels, splits and groups.

A manifest has at least the columns ``image, mask, label, split, group`` and
optionally ``valpx``:

- ``image``: path of an RGB (or grey) image, relative to the manifest's folder
  (absolute paths are accepted too). PNG, BMP, JPEG, TIFF, NIfTI (``.nii``,
  ``.nii.gz``), MetaImage (``.mha``, ``.mhd``) and NRRD are read.
- ``mask``: path of the binary pixel mask (any value > 0 is foreground), same
  width and height as the image; empty when the image has no pixel mask.
- ``label``: the image-level class, one of ``data.classes``.
- ``split``: ``train``, ``valid`` or ``test`` (empty on every row lets
  :func:`assign_splits` choose them).
- ``group``: images of one group (e.g. one patient) never straddle two splits;
  an empty group makes the image its own group.
- ``valpx``: 1 marks the few pixel-labelled validation images used to choose the
  threshold (a subset of ``valid`` with masks); 0 or empty otherwise.

NIfTI/MetaImage/NRRD files follow the ITK convention: the first array axis is
x (the image width), as SimpleITK, ITK-SNAP and 3D Slicer write them.

Example:
    >>> from medwsol.data.manifest import load_manifest, split_records
    >>> df = load_manifest("data/manifest.csv", ["benign", "malignant"])  # doctest: +SKIP
    >>> split_records(df, "train")[0]  # doctest: +SKIP
    {'image': '/abs/data/images/img_000.png', 'mask': '/abs/data/masks/img_000.png', 'label': 0, 'name': 'img_000'}
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from medwsol.errors import DataError, ManifestError
from medwsol.io import atomic_path

__all__ = [
    "REQUIRED_COLUMNS",
    "SPLITS",
    "IMAGE_SUFFIXES",
    "load_manifest",
    "cached_manifests",
    "assign_splits",
    "write_manifest",
    "split_records",
    "image_size",
    "image_stem",
]

REQUIRED_COLUMNS = ("image", "mask", "label", "split", "group")
SPLITS = ("train", "valid", "test")
#: Suffixes read by each backend (lower case).
PIL_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd")
IMAGE_SUFFIXES = PIL_SUFFIXES + NIFTI_SUFFIXES + SITK_SUFFIXES
#: Columns that load_manifest derives; never written back.
DERIVED_COLUMNS = ("image_path", "mask_path", "label_idx")
MAX_LISTED = 10
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}

_FIXES = {
    "columns": "add the missing columns (mask and group may hold empty values)",
    "file": "paths are relative to the manifest's folder; correct them or add the files",
    "format": f"use one of {', '.join(IMAGE_SUFFIXES)}",
    "unreadable": "re-export the unreadable files (e.g. as PNG)",
    "label": "use a class listed in data.classes or add it there",
    "duplicate": "list each image once",
    "size": "masks must have their image's width and height",
    "split": "split is train, valid or test (or empty on every row so that prepare assigns it)",
    "valpx": "valpx is 0 or 1, and 1 only on valid rows that have a mask",
    "empty": "give every line an image path",
}


def _suffix(path: str | os.PathLike[str]) -> str:
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def image_stem(path: str | os.PathLike[str]) -> str:
    """File name without its suffix (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    sfx = _suffix(name)
    return name[: len(name) - len(sfx)] if sfx else name


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Width and height of a 2-D image, from its header only.

    PIL reads PNG/BMP/JPEG/TIFF, nibabel NIfTI and SimpleITK MetaImage/NRRD
    (first axis = x). A trailing singleton third axis is accepted.

    Args:
        path: the image file.

    Returns:
        ``(width, height)`` in pixels.

    Raises:
        DataError: the format is unknown, the file unreadable or not 2-D.

    Example:
        >>> from medwsol.data.manifest import image_size
        >>> image_size("data/images/img_000.png")  # doctest: +SKIP
        (192, 192)
    """
    p = Path(path)
    sfx = _suffix(p)
    try:
        if sfx in PIL_SUFFIXES:
            from PIL import Image

            with Image.open(p) as im:
                return int(im.size[0]), int(im.size[1])
        if sfx in NIFTI_SUFFIXES:
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(str(p)).shape)
        elif sfx in SITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            reader.ReadImageInformation()
            shape = tuple(int(s) for s in reader.GetSize())
        else:
            raise DataError(f"{p}: unsupported image format {sfx or '(none)'}; fix: {_FIXES['format']}")
    except DataError:
        raise
    except Exception as err:  # PIL/nibabel/SimpleITK raise many types
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{p}: cannot read the image header ({msg}); fix: {_FIXES['unreadable']}") from None
    if len(shape) < 2 or (sfx in SITK_SUFFIXES and len(shape) > 2 and any(s != 1 for s in shape[2:])):
        raise DataError(f"{p}: not a 2-D image (shape {shape}); fix: give one 2-D slice per file")
    return shape[0], shape[1]


def _parse_valpx(value: str) -> int | None:
    v = value.strip().lower()
    if v in _TRUE or v == "1.0":
        return 1
    if v in _FALSE or v == "0.0":
        return 0
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if not path.is_file():
            what = "is a folder, not a manifest" if path.is_dir() else "manifest not found"
            raise ManifestError(f"{path}: {what}; fix: run the prepare stage or check data.manifest")
        return path.read_bytes()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read the manifest ({err.strerror or err}); fix: check data.manifest") from None


def _read_csv(path: Path, raw: bytes | None = None) -> pd.DataFrame:
    from medwsol.io import read_csv_table

    if raw is None:
        raw = _read_bytes(path)
    df = read_csv_table(path, "manifest", ManifestError, raw=raw,
                        empty_fix=f"add a header line {', '.join(REQUIRED_COLUMNS)}")
    return df.apply(lambda col: col.astype(str).str.strip()) if len(df) else df


def _q(value: Any, limit: int = 80) -> str:
    """A value quoted for a message, shortened (a manifest cell can be any length)."""
    text = str(value)
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _resolve(folder: Path, rel: str) -> Path:
    p = Path(rel).expanduser() if rel.startswith("~") else Path(rel)
    return Path(os.path.normpath(p if p.is_absolute() else folder / p))


def _path_problem(p: Path) -> str | None:
    """Why a listed path cannot be used as a file name at all (NUL byte, name too long), else None."""
    text = str(p)
    if "\x00" in text:
        return "holds a NUL character"
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as err:
        return str(err)
    except OSError as err:
        if err.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            return err.strerror or str(err)
    return None


#: Active caches of :func:`cached_manifests` (load_manifest results by path, content digest, classes,
#: require_split).
_CACHE: list[dict[tuple, pd.DataFrame]] = []


def load_manifest(path: str | os.PathLike[str], classes: list[str], require_split: bool = True) -> pd.DataFrame:
    """Read and validate a manifest; report every problem at once.

    Checks: required columns; image and mask files exist and their headers are
    readable; labels are in ``classes``; no image is listed twice; each mask has
    its image's width and height; split values are train/valid/test (all empty
    is allowed when ``require_split`` is False); ``valpx`` is 0/1 and only set on
    ``valid`` rows with a mask.

    Args:
        path: the manifest CSV.
        classes: the class names (``data.classes``); ``label_idx`` is the index here.
        require_split: when False, the split column may be missing or empty on
            every row (the caller then runs :func:`assign_splits`).

    Returns:
        The manifest with values stripped, ``split`` ("" when absent), ``group``
        (the image's stem when empty), and the added columns ``image_path``
        (absolute, str), ``mask_path`` (absolute str or None), ``label_idx``
        (int) and ``valpx`` (int 0/1).

    Raises:
        DataError: one line naming the manifest, the number of problems, up to
            10 of them (with CSV line numbers) and the fixes.

    Example:
        >>> from medwsol.data.manifest import load_manifest
        >>> df = load_manifest("data/manifest.csv", ["benign", "malignant"])  # doctest: +SKIP
        >>> df[["image_path", "label_idx", "split"]].head(1)  # doctest: +SKIP
    """
    import hashlib

    path = Path(path)
    raw = _read_bytes(path)
    cache = _CACHE[-1] if _CACHE else None
    key = (str(path.resolve()), hashlib.sha1(raw).hexdigest(), tuple(classes), bool(require_split))
    if cache is not None and key in cache:
        return cache[key].copy()
    out = _load_manifest(path, raw, list(classes), require_split)
    if cache is not None:
        cache[key] = out.copy()
    return out


@contextlib.contextmanager
def cached_manifests() -> Iterator[None]:
    """Within this block, :func:`load_manifest` reads each (unchanged) manifest and its images' headers once.

    The pipeline checks the manifest before a run starts and the stages read it again: this makes the
    second read free. Outside such a block every call reads the files again.
    """
    _CACHE.append({})
    try:
        yield
    finally:
        _CACHE.pop()


def _load_manifest(path: Path, raw: bytes, classes: list[str], require_split: bool) -> pd.DataFrame:
    df = _read_csv(path, raw)
    folder = path.parent.resolve()
    problems: list[tuple[str, str]] = []  # (message, fix key)

    required = [c for c in REQUIRED_COLUMNS if require_split or c != "split"]
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append((f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}", "columns"))
    elif len(df) == 0:
        problems.append(("no image is listed", "empty"))
    for col in REQUIRED_COLUMNS + ("valpx",):
        if col not in df.columns:
            df[col] = ""
    df = df.reset_index(drop=True)

    # split: all-or-nothing
    split = df["split"]
    empty_split = split == ""
    if len(df) and empty_split.any() and (require_split or not empty_split.all()):
        lines = [str(i + 2) for i in np.flatnonzero(empty_split.to_numpy())]
        shown = ", ".join(lines[:5]) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
        if "split" not in missing:
            problems.append((f"split is empty on line{'s' if len(lines) > 1 else ''} {shown}", "split"))

    image_paths: list[str | None] = []
    mask_paths: list[str | None] = []
    label_idx: list[int] = []
    valpx: list[int] = []
    seen: dict[str, int] = {}
    for i, row in df.iterrows():
        line = f"line {int(i) + 2}"  # header is line 1
        img_rel, mask_rel, label = row["image"], row["mask"], row["label"]
        img_size = None
        img_p: Path | None = None
        if img_rel == "":
            if "image" not in missing:
                problems.append((f"{line} image is empty", "empty"))
        else:
            img_p = _resolve(folder, img_rel)
            bad = _path_problem(img_p)
            if bad is not None:
                problems.append((f"{line} image {_q(img_rel)}: unusable path ({bad})", "file"))
                img_p = None
            else:
                key = str(img_p.resolve()) if img_p.exists() else str(img_p)
                if key in seen:
                    problems.append((f"{line} image {_q(img_rel)} already listed on line {seen[key]}", "duplicate"))
                else:
                    seen[key] = int(i) + 2
                img_size = _check_file(img_p, img_rel, line, "image", problems)
        image_paths.append(str(img_p) if img_p is not None else None)

        mask_p: Path | None = None
        if mask_rel != "":
            mask_p = _resolve(folder, mask_rel)
            bad = _path_problem(mask_p)
            if bad is not None:
                problems.append((f"{line} mask {_q(mask_rel)}: unusable path ({bad})", "file"))
                mask_p, mask_size = None, None
            else:
                mask_size = _check_file(mask_p, mask_rel, line, "mask", problems)
            if img_size is not None and mask_size is not None and mask_size != img_size:
                problems.append(
                    (f"{line} mask {_q(mask_rel)} is {mask_size[0]}x{mask_size[1]} but its image is "
                     f"{img_size[0]}x{img_size[1]}", "size")
                )
        mask_paths.append(str(mask_p) if mask_p is not None else None)

        if label in classes:
            label_idx.append(classes.index(label))
        else:
            label_idx.append(-1)
            if "label" not in missing:
                problems.append((f"{line} label {_q(label)} not in data.classes [{', '.join(classes)}]", "label"))

        if row["split"] not in SPLITS and row["split"] != "":
            problems.append((f"{line} split {_q(row['split'])} is not one of {', '.join(SPLITS)}", "split"))

        v = _parse_valpx(row["valpx"])
        if v is None:
            problems.append((f"{line} valpx {_q(row['valpx'])} is not 0 or 1", "valpx"))
            v = 0
        elif v == 1 and row["split"] != "valid" and not empty_split.all():
            problems.append((f"{line} valpx is 1 on a {row['split'] or 'split-less'} row (only valid rows)", "valpx"))
        elif v == 1 and mask_rel == "":
            problems.append((f"{line} valpx is 1 but the row has no mask", "valpx"))
        valpx.append(v)

    if problems:
        _raise(path, problems)

    out = df.copy()
    out["group"] = [g if g != "" else image_stem(im) for g, im in zip(out["group"], out["image"])]
    out["image_path"] = image_paths
    out["mask_path"] = pd.Series(mask_paths, index=out.index, dtype=object)
    out["label_idx"] = np.asarray(label_idx, dtype=np.int64)
    out["valpx"] = np.asarray(valpx, dtype=np.int64)
    return out


def _check_file(p: Path, rel: str, line: str, what: str, problems: list[tuple[str, str]]) -> tuple[int, int] | None:
    if _suffix(p) not in IMAGE_SUFFIXES:
        problems.append((f"{line} {what} {_q(rel)} has an unsupported format", "format"))
        return None
    if not p.is_file():
        problems.append((f"{line} {what} {_q(rel)} not found", "file"))
        return None
    try:
        return image_size(p)
    except DataError as err:
        reason = str(err).split(": ", 1)[-1].split("; fix:")[0]
        problems.append((f"{line} {what} {_q(rel)}: {reason}", "unreadable"))
        return None


def _raise(path: Path, problems: list[tuple[str, str]]) -> None:
    n = len(problems)
    listed = "; ".join(m for m, _ in problems[:MAX_LISTED])
    if n > MAX_LISTED:
        listed += f"; and {n - MAX_LISTED} more"
    fixes = list(dict.fromkeys(_FIXES[k] for _, k in problems))
    raise ManifestError(f"{path}: {n} problem{'s' if n > 1 else ''}: {listed}; fix: {', and '.join(fixes)}")


def assign_splits(df: pd.DataFrame, seed: int = 0, n_folds: int = 5, n_valpx: int = 6) -> pd.DataFrame:
    """Choose train/valid/test splits, group-disjoint and stratified by label.

    scikit-learn's ``StratifiedGroupKFold(n_folds, shuffle=True,
    random_state=seed)`` on the labels with the ``group`` column: its first fold
    is ``test``; the same splitter on the remaining rows gives ``valid`` (first
    fold) and ``train`` (the rest). With fewer groups than folds, the number of
    folds drops to the number of groups (at least 2 are needed at each step).

    The ``valpx`` subset is then drawn from the ``valid`` rows that have a mask:
    ``n_valpx // n_classes`` per class (the remainder going to the first
    classes), picked by a ``numpy`` generator seeded with ``seed`` from the rows
    sorted by image path — so the choice is deterministic. A class with too few
    masked valid images contributes what it has.

    Args:
        df: a manifest frame (from :func:`load_manifest`, or with at least
            ``image``, ``label`` and ``group``; ``mask``/``mask_path`` tell which
            rows have masks).
        seed: seed of the fold shuffling and of the valpx choice.
        n_folds: folds of each StratifiedGroupKFold (test is ~1/n_folds of all).
        n_valpx: pixel-labelled validation images to flag.

    Returns:
        A copy with ``split`` and ``valpx`` (int 0/1) set on every row.

    Raises:
        DataError: too few groups to make three splits.

    Example:
        >>> from medwsol.data.manifest import assign_splits, load_manifest
        >>> df = load_manifest("data/manifest.csv", ["benign", "malignant"], require_split=False)  # doctest: +SKIP
        >>> assign_splits(df, seed=0)["split"].value_counts()  # doctest: +SKIP
    """
    from sklearn.model_selection import StratifiedGroupKFold

    out = df.copy().reset_index(drop=True)
    labels = out["label_idx"].to_numpy() if "label_idx" in out else pd.factorize(out["label"], sort=True)[0]
    groups = np.asarray(
        [str(g) if str(g) not in ("", "nan", "None") else image_stem(im) for g, im in zip(out["group"], out["image"])]
    )

    def first_fold(idx: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        n_groups = len(np.unique(groups[idx]))
        k = min(n_folds, n_groups)
        if k < 2:
            raise DataError(
                f"manifest: only {n_groups} group(s) left when choosing the {what} split; fix: give at least "
                "3 distinct groups (or leave group empty so each image is its own group)"
            )
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        rest, held = next(iter(splitter.split(np.zeros(len(idx)), labels[idx], groups[idx])))
        return idx[rest], idx[held]

    everything = np.arange(len(out))
    rest, test = first_fold(everything, "test")
    train, valid = first_fold(rest, "valid")
    split = np.empty(len(out), dtype=object)
    split[train], split[valid], split[test] = "train", "valid", "test"
    out["split"] = split

    if "mask_path" in out:
        has_mask = out["mask_path"].map(lambda m: m is not None and str(m) not in ("", "nan", "None")).to_numpy()
    else:
        has_mask = out["mask"].fillna("").astype(str).str.strip().ne("").to_numpy()
    valpx = np.zeros(len(out), dtype=np.int64)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    key = out["image_path"] if "image_path" in out else out["image"]
    for j, c in enumerate(classes):
        want = n_valpx // len(classes) + (1 if j < n_valpx % len(classes) else 0)
        cand = np.flatnonzero((split == "valid") & has_mask & (labels == c))
        cand = cand[np.argsort(key.to_numpy()[cand].astype(str), kind="stable")]
        if want and len(cand):
            valpx[rng.choice(cand, size=min(want, len(cand)), replace=False)] = 1
    out["valpx"] = valpx
    return out


def _relative(p: Any, folder: Path) -> str:
    if p is None or (isinstance(p, float) and np.isnan(p)) or str(p) == "":
        return ""
    q = Path(str(p))
    if not q.is_absolute():
        return q.as_posix()
    return Path(os.path.relpath(q, folder)).as_posix()


def write_manifest(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a manifest atomically, with paths relative to its folder.

    ``image``/``mask`` are rewritten from ``image_path``/``mask_path`` when
    present (so a frame loaded elsewhere is re-anchored at ``path``); the derived
    columns are not written. Column order: ``image, mask, label, split, group,
    valpx``, then any other columns.

    Args:
        df: the manifest frame.
        path: the CSV to write.

    Returns:
        ``path``.

    Example:
        >>> from medwsol.data.manifest import write_manifest
        >>> write_manifest(df, "data/manifest.csv")  # doctest: +SKIP
    """
    path = Path(path)
    folder = path.parent.resolve()
    out = df.copy()
    if "image_path" in out:
        out["image"] = [_relative(p, folder) for p in out["image_path"]]
    else:
        out["image"] = [_relative(p, folder) for p in out["image"]]
    if "mask_path" in out:
        out["mask"] = [_relative(p, folder) for p in out["mask_path"]]
    elif "mask" in out:
        out["mask"] = [_relative(p, folder) for p in out["mask"]]
    else:
        out["mask"] = ""
    for col in ("split", "group"):
        if col not in out:
            out[col] = ""
    out["valpx"] = [1 if _parse_valpx(str(v)) == 1 else 0 for v in out["valpx"]] if "valpx" in out else 0
    first = ["image", "mask", "label", "split", "group", "valpx"]
    rest = [c for c in out.columns if c not in first and c not in DERIVED_COLUMNS]
    with atomic_path(path) as tmp:
        out[first + rest].to_csv(tmp, index=False)
    return path


def split_records(df: pd.DataFrame, split: str) -> list[dict[str, Any]]:
    """MONAI data dicts of one split of a loaded manifest.

    Args:
        df: a frame from :func:`load_manifest`.
        split: ``train``, ``valid``, ``test``, ``valpx`` (rows flagged valpx) or
            ``all``.

    Returns:
        ``[{"image": abs path, "mask": abs path (only when the row has one),
        "label": label_idx, "name": image stem}, ...]`` in manifest order.

    Raises:
        DataError: an unknown split name.

    Example:
        >>> from medwsol.data.manifest import split_records
        >>> recs = split_records(df, "valpx")  # doctest: +SKIP
    """
    if split == "all":
        sel = df
    elif split == "valpx":
        sel = df[df["valpx"].astype(int) == 1]
    elif split in SPLITS:
        sel = df[df["split"] == split]
    else:
        raise DataError(f"split {split!r}: unknown split; fix: use one of {', '.join(SPLITS + ('valpx', 'all'))}")
    records = []
    for row in sel.itertuples(index=False):
        rec: dict[str, Any] = {"image": str(row.image_path)}
        m = row.mask_path
        if m is not None and not (isinstance(m, float) and np.isnan(m)) and str(m) != "":
            rec["mask"] = str(m)
        rec["label"] = int(row.label_idx)
        rec["name"] = image_stem(row.image_path)
        records.append(rec)
    return records
