"""Dataset and loader factories over MONAI data dicts.

``data.cache`` picks the dataset: ``cache`` -> MONAI ``CacheDataset`` (the
deterministic head of the transform chain is computed once, in memory),
``persistent`` -> ``PersistentDataset`` (the same, on disk under
``data.cache_dir``), ``none`` -> plain ``Dataset``. All three yield identical
samples for the same records and transforms.

Example:
    >>> from medwsol.config import DataConfig
    >>> from medwsol.data.datasets import make_dataset, make_loader
    >>> from medwsol.data.transforms import train_transforms
    >>> cfg = DataConfig(patch_size=64, cache="none")
    >>> ds = make_dataset(records, train_transforms(cfg), cfg)  # doctest: +SKIP
    >>> batch = next(iter(make_loader(ds, batch_size=4, shuffle=True, num_workers=0, seed=0)))  # doctest: +SKIP
    >>> tuple(batch["image"].shape)  # doctest: +SKIP
    (4, 3, 64, 64)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import list_data_collate, worker_init_fn

from medwsol.errors import DataError

__all__ = ["make_dataset", "make_loader", "collate_batch", "record_hash", "transform_hash"]

#: Bump when the meaning of cached samples changes without a visible change of the transforms.
CACHE_VERSION = "medwsol-data-1"


def _stat(path: Any) -> list[int] | None:
    try:
        st = os.stat(str(path))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def record_hash(item: Mapping[str, Any]) -> bytes:
    """Cache key of a record for ``PersistentDataset``: its values plus size and mtime of its files.

    So an image or mask replaced on disk is re-read instead of served stale.
    """
    desc: dict[str, Any] = {"version": CACHE_VERSION}
    for key, value in sorted(item.items(), key=lambda kv: str(kv[0])):
        desc[str(key)] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if key in ("image", "mask"):
            desc[f"{key}#stat"] = _stat(value)
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest().encode()


def _simple(v: Any) -> bool:
    if isinstance(v, (str, int, float, bool, type(None))):
        return True
    return isinstance(v, (tuple, list)) and all(_simple(x) for x in v)


def _describe(obj: Any, depth: int = 0) -> dict[str, Any]:
    from monai.transforms import Transform

    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for k, v in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else []:
        if k.startswith("_") and k != "_loader":
            continue
        if _simple(v):
            out[k] = v
        elif isinstance(v, Transform) and depth < 2:
            out[k] = _describe(v, depth + 1)
    return out


def transform_hash(transforms: Sequence[Any]) -> bytes:
    """Hash of the cached (deterministic) transforms: classes and their plain settings.

    Used as ``PersistentDataset(hash_transform=...)`` so that, e.g., a new
    ``patch_size`` does not reuse samples padded for the old one.
    """
    desc = [CACHE_VERSION] + [_describe(t) for t in transforms]
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest().encode()


def make_dataset(
    records: Sequence[Mapping[str, Any]],
    transform: Callable,
    data_cfg,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """A MONAI dataset over ``records``, cached as ``data_cfg.cache`` says.

    Args:
        records: MONAI data dicts (:func:`medwsol.data.manifest.split_records`).
        transform: the chain (:func:`medwsol.data.transforms.train_transforms` or
            ``eval_transforms``).
        data_cfg: a :class:`medwsol.config.DataConfig` (``cache``, ``cache_rate``,
            ``num_workers``, ``cache_dir``).
        cache_dir: folder for ``cache: persistent``; overrides ``data_cfg.cache_dir``.

    Returns:
        ``CacheDataset`` (``cache_rate`` of the records cached in memory, with
        ``max(1, num_workers)`` caching threads), ``PersistentDataset`` (cache on
        disk, keyed by :func:`record_hash` and :func:`transform_hash`) or ``Dataset``.

    Raises:
        DataError: ``cache: persistent`` without a cache folder.

    Example:
        >>> from medwsol.config import DataConfig
        >>> from medwsol.data.datasets import make_dataset
        >>> from medwsol.data.transforms import eval_transforms
        >>> ds = make_dataset([], eval_transforms(), DataConfig(cache="none"))
        >>> len(ds)
        0
    """
    records = [dict(r) for r in records]
    mode = data_cfg.cache
    if mode == "cache":
        return CacheDataset(
            data=records,
            transform=transform,
            cache_rate=float(data_cfg.cache_rate),
            num_workers=max(1, int(data_cfg.num_workers)),
            progress=False,
        )
    if mode == "persistent":
        folder = cache_dir if cache_dir is not None else data_cfg.cache_dir
        if folder is None:
            raise DataError(
                "data.cache_dir: not set while data.cache is 'persistent'; fix: set data.cache_dir to a folder "
                "or use data.cache: cache"
            )
        Path(folder).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(
            data=records,
            transform=transform,
            cache_dir=Path(folder),
            hash_func=record_hash,
            hash_transform=transform_hash,
        )
    if mode == "none":
        return Dataset(data=records, transform=transform)
    raise DataError(f"data.cache: unknown value {mode!r}; fix: use none, cache or persistent")


def collate_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate samples into a batch dict, keeping only the keys every sample has.

    ``image`` -> ``[B, 3, H, W]``, ``label`` -> long ``[B]``, ``mask`` ->
    ``[B, 1, H, W]`` (only when every sample has a mask), ``name`` -> list of str.
    Built on MONAI's ``list_data_collate``; samples must share their spatial size
    (training crops do; for full images of different sizes pass a padding
    collate to :func:`make_loader`).
    """
    if not items:
        return {}
    common = set(items[0].keys()).intersection(*(it.keys() for it in items[1:]))
    return list_data_collate([{k: v for k, v in it.items() if k in common} for it in items])


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    collate_fn: Callable | None = None,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A seeded MONAI ``DataLoader`` (a torch ``DataLoader`` subclass).

    Shuffling uses a ``torch.Generator`` seeded with ``seed``. Random transforms
    are seeded the MONAI way: with ``num_workers=0`` the loader seeds the
    dataset's transforms from that generator; with workers, MONAI's
    ``worker_init_fn`` seeds each worker's copy from torch's per-worker seed
    (itself drawn from the generator). Two loaders built with the same seed
    therefore yield the same batches. ``pin_memory`` only when CUDA is
    available; ``persistent_workers`` when ``num_workers > 0``.

    Args:
        dataset: e.g. from :func:`make_dataset`.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        num_workers: loader processes (0: in the main process).
        seed: seed of shuffling and augmentation.
        drop_last: drop the last incomplete batch.
        collate_fn: default :func:`collate_batch`.
        sampler: the order of the samples (then ``shuffle`` must be false), e.g. a
            :class:`medwsol.engine.distributed.ShardSampler`.

    Returns:
        Batches as dicts: ``image [B, 3, H, W]``, ``label [B]``, ``mask
        [B, 1, H, W]`` when present, ``name`` list of str.

    Example:
        >>> from medwsol.data.datasets import make_loader
        >>> loader = make_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=0)  # doctest: +SKIP
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=bool(shuffle),
        sampler=sampler,
        num_workers=int(num_workers),
        generator=generator,
        drop_last=bool(drop_last),
        collate_fn=collate_fn or collate_batch,
        worker_init_fn=worker_init_fn,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=int(num_workers) > 0,
    )
