"""What the trainer needs of torch.distributed: this process's rank, and sums across ranks."""

from __future__ import annotations

from typing import Tuple

import torch.distributed as dist
from torch import Tensor

__all__ = ["all_min", "all_sum", "world"]


def world() -> Tuple[int, int]:
    """(rank, world size): (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_min(x: Tensor) -> Tensor:
    """The minimum of ``x`` over every rank (``x`` itself in a single process)."""
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def all_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over every rank (``x`` itself, uncopied, in a single process)."""
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x
