from __future__ import annotations

import torch
from torch import nn

from vllm_lite.attention.metadata import AttentionBackend, get_forward_context


def get_backend(name: str, device: torch.device, block_size: int | None = None) -> AttentionBackend:
    """``auto``: flash-attn on CUDA where it loads and supports ``block_size`` (a multiple of 256),
    else Triton on CUDA, else the torch reference. ``block_size`` None means unknown: ``auto``
    then skips flash-attn, and an explicit ``flash_attn`` checks the KV pool at each step."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        else:
            name = "triton"
            if block_size is not None:
                from vllm_lite.attention.flash_attn_backend import FlashAttnBackend

                try:
                    return FlashAttnBackend(block_size)
                except (
                    ImportError,
                    ValueError,
                ):  # not installed, too old, or block_size unsupported
                    pass
    if name == "torch":
        from vllm_lite.attention.torch_ref import TorchRefBackend

        return TorchRefBackend()
    if name == "triton":
        from vllm_lite.attention.triton_ops import TritonBackend

        return TritonBackend()
    if name == "flash_attn":
        from vllm_lite.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend(block_size)
    raise ValueError(f"unknown attention backend {name!r}")


class Attention(nn.Module):
    """Paged attention over this layer's slice of the KV pool. The model runner sets
    ``k_cache``/``v_cache`` and the shared ``backend`` before the first step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = (
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        )
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = get_forward_context()
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
