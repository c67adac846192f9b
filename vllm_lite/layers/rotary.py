"""Rotary position embedding with HF's frequencies (default, linear, llama3, yarn, ... through
transformers' own ``ROPE_INIT_FUNCTIONS``), precomputed as a cos/sin table per position."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _default_inv_freq(config, head_dim: int) -> torch.Tensor:
    base = config.rope_parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        if rope_type == "dynamic":
            raise ValueError(
                "rope_type 'dynamic' depends on the sequence length and is not supported"
            )
        with torch.device("cpu"):  # HF's helpers mix explicit and default devices
            if rope_type == "default":
                inv_freq, scaling = _default_inv_freq(config, head_dim), 1.0
            else:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        device = torch.get_default_device()
        inv_freq = inv_freq.to(device)
        freqs = torch.outer(
            torch.arange(max_positions, dtype=torch.float, device=device), inv_freq.float()
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm=None, k_norm=None
    ):
        """q, k: [num_tokens, heads, head_dim]; rotated in fp32 (HF's rotate_half convention).
        ``q_norm``, ``k_norm`` (RMSNorm over head_dim, Qwen3): applied to each head first."""
        if q.is_cuda:
            return self.forward_fused(positions, q, k, q_norm, k_norm)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return self.forward_native(positions, q, k)

    def forward_fused(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm=None, k_norm=None
    ):
        """One Triton kernel for q and k (and their norms); returns new tensors."""
        from vllm_lite.layers.fused_ops import rotary

        if q_norm is None:
            return rotary(positions, q, k, self.cos, self.sin)
        assert q_norm.eps == k_norm.eps
        return rotary(
            positions, q, k, self.cos, self.sin, (q_norm.weight, k_norm.weight), q_norm.eps
        )

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """The plain PyTorch version (the reference for the fused kernel, and the CPU path)."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
