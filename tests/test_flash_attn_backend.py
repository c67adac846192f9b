"""FlashAttnBackend against the plain-PyTorch reference, on a GPU with flash-attn installed.

flash-attn's paged KV cache needs block_size % 256 == 0, so every case uses block_size 256.
"""

import pytest
import torch

pytest.importorskip("flash_attn")
if not torch.cuda.is_available():
    pytest.skip("flash-attn needs a CUDA GPU", allow_module_level=True)

from tiny_models import random_block_tables  # noqa: E402

from vllm_lite.attention.flash_attn_backend import FlashAttnBackend  # noqa: E402
from vllm_lite.attention.metadata import AttentionMetadata  # noqa: E402
from vllm_lite.attention.torch_ref import TorchRefBackend  # noqa: E402

BLOCK_SIZE = 256
DEVICE = "cuda"


def make_step(cached, new, num_decodes, num_heads, num_kv_heads, head_dim, dtype, fresh):
    """Random pool with random (permuted) block tables; sequence i holds ``cached[i]`` tokens
    and this step brings ``new[i]`` more. Returns q, k, v, k_cache, v_cache, meta."""
    seq_lens = [c + n for c, n in zip(cached, new)]
    blocks = [-(-s // BLOCK_SIZE) for s in seq_lens]
    block_tables, num_blocks = random_block_tables(blocks, spare=3)
    slots, qsl = [], [0]
    for i, (c, n) in enumerate(zip(cached, new)):
        for pos in range(c, c + n):
            slots.append(int(block_tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
        qsl.append(qsl[-1] + n)
    num_tokens = qsl[-1]
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        num_decodes=num_decodes,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        prefill_is_fresh=fresh,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return q, k, v, k_cache, v_cache, meta


CASES = {
    # 2 decodes (contexts over several blocks) + 2 prefill chunks, the second after a cached prefix
    "mixed_cached_prefix": ([299, 700], [1, 1], [0, 300], [100, 200], False),
    # 2 decodes + 2 fresh prefills: varlen over the step's own K/V
    "mixed_fresh": ([40, 513], [1, 1], [0, 0], [77, 300], True),
    # decodes only (the CUDA-graph step)
    "decode_only": ([5, 255, 256, 1000], [1, 1, 1, 1], [], [], True),
    # prefill chunks only, all after a cached prefix
    "chunks_only": ([], [], [256, 17], [64, 300], False),
}


@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, heads):
    dec_cached, dec_new, pre_cached, pre_new, fresh = CASES[case]
    num_heads, num_kv_heads = heads
    head_dim, dtype = 64, torch.bfloat16
    torch.manual_seed(hash(case) % 1000)
    q, k, v, k_cache, v_cache, meta = make_step(
        dec_cached + pre_cached,
        dec_new + pre_new,
        len(dec_cached),
        num_heads,
        num_kv_heads,
        head_dim,
        dtype,
        fresh,
    )
    scale = head_dim**-0.5
    ref_k, ref_v = k_cache.float(), v_cache.float()
    ref = TorchRefBackend().forward(q.float(), k.float(), v.float(), ref_k, ref_v, meta, scale)

    out = FlashAttnBackend(BLOCK_SIZE).forward(q, k, v, k_cache, v_cache, meta, scale)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(k_cache.float(), ref_k) and torch.equal(v_cache.float(), ref_v)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e}"


def test_rejects_unsupported_block_size():
    with pytest.raises(ValueError, match="256"):
        FlashAttnBackend(16)
