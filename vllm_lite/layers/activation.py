import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """SwiGLU's gate: silu(gate) * up, on the two halves of the merged gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused Triton kernel
            from vllm_lite.layers.fused_ops import silu_and_mul

            return silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The plain PyTorch version (the reference for the fused kernel, and the CPU path)."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
