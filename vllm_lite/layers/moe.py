"""A mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` SwiGLU experts per
token, and the token's output is their weighted sum (plus, in Qwen2-MoE, a shared expert that
every token runs, scaled by a sigmoid gate).

Tensor parallel like the dense MLP: every rank holds a 1/tp slice of each expert's intermediate
dimension (and of the shared expert's) and the whole router, so all ranks route alike; the
partial sums of the experts and of the shared expert meet in one all-reduce.

Routing is torch ops only (softmax, topk, a division): no host synchronisation, so a decode step
with MoE layers can be captured in a CUDA graph."""

from __future__ import annotations

import torch
from torch import nn

from vllm_lite.layers.fused_moe import fused_experts
from vllm_lite.layers.linear import ReplicatedLinear, _divide
from vllm_lite.parallel_state import all_reduce, tp_rank, tp_size


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """Softmax over all experts in fp32, the ``top_k`` largest, optionally rescaled to sum to 1.
    Returns (weights [tokens, top_k] float32, expert ids [tokens, top_k])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """The experts of one layer, stacked: ``w13`` [experts, 2 x intermediate/tp, hidden] (this
    rank's gate rows, then its up rows) and ``w2`` [experts, hidden, intermediate/tp]. The
    output is this rank's partial sum: the caller reduces it."""

    PARTS = {"w13": ("gate", "up"), "w2": ("down",)}

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        n = self.intermediate = _divide(intermediate, tp_size(), "moe intermediate size")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * n, hidden, dtype=dtype), False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, n, dtype=dtype), False)
        for name, parts in self.PARTS.items():
            param = getattr(self, name)
            # (the loader calls this module's weight_loader: a bound method stored on the
            # parameter would be a reference cycle that keeps the engine's GPU memory alive)
            # what a checkpoint has not filled yet: (expert, part); the loader reports leftovers
            param.missing_shards = {(e, p) for e in range(num_experts) for p in parts}

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int | None, str]) -> None:
        """``shard_id``: (expert, part). One expert's ``gate`` or ``up`` [intermediate, hidden]
        or ``down`` [hidden, intermediate]; or, with expert None, all experts at once: ``down``
        [experts, hidden, intermediate] or ``gate_up`` [experts, 2 x intermediate, hidden]."""
        expert, part = shard_id
        n, start = self.intermediate, tp_rank() * self.intermediate
        rows = slice(start, start + n)
        if expert is None:  # a fused tensor of every expert
            if part == "down":
                param.data.copy_(torch.as_tensor(loaded[:, :, rows]))
            elif part == "gate_up":
                up = slice(n * tp_size() + start, n * tp_size() + start + n)
                param.data[:, :n].copy_(torch.as_tensor(loaded[:, rows]))
                param.data[:, n:].copy_(torch.as_tensor(loaded[:, up]))
            else:
                raise ValueError(f"no fused expert tensor {part!r}")
            experts = range(self.num_experts)
        else:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"checkpoint expert {expert}; the model has {self.num_experts}")
            if part == "down":
                param.data[expert].copy_(torch.as_tensor(loaded[:, rows]))
            else:
                offset = 0 if part == "gate" else n
                param.data[expert, offset : offset + n].copy_(torch.as_tensor(loaded[rows]))
            experts = [expert]
        for e in experts:
            for p in ("gate", "up") if part == "gate_up" else (part,):
                param.missing_shards.discard((e, p))

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        return fused_experts(hidden, self.w13, self.w2, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router (``gate``), experts, and the optional gated shared expert; one all-reduce."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, dtype)
        self.shared_expert = shared_expert  # its down projection must not reduce: we do, once
        if shared_expert is not None:
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, bias=False, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(hidden), self.top_k, self.renormalize)
        out = self.experts(hidden, weights, ids)
        if self.shared_expert is not None:
            # the sigmoid scales each token's row: it commutes with the sum over ranks
            out = out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return all_reduce(out)
