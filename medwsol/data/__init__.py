"""Data: manifests, dataset imports (GlaS, synthetic, slide tiles) and the MONAI data path.

Importing this package is light (no torch, MONAI or scikit-learn): the public
names below are resolved lazily from their modules on first access.

Example:
    >>> from medwsol.data import load_manifest, split_records  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # manifest.py
    "load_manifest": "medwsol.data.manifest",
    "assign_splits": "medwsol.data.manifest",
    "write_manifest": "medwsol.data.manifest",
    "split_records": "medwsol.data.manifest",
    "image_size": "medwsol.data.manifest",
    # glas.py
    "prepare_glas": "medwsol.data.glas",
    "glas_split_table": "medwsol.data.glas",
    # transforms.py
    "train_transforms": "medwsol.data.transforms",
    "eval_transforms": "medwsol.data.transforms",
    "RandHEStainJitter": "medwsol.data.transforms",
    "RandHEStainJitterd": "medwsol.data.transforms",
    # datasets.py
    "make_dataset": "medwsol.data.datasets",
    "make_loader": "medwsol.data.datasets",
    "collate_batch": "medwsol.data.datasets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
