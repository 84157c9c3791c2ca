"""GlaS (Warwick-QU, MICCAI 2015 gland segmentation challenge) -> manifest.

The dataset cannot be redistributed: the user downloads the release from the
Warwick TIA website and unzips it; :func:`prepare_glas` reads it in place
(read-only) and writes a manifest plus binary masks elsewhere. See
``data_manifests/README.md`` for the licence and citations.

The published split of the WSOL-in-histology papers (fold 0) is embedded
here (:data:`GLAS_VALID`) and mirrored in ``data_manifests/glas_split.csv``:
test = all 80 ``testA_*``/``testB_*`` images; valid = the 18 training images
of :data:`GLAS_VALID`; train = the other 67 training images.

valpx rule (pixel-labelled validation, 6 images): walk :data:`GLAS_VALID` in
its published order and keep the first 3 benign and the first 3 malignant
names (labels from ``Grade.csv``), among the names present.

Example:
    >>> from medwsol.data.glas import prepare_glas
    >>> prepare_glas("~/data/Warwick QU Dataset (Released 2016_07_08)", "data_manifests/glas.csv")  # doctest: +SKIP
    PosixPath('data_manifests/glas.csv')
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from medwsol.errors import DataError
from medwsol.io import atomic_dir

__all__ = [
    "GLAS_RELEASE_NAME",
    "GLAS_CLASSES",
    "GLAS_TRAIN",
    "GLAS_TEST",
    "GLAS_VALID",
    "GLAS_NAMES",
    "GLAS_N_VALPX_PER_CLASS",
    "glas_split_table",
    "find_glas_folder",
    "prepare_glas",
]

GLAS_RELEASE_NAME = "Warwick QU Dataset (Released 2016_07_08)"
GLAS_CLASSES = ("benign", "malignant")
#: All training images, train_1 .. train_85.
GLAS_TRAIN = tuple(f"train_{i}" for i in range(1, 86))
#: All test images, testA_1 .. testA_60 then testB_1 .. testB_20.
GLAS_TEST = tuple(f"testA_{i}" for i in range(1, 61)) + tuple(f"testB_{i}" for i in range(1, 21))
#: The 18 class-labelled validation images of the published split, in its published order.
GLAS_VALID = tuple(
    f"train_{i}" for i in (24, 54, 5, 36, 26, 77, 74, 18, 83, 68, 38, 72, 65, 51, 12, 63, 2, 52)
)
#: The 165 image names, train first.
GLAS_NAMES = GLAS_TRAIN + GLAS_TEST
#: valpx = the first 3 benign and the first 3 malignant of GLAS_VALID, in its order.
GLAS_N_VALPX_PER_CLASS = 3

_GRADE_COLUMNS = {"name": "name", "patient": "patient ID", "grade": "grade (GlaS)"}


def glas_split_table() -> pd.DataFrame:
    """The published split of all 165 names: columns ``name, split, valid_order``.

    ``valid_order`` is the 1-based position in :data:`GLAS_VALID` (empty
    elsewhere); it is what the valpx rule walks. This is the content of
    ``data_manifests/glas_split.csv``.
    """
    valid = {n: i + 1 for i, n in enumerate(GLAS_VALID)}
    rows = []
    for n in GLAS_NAMES:
        split = "test" if n.startswith("test") else ("valid" if n in valid else "train")
        rows.append({"name": n, "split": split, "valid_order": valid.get(n, pd.NA)})
    out = pd.DataFrame(rows)
    out["valid_order"] = out["valid_order"].astype("Int64")
    return out


def _split_of(name: str) -> str:
    if name in GLAS_TEST:
        return "test"
    return "valid" if name in GLAS_VALID else "train"


def find_glas_folder(root: str | os.PathLike[str]) -> Path:
    """The release folder (the one holding ``Grade.csv``): ``root`` itself or a folder up to two levels below.

    Raises:
        DataError: ``root`` is missing, or holds no (or several) ``Grade.csv``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"{root}: GlaS folder not found; fix: download the Warwick QU release from the Warwick TIA website, "
            f"unzip it and pass the '{GLAS_RELEASE_NAME}' folder (see data_manifests/README.md)"
        )
    if (root / "Grade.csv").is_file():
        return root
    found = sorted(
        p.parent
        for pattern in ("*/Grade.csv", "*/*/Grade.csv")
        for p in root.glob(pattern)
        if "__MACOSX" not in p.parts
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(
            f"{root / 'Grade.csv'}: not found (nor in a sub-folder); fix: pass the unzipped '{GLAS_RELEASE_NAME}' "
            "folder, which holds Grade.csv and the BMP images"
        )
    raise DataError(
        f"{root}: several GlaS folders ({', '.join(repr(str(f)) for f in found)}); fix: pass one of them as the root"
    )


def _read_grades(csv: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{csv}: unreadable ({msg}); fix: restore Grade.csv from the original release") from None
    df.columns = [str(c).strip() for c in df.columns]
    lower = {c.lower(): c for c in df.columns}
    missing = [want for want in _GRADE_COLUMNS.values() if want.lower() not in lower]
    if missing:
        raise DataError(
            f"{csv}: missing column(s) {', '.join(repr(m) for m in missing)} "
            f"(found {', '.join(map(repr, df.columns))}); "
            "fix: restore Grade.csv from the original release"
        )
    df = df.rename(columns={lower[v.lower()]: k for k, v in _GRADE_COLUMNS.items()})
    df = df.fillna("")
    for col in _GRADE_COLUMNS:
        df[col] = df[col].astype(str).str.strip()
    return df[list(_GRADE_COLUMNS)]


def _binary_mask(anno: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(anno) as im:
            arr = np.asarray(im)
    except Exception as err:  # PIL raises several types
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{anno}: unreadable BMP ({msg}); fix: restore the file from the original release") from None
    if arr.ndim == 3:
        arr = arr.any(axis=2)
    return (arr > 0).astype(np.uint8) * 255


def _natural_key(name: str) -> tuple[int, str, int]:
    m = re.fullmatch(r"(train|testA|testB)_(\d+)", name)
    order = {"train": 0, "testA": 1, "testB": 2}
    return (order[m.group(1)], m.group(1), int(m.group(2))) if m else (3, name, 0)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def prepare_glas(
    root: str | os.PathLike[str],
    out_manifest: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a manifest of the GlaS release with the published split.

    Reads ``Grade.csv`` (headers and values carry leading spaces; they are
    stripped), checks every ``<name>.bmp`` and ``<name>_anno.bmp``, writes each
    annotation (gland instance ids) binarised with ``> 0`` as a 0/255 PNG into
    ``masks_dir``, and writes the manifest: ``image`` (the original BMP, never
    copied), ``mask``, ``label`` = ``grade (GlaS)``, ``group`` = ``patient ID``,
    ``split`` = the published split, ``valpx`` = the first 3 benign and first 3
    malignant names of :data:`GLAS_VALID` in its published order (labels from
    Grade.csv, names present only). Nothing is written into the release folder.

    Args:
        root: the unzipped ``Warwick QU Dataset (Released 2016_07_08)`` folder,
            or a folder containing it.
        out_manifest: the manifest CSV to write (paths in it are relative to its folder).
        masks_dir: where the binary masks go (default
            ``<out_manifest folder>/glas_masks``); it is replaced as a whole, so
            it must be new, empty or a previous masks folder.

    Returns:
        ``out_manifest``.

    Raises:
        DataError: a missing or malformed ``Grade.csv``; missing or unreadable
            BMPs, unknown names or grades (all listed at once); outputs inside the
            release folder.

    Example:
        >>> from medwsol.data.glas import prepare_glas
        >>> prepare_glas("Warwick QU Dataset (Released 2016_07_08)", "data_manifests/glas.csv")  # doctest: +SKIP
        PosixPath('data_manifests/glas.csv')
    """
    from PIL import Image

    from medwsol.data.manifest import write_manifest

    folder = find_glas_folder(root)
    out_manifest = Path(out_manifest)
    masks_dir = Path(masks_dir) if masks_dir is not None else out_manifest.parent / "glas_masks"
    for what, p in (("out_manifest", out_manifest), ("masks_dir", masks_dir)):
        if _inside(p, folder):
            raise DataError(
                f"{p}: {what} is inside the GlaS release folder {str(folder)!r}; fix: write outputs elsewhere "
                "(e.g. data_manifests/glas.csv)"
            )
    if masks_dir.is_dir():
        strays = [f.name for f in masks_dir.iterdir() if not (f.suffix == ".png" and f.stem in GLAS_NAMES)]
        if strays:
            raise DataError(
                f"{masks_dir}: masks_dir holds other files ({', '.join(strays[:3])}) and would be replaced; "
                "fix: choose a new or empty folder"
            )

    grade_csv = folder / "Grade.csv"
    grades = _read_grades(grade_csv)
    problems: list[str] = []
    rows = []
    seen: set[str] = set()
    for i, g in grades.iterrows():
        name, label = g["name"], g["grade"]
        line = f"line {int(i) + 2}"
        if name in seen:
            problems.append(f"{line} {name!r} listed twice")
            continue
        seen.add(name)
        if name not in GLAS_NAMES:
            problems.append(f"{line} name {name!r} is not a GlaS image (train_1..85, testA_1..60, testB_1..20)")
            continue
        if label not in GLAS_CLASSES:
            problems.append(f"{line} grade (GlaS) {label!r} of {name} is not benign or malignant")
        image, anno = folder / f"{name}.bmp", folder / f"{name}_anno.bmp"
        for f in (image, anno):
            if not f.is_file():
                problems.append(f"{f.name} not found")
        if image.is_file():
            try:
                with Image.open(image) as im:
                    im.size  # noqa: B018 - header read
            except Exception as err:  # PIL raises several types
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                problems.append(f"{image.name} unreadable BMP ({reason})")
        rows.append({"name": name, "image_path": str(image.resolve()), "anno": anno, "label": label,
                     "group": g["patient"], "split": _split_of(name)})
    if not rows and not problems:
        problems.append("no image rows")
    if problems:
        n = len(problems)
        listed = "; ".join(problems[:10]) + (f"; and {n - 10} more" if n > 10 else "")
        raise DataError(
            f"{grade_csv}: {n} problem{'s' if n > 1 else ''}: {listed}; fix: restore the listed files from the "
            "original Warwick QU release (unzip it again)"
        )
    rows.sort(key=lambda r: _natural_key(r["name"]))

    # valpx: first 3 benign + first 3 malignant of GLAS_VALID, in its order
    label_of = {r["name"]: r["label"] for r in rows}
    valpx: set[str] = set()
    for cls in GLAS_CLASSES:
        picked = [n for n in GLAS_VALID if label_of.get(n) == cls][:GLAS_N_VALPX_PER_CLASS]
        valpx.update(picked)

    with atomic_dir(masks_dir) as tmp:
        for r in rows:
            mask = _binary_mask(r["anno"])
            with Image.open(r["image_path"]) as im:
                size = im.size
            if (mask.shape[1], mask.shape[0]) != size:
                raise DataError(
                    f"{r['anno']}: annotation is {mask.shape[1]}x{mask.shape[0]} but {r['name']}.bmp is "
                    f"{size[0]}x{size[1]}; fix: restore both files from the original release"
                )
            Image.fromarray(mask).save(tmp / f"{r['name']}.png")
    masks_final = masks_dir.resolve()
    df = pd.DataFrame(
        {
            "image_path": [r["image_path"] for r in rows],
            "mask_path": [str(masks_final / f"{r['name']}.png") for r in rows],
            "label": [r["label"] for r in rows],
            "split": [r["split"] for r in rows],
            "group": [r["group"] for r in rows],
            "valpx": [int(r["name"] in valpx) for r in rows],
        }
    )
    return write_manifest(df, out_manifest)
