"""Tensor-parallel state of this process: its rank, the group size, and the two collectives the
model needs. With one rank every collective is a no-op."""

from __future__ import annotations

import torch
import torch.distributed as dist

_RANK = 0
_SIZE = 1


def set_tp(rank: int, size: int) -> None:
    global _RANK, _SIZE
    _RANK, _SIZE = rank, size


def tp_rank() -> int:
    return _RANK


def tp_size() -> int:
    return _SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _SIZE > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
