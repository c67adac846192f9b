from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 as HF does; with ``residual`` it first adds it (the fused
    add-and-norm of pre-norm transformers) and returns the new residual too."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:  # one fused Triton kernel; never modifies x or residual
            from vllm_lite.layers.fused_ops import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The plain PyTorch version (the reference for the fused kernel, and the CPU path)."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
