"""Heatmap as a 2-D medical image: NIfTI (nibabel) or MetaImage/NRRD (SimpleITK), spacing in mm.

Both follow the ITK convention the rest of the project uses (``medwsol.data.manifest``): the first
voxel axis is x (image columns), the second y (rows); with ITK's identity direction and origin 0,
voxel ``(x, y)`` sits at ``(x * sx, y * sy)`` mm. The NIfTI affine is ``diag(-sx, -sy, 1)`` (RAS),
which is ITK's identity in LPS — so SimpleITK, ITK-SNAP and 3D Slicer read the ``.nii.gz`` and the
``.mha`` identically. Values are float32 in [0, 1]; spacing is ``heatmap_mpp / 1000`` mm.

Example:
    >>> import numpy as np
    >>> from medwsol.export.volume import write_volume
    >>> p = write_volume(np.zeros((4, 6), np.float32), "/tmp/medwsol_doc/heat.nii.gz", spacing_mm=0.008)
    >>> import nibabel as nib
    >>> nib.load(p).shape, tuple(round(float(z), 6) for z in nib.load(p).header.get_zooms())
    ((6, 4), (0.008, 0.008))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medwsol.errors import DataError
from medwsol.io import atomic_path

__all__ = ["write_volume", "read_volume", "VOLUME_SUFFIXES"]

NIFTI = (".nii", ".nii.gz")
ITK = (".mha", ".mhd", ".nrrd")
VOLUME_SUFFIXES = NIFTI + ITK


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else p.suffix.lower()


def _spacing(spacing_mm: float | Sequence[float], out: Path) -> tuple[float, float]:
    sp = (float(spacing_mm), float(spacing_mm)) if np.isscalar(spacing_mm) else tuple(float(s) for s in spacing_mm)  # type: ignore[arg-type]
    if len(sp) != 2 or not all(s > 0 and np.isfinite(s) for s in sp):
        raise DataError(f"{out}: spacing_mm must be a positive number or (sx, sy), got {spacing_mm!r}; "
                        "fix: pass heatmap_mpp / 1000")
    return sp[0], sp[1]


def write_volume(heat: Any, out_path: str | os.PathLike[str], spacing_mm: float | Sequence[float]) -> Path:
    """Write a 2-D heatmap ``[H, W]`` as NIfTI (``.nii``/``.nii.gz``) or MHA/MHD/NRRD, atomically.

    Args:
        heat: float array ``[H, W]`` (rows = y); NaN is written as 0.
        out_path: the file; its suffix picks the format.
        spacing_mm: pixel size in mm, one number or ``(sx, sy)``.

    Returns:
        The written path (an ``.mhd`` also writes its ``.raw`` beside it).

    Raises:
        DataError: unknown suffix, bad spacing, a heatmap that is not 2-D, or an unwritable folder.
    """
    out = Path(out_path)
    sfx = _suffix(out)
    if sfx not in VOLUME_SUFFIXES:
        raise DataError(f"{out}: unknown volume format {sfx!r}; fix: use one of {', '.join(VOLUME_SUFFIXES)}")
    sx, sy = _spacing(spacing_mm, out)
    a = np.nan_to_num(np.asarray(heat[:, :] if hasattr(heat, "shape") else heat, dtype=np.float32), nan=0.0)
    if a.ndim != 2:
        raise DataError(f"{out}: heatmap must be 2-D [H, W], got shape {a.shape}; fix: pass one slide's heatmap")
    try:
        if sfx in NIFTI:
            import nibabel as nib

            img = nib.Nifti1Image(np.ascontiguousarray(a.T), np.diag([-sx, -sy, 1.0, 1.0]))
            img.header.set_xyzt_units("mm")
            img.header.set_data_dtype(np.float32)
            with atomic_path(out) as tmp:
                nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            img = sitk.GetImageFromArray(a)  # array [rows, cols] -> image (x = cols, y = rows)
            img.SetSpacing((sx, sy))
            img.SetOrigin((0.0, 0.0))
            if sfx == ".mhd":  # header + .raw: written under their final names in a temp folder, then moved
                import shutil
                import tempfile

                out.parent.mkdir(parents=True, exist_ok=True)
                tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
                try:
                    sitk.WriteImage(img, str(tmpdir / out.name), useCompression=False)
                    for f in sorted(tmpdir.iterdir(), key=lambda q: q.suffix == ".mhd"):  # data first, header last
                        os.replace(f, out.parent / f.name)
                finally:
                    shutil.rmtree(tmpdir, ignore_errors=True)
            else:
                with atomic_path(out) as tmp:
                    sitk.WriteImage(img, str(tmp), useCompression=True)
    except OSError as err:
        raise DataError(f"{out}: cannot write ({err.strerror or err}); fix: make the folder writable "
                        "or choose another output folder") from None
    return out


def read_volume(path: str | os.PathLike[str]) -> tuple[np.ndarray, tuple[float, float]]:
    """Read back a 2-D volume: ``(array [H, W] float32, (sx, sy) mm)`` (SimpleITK reads every format)."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: volume file not found; fix: check the path")
    img = sitk.ReadImage(str(p))
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    sp = img.GetSpacing()
    return a.reshape(a.shape[-2:]) if a.ndim > 2 else a, (float(sp[0]), float(sp[1]))
