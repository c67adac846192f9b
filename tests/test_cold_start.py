"""``record_triton_variants`` keys a launch as Triton keys its compiled binaries: constexprs,
dtypes, ints equal to 1 or divisible by 16, pointers aligned to 16 bytes. Values that change
from step to step must not be part of the key, or a request meets a variant no warm-up did."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_lite.attention import triton_ops  # noqa: E402
from vllm_lite.layers import fused_ops  # noqa: E402
from vllm_lite.triton_variants import record_triton_variants  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_variants_ignore_table_width_and_metadata_offsets():
    """Block-table widths and the offsets of sliced metadata change every step: none of them
    may pick a new variant (the batch's decodes are sliced off the front of the step's tensors)."""
    kv_heads, heads, head_dim, block_size = 2, 4, 32, 16
    pool = torch.randn(8, block_size, kv_heads, head_dim, device=DEVICE)
    with record_triton_variants() as seen:
        for width, skip in [(1, 0), (3, 1), (16, 2), (5, 3)]:
            tables = torch.zeros(skip + 2, width, dtype=torch.int32, device=DEVICE)
            seq_lens = torch.full((skip + 2,), width * block_size, dtype=torch.int32, device=DEVICE)
            q = torch.randn(skip + 2, heads, head_dim, device=DEVICE)
            triton_ops.paged_decode_attention(q[skip:], pool, pool, tables[skip:], seq_lens[skip:], 1.0, num_splits=1)
            starts = torch.arange(skip + 3, dtype=torch.int32, device=DEVICE)
            triton_ops.paged_prefill_attention(q, pool, pool, tables[skip:], starts[skip:], seq_lens[skip:], 1, 1.0)
            positions = torch.arange(skip + 2, device=DEVICE)[skip:]
            k = torch.randn(2, kv_heads, head_dim, device=DEVICE)
            fused_ops.rotary(positions, q[skip:], k, pool[0, :, 0], pool[0, :, 0])
            triton_ops.store_kvcache(k, k, pool, pool, torch.full((skip + 2,), -1, device=DEVICE)[skip:])
    kernels = sorted(name for name, _, _ in seen)
    assert kernels == ["_decode_split_kernel", "_prefill_kernel", "_rotary_kernel", "_store_kvcache_kernel"], (
        "\n".join(sorted(describe(k) for k in seen)))


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
