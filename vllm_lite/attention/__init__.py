"""The attention seam: ``Attention`` is the layer the model calls; the backend behind it (plain
PyTorch on CPU, Triton on GPU) is chosen once by the model runner."""

from vllm_lite.attention.layer import Attention, get_backend
from vllm_lite.attention.metadata import (
    AttentionBackend,
    AttentionMetadata,
    SharedPrefix,
    forward_context,
    get_forward_context,
)

__all__ = [
    "Attention",
    "AttentionBackend",
    "AttentionMetadata",
    "SharedPrefix",
    "forward_context",
    "get_forward_context",
    "get_backend",
]
