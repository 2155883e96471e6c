"""Multi-process data-parallel training: the helpers :func:`pushforward.train.fit` uses when it
runs under ``torchrun``.

``torchrun`` starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in each; with ``WORLD_SIZE > 1`` :func:`~pushforward.train.fit` joins the
process group (``gloo`` for a flow on the CPU, ``nccl`` for one on a GPU), wraps the flow in
:class:`torch.nn.parallel.DistributedDataParallel` and gives every rank its share of each global
batch. Only rank 0 shows progress and writes checkpoints; the command line also lets only rank 0
save the model, metrics and plots. For example, two CPU processes on one machine::

    torchrun --standalone --nproc_per_node 2 -m pushforward fit moons --batch-size 512

Nothing here runs at import; outside ``torchrun`` every helper describes a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .core import PushforwardError

__all__ = ["World", "world", "join", "leave", "is_main"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    def shard(self, rows: int) -> tuple[int, int]:
        """The ``[start, stop)`` rows of ``rows`` that are this rank's (contiguous, sizes
        differing by at most one)."""
        base, extra = divmod(rows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over all ranks (in place; ``t`` itself outside ``torchrun``)."""
        if self.distributed:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise PushforwardError(
            f"environment variable {name} must be an integer, got {value!r}"
        ) from None


def world() -> World:
    """This process's rank and the number of processes, from ``torchrun``'s environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a single process outside it."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise PushforwardError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={size}")
    return World(rank, size, local)


def is_main() -> bool:
    """Whether this process is rank 0 (always true outside ``torchrun``)."""
    return world().main


def join(device: torch.device) -> tuple[World, bool]:
    """Join the process group of a ``torchrun`` launch (``gloo`` on the CPU, ``nccl`` on
    CUDA) if there is one and it is not joined yet.

    Returns:
        The :class:`World` and whether this call created the group (and so must
        :func:`leave` it).
    """
    w = world()
    if not w.distributed:
        return w, False
    dist = torch.distributed
    if not dist.is_available():
        raise PushforwardError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        if dist.get_world_size() != w.size:
            raise PushforwardError(
                f"the process group has {dist.get_world_size()} processes, WORLD_SIZE says {w.size}"
            )
        return w, False
    if device.type == "cuda":
        if (device.index or 0) != w.local_rank:
            raise PushforwardError(
                f"under torchrun each process trains on its own GPU: rank {w.rank} (local rank "
                f"{w.local_rank}) needs the flow on cuda:{w.local_rank}, it is on {device}"
            )
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        if not dist.is_gloo_available():
            raise PushforwardError("multi-process training on the CPU needs torch's gloo backend")
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return w, True


def leave(created: bool) -> None:
    """Wait for every rank, then leave the process group if :func:`join` created it."""
    dist = torch.distributed
    if created and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
