"""Data-parallel training on ``torch.distributed`` (DDP): launcher, process group, and the pieces that keep a
run with ``N`` processes equal to a one-process run with the same global batch.

``medwsol train FILE --nproc N`` starts ``N`` local processes with ``torch.distributed.run``'s elastic
agent (:func:`launch`); ``torchrun --nnodes ... -m medwsol.cli train FILE`` (several machines) starts
them itself. Each process calls :func:`init` (rank, world size and local rank from the environment
``torchrun`` sets; ``gloo`` on CPU, ``nccl`` on CUDA with device ``cuda:LOCAL_RANK``). Rank 0 alone makes
the run directory, writes checkpoints and logs, talks to MLflow, packages and registers; the others
receive the run directory from it (:meth:`Dist.broadcast`).

World-size invariance (what the trainer does with these pieces):

* ``data.batch_size`` is the **global** batch: each rank takes ``batch_size / N`` samples of the same
  seeded permutation (:class:`ShardSampler`: rank ``r`` gets positions ``r, r + N, ...``, so the ``N``
  shards of a step are exactly the one-process batch);
* random augmentation is seeded per sample from ``(seed, epoch, index)`` (:class:`SampleSeeded`), so a
  sample looks the same whichever rank (or loader worker) reads it;
* batch-norm statistics are synchronised over the ranks (``torch.nn.SyncBatchNorm`` on CUDA,
  :class:`DistBatchNorm` on CPU, where torch's has no implementation), so every layer sees the global
  batch's mean and variance;
* the loss goes through the wrapped module's ``forward`` (:class:`LossForward`), the only way DDP arms its
  gradient all-reduce; gradients are averaged over ranks, which for the per-sample means of the
  methods' losses is the global batch's gradient;
* validation images are split over the ranks and their counts merged (PxAP histograms, errors, losses).

Example:
    >>> from medwsol.engine.distributed import ShardSampler
    >>> [list(ShardSampler(8, seed=0, rank=r, world=2, batch_size=4)) for r in (0, 1)]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as tdist
from torch import nn

from medwsol.engine.runtime import cores
from medwsol.errors import ConfigError

__all__ = [
    "Dist",
    "init",
    "current",
    "shutdown",
    "env_world",
    "launch",
    "max_procs",
    "LossForward",
    "DistBatchNorm",
    "sync_batchnorm",
    "ShardSampler",
    "SampleSeeded",
    "param_digest",
    "AgreedStop",
]


class AgreedStop(SystemExit):
    """Ends a rank > 0 quietly with exit code 2 on a failure every rank saw at once (rank 0 prints the reason)."""

    def __init__(self, code: int = 2) -> None:
        super().__init__(code)


def env_world() -> tuple[int, int, int, int] | None:
    """``(rank, world, local_rank, local_world)`` from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local, local_world


@dataclass
class Dist:
    """This process's place in the group and the few collectives the trainer uses."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str
    started: bool = False  # rank 0 has shared the run directory (the trainer's first collective)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        if self.world > 1:
            tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        if self.world > 1:
            t = t.to(self.device) if self.backend == "nccl" else t
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0)


_CURRENT: Dist | None = None


def current() -> Dist | None:
    """The process group this process joined with :func:`init`, or None (one process, no torchrun)."""
    return _CURRENT


def max_procs(device: str = "auto") -> tuple[int, str]:
    """How many local processes ``--nproc`` may start, and what limits it (GPUs or CPU cores)."""
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count(), "CUDA device(s)"
    return cores(), "CPU core(s)"


def init(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun describes (``gloo`` on CPU, ``nccl`` on CUDA, ``cuda:LOCAL_RANK``)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    env = env_world()
    if env is None:
        raise ConfigError("torch.distributed: RANK/WORLD_SIZE are not set; fix: start with medwsol train --nproc N "
                          "or under torchrun")
    rank, world, local, local_world = env
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {device!r} but no CUDA device is visible; fix: use device=auto or cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"--nproc: local rank {local} but only {torch.cuda.device_count()} CUDA device(s); "
                              f"fix: --nproc {torch.cuda.device_count()} or fewer per machine")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not tdist.is_initialized():
        kw = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kw)
    _CURRENT = Dist(rank, world, local, local_world, dev, backend)
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    _CURRENT = None


def launch(argv: Sequence[str], nproc: int, threads: int | None = None) -> int:
    """Run ``python -m medwsol.cli ARGV`` in ``nproc`` local processes under torch's elastic agent.

    This is ``torchrun --standalone --nproc-per-node N -m medwsol.cli ARGV`` in-process, so that a failure
    is the failing rank's own one-line message and exit code instead of the agent's traceback.

    Returns:
        0, or the exit code of the first rank that failed.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api", "torch.distributed.launcher.api",
                 "torch.distributed.elastic.rendezvous"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the agent would set 1 and say so
    os.environ.setdefault("MEDWSOL_LAUNCHED", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=int(nproc), run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", rdzv_configs={"rank": 0},
                          max_restarts=0, monitor_interval=0.2, start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "medwsol.cli", *argv)
    except ChildFailedError as err:
        codes = [f.exitcode for _, f in sorted(err.failures.items()) if f.exitcode not in (None, 0)]
        positive = [c for c in codes if c > 0]
        return positive[0] if positive else (128 - codes[0] if codes else 1)
    return 0


class LossForward(nn.Module):
    """``forward(batch) = method.loss(batch)``: DDP arms its gradient all-reduce in the wrapped forward."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.method.loss(batch)


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the whole global batch on CPU/gloo (torch's ``SyncBatchNorm`` is CUDA-only).

    In training mode the per-channel sum and the sum of squared deviations are all-reduced with
    ``torch.distributed.nn.functional.all_reduce`` (differentiable: its backward all-reduces the
    gradients, as ``SyncBatchNorm`` does), two passes for the variance as in ``BatchNorm``; running
    statistics are updated from the global mean and unbiased variance. Same parameters and buffers as
    ``BatchNorm2d``, so checkpoints are interchangeable. Eval mode is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        packed = all_reduce(torch.cat([xf.sum(dims), n_local]))
        n = packed[-1]
        mean = packed[:-1] / n
        dev = xf - mean.view(shape)
        var = all_reduce(dev.pow(2).sum(dims)) / n
        y = dev * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every ``BatchNorm`` of ``module`` synchronised over the ranks (``SyncBatchNorm`` on CUDA, else
    :class:`DistBatchNorm`), with the same parameters and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def convert(m: nn.Module) -> nn.Module:
        out = m
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, DistBatchNorm):
            out = DistBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            with torch.no_grad():
                if m.affine:
                    out.weight = m.weight
                    out.bias = m.bias
                if m.track_running_stats:
                    out.running_mean = m.running_mean
                    out.running_var = m.running_var
                    out.num_batches_tracked = m.num_batches_tracked
            out.train(m.training)
        for name, child in m.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(module)


class ShardSampler(torch.utils.data.Sampler):
    """One seeded permutation for every world size; rank ``r`` of ``N`` takes positions ``r, r + N, ...``.

    With ``drop_last`` the permutation is cut to whole global batches first (as a one-process loader with
    ``drop_last`` does), so step ``k`` of every rank, together, is positions ``[k B, (k + 1) B)``.

    Args:
        n: dataset size.
        seed: seed of this epoch's permutation.
        rank, world: this process and the number of processes.
        batch_size: the global batch.
        drop_last: drop the last incomplete global batch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, batch_size: int = 1,
                 drop_last: bool = False) -> None:
        self.n, self.seed, self.rank, self.world = int(n), int(seed), int(rank), int(world)
        self.batch_size, self.drop_last = int(batch_size), bool(drop_last)

    def _order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        perm = torch.randperm(self.n, generator=g).tolist()
        if self.drop_last and self.n >= self.batch_size:
            perm = perm[: (self.n // self.batch_size) * self.batch_size]
        return perm[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())


class SampleSeeded(torch.utils.data.Dataset):
    """A dataset whose random transforms are seeded per sample from ``(seed, index)``.

    Whatever process or loader worker reads sample ``i`` in an epoch, it gets the same augmentation,
    so the world size and ``data.num_workers`` never change what the model sees.

    Args:
        dataset: a MONAI dataset with a ``transform`` (a ``Compose``).
        seed: the epoch's seed (:meth:`set_seed` each epoch).
    """

    def __init__(self, dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        t = getattr(self.dataset, "transform", None)
        if t is not None and hasattr(t, "set_random_state"):
            h = hashlib.blake2b(f"{self.seed}:{int(i)}".encode(), digest_size=4).digest()
            t.set_random_state(seed=int.from_bytes(h, "little"))
        return self.dataset[i]


def param_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, bytes): equal on ranks that hold equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.float().numpy().tobytes())
    return h.hexdigest()
