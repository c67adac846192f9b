"""Tensor-parallel state of this process: its rank, the group size, and the two collectives the
model needs. With one rank every collective is a no-op."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

_RANK = 0
_SIZE = 1
# on CUDA, all-reduces up to this size go through a buffer every rank maps (torch's symmetric
# memory, NVLink peer access): one kernel that reads the peers' copies and sums them ("one
# shot"), where NCCL's ring takes several latency-bound hops (24-31 us for a decode step's
# 4-2,000 KB on 2-4 H100s); larger ones, and other dtypes, use NCCL
SYMMETRIC_BYTES = 4 << 20
_SYMMETRIC: tuple[torch.Tensor, str] | None = None  # (this rank's buffer, the group's name)


def set_tp(rank: int, size: int) -> None:
    global _RANK, _SIZE
    _RANK, _SIZE = rank, size


def tp_rank() -> int:
    return _RANK


def tp_size() -> int:
    return _SIZE


def init_symmetric_all_reduce(device: torch.device, dtype: torch.dtype) -> bool:
    """Map a symmetric buffer of ``dtype`` on every rank of the default group; every rank calls
    this at the same point (a collective). Returns whether small all-reduces use it."""
    global _SYMMETRIC
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32):
        return False
    try:
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD.group_name
        buffer = symm_mem.empty(SYMMETRIC_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group)
    except (ImportError, AttributeError, RuntimeError) as e:
        warnings.warn(f"symmetric-memory all-reduce unavailable, NCCL for all of them: {e}", stacklevel=2)
        return False
    _SYMMETRIC = (buffer, group)
    return True


def close_symmetric_all_reduce() -> None:
    global _SYMMETRIC
    _SYMMETRIC = None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place."""
    if _SIZE == 1:
        return x
    if _SYMMETRIC is not None:
        buffer, group = _SYMMETRIC
        if x.dtype == buffer.dtype and x.numel() <= buffer.numel() and x.is_contiguous():
            buffer[:x.numel()].copy_(x.view(-1))
            torch.ops.symm_mem.one_shot_all_reduce_out(buffer[:x.numel()], "sum", group, x.view(-1))
            return x
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
