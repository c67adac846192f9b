"""Linear layers that know their tensor-parallel shard. Each has a ``weight_loader(param,
loaded, shard_id=None)`` that copies just this rank's slice of a checkpoint tensor into one of
its parameters (``loaded`` may be a lazy safetensors slice, so only that slice is read). The
loader finds it through the parameter's module: a bound method stored on the parameter would
make a module -> parameter -> method -> module cycle that keeps the weights alive until the
garbage collector runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_lite.parallel_state import all_reduce, tp_rank, tp_size


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by tensor_parallel_size ({b})")
    return a // b


class _ShardedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        param.data.copy_(torch.as_tensor(loaded[:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(_ShardedLinear):
    """Every rank holds the whole weight (a mixture-of-experts router: each rank routes alike)."""


class ColumnParallelLinear(_ShardedLinear):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None) -> None:
        super().__init__(
            in_features, _divide(out_features, tp_size(), "output features"), bias, dtype
        )

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        rows = param.shape[0]
        param.data.copy_(torch.as_tensor(loaded[tp_rank() * rows : (tp_rank() + 1) * rows]))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up)."""

    def __init__(
        self, in_features: int, out_features: list[int], bias: bool = False, dtype=None
    ) -> None:
        self.shard_sizes = [_divide(n, tp_size(), "output features") for n in out_features]
        super().__init__(in_features, sum(out_features), bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        size = self.shard_sizes[shard_id]
        offset = sum(self.shard_sizes[:shard_id])
        param.data[offset : offset + size].copy_(
            torch.as_tensor(loaded[tp_rank() * size : (tp_rank() + 1) * size])
        )


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. Query heads are split across ranks; KV heads too,
    or replicated (each rank keeps the one its query heads use) when there are fewer KV heads
    than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        dtype=None,
    ) -> None:
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "number of attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "number of KV heads")
            self.kv_head_start = tp_rank() * self.num_kv_heads
        else:
            _divide(tp, num_kv_heads, "number of KV heads (replicated)")
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank() * num_kv_heads // tp
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        _ShardedLinear.__init__(self, hidden_size, out, bias, dtype)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, rows, start = 0, q_rows, tp_rank() * q_rows
        else:
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, start = kv_rows, self.kv_head_start * self.head_dim
        param.data[offset : offset + rows].copy_(torch.as_tensor(loaded[start : start + rows]))


class RowParallelLinear(_ShardedLinear):
    """Input features split across ranks; the partial outputs are summed with one all-reduce
    (``reduce=False``: left to the caller, who adds more partial sums before one reduce)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=None,
        reduce: bool = True,
    ) -> None:
        super().__init__(
            _divide(in_features, tp_size(), "input features"), out_features, bias, dtype
        )
        self.reduce = reduce

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0
            param.data.copy_(
                torch.as_tensor(loaded[:]) if tp_rank() == 0 else torch.zeros_like(param)
            )
            return
        cols = param.shape[1]
        param.data.copy_(torch.as_tensor(loaded[:, tp_rank() * cols : (tp_rank() + 1) * cols]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return all_reduce(out) if self.reduce else out
