"""``record_triton_variants`` keys a launch as Triton keys its compiled binaries: constexprs,
dtypes, ints equal to 1 or divisible by 16, pointers aligned to 16 bytes."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_lite.layers import fused_ops  # noqa: E402
from vllm_lite.triton_variants import record_triton_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_variant_key_follows_tritons_specialization_rules():
    """An int argument equal to 1 is a constant, and a pointer off 16-byte alignment is another
    binary: two launches of ``rms_norm`` that differ only so are three variants."""
    w = torch.ones(32, device=DEVICE)
    x = torch.randn(2, 4, 33, device=DEVICE)
    with record_triton_variants() as seen:
        fused_ops.rms_norm(x[:, :, :32], w, 1e-6)  # n_heads 4
        fused_ops.rms_norm(x[:, :1, :32], w, 1e-6)  # n_heads 1
        fused_ops.rms_norm(x[:, :, 1:], w, 1e-6)  # x 4 bytes off alignment
        fused_ops.rms_norm(x[:1, :, :32], w, 1e-6)  # n_rows is not specialized: same as the first
    assert len(seen) == 3
