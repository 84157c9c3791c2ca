"""Device, precision and seeding helpers shared by training, evaluation and slide inference."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from medwsol.errors import ConfigError

__all__ = ["select_device", "autocast", "amp_dtype", "seed_everything", "set_threads", "to_device", "cores"]


def cores() -> int:
    """CPU cores this process may use (``sched_getaffinity``: a container's or ``taskset``'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} but no CUDA device is visible; fix: use device=auto or cpu")
    return dev


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for a device and the ``train.amp`` setting (None = full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs CUDA; fix: use bf16 on CPU or amp=off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` when a dtype is given, else nothing."""
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (and MONAI's global state when it is imported)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Move the tensors of a batch dict to ``device`` (non-blocking from pinned memory)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.as_tensor() if hasattr(v, "as_tensor") else v  # MetaTensor -> Tensor
            v = v.to(device, non_blocking=True)
            if channels_last and k == "image" and v.ndim == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out
