"""The small collectives the loop, the checkpointer and the loaders share, each a no-op without
a process group (one process) — so the same code runs under `python`, torchrun and srun."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(value)
    return value


def all_reduce_sum_started(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start summing `value` over ranks; returns the function that waits for the sum."""
    if not active():
        return lambda: value
    work = dist.all_reduce(value, async_op=True)

    def finished() -> torch.Tensor:
        work.wait()
        return value

    return finished


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def gather_objects(value: Any) -> list:
    """Every rank's `value`, in rank order."""
    if not active():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
