"""Triton paged-attention kernels against the plain-PyTorch reference.

Without a GPU the kernels run under the Triton interpreter (set before triton is imported), so
shapes stay small; on a GPU the same tests run compiled and add bf16 checks.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from grids import kernel_grid  # noqa: E402
from tiny_models import random_block_tables  # noqa: E402

from vllm_lite.attention.metadata import AttentionMetadata, SharedPrefix  # noqa: E402
from vllm_lite.attention.torch_ref import (  # noqa: E402
    TorchRefBackend,
    paged_attention_ref,
    store_kvcache_ref,
)
from vllm_lite.attention.triton_ops import (  # noqa: E402
    TritonBackend,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_work,
    prefill_work_capacity,
    store_kvcache,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 checks need a GPU")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=CUDA_ONLY)]
HEADS = [(4, 4), (9, 3)]  # (q heads, kv heads): MHA, and GQA group 3 as in SmolLM2
# the dtypes of kernel_grid's axes: bf16 on CUDA only
GRID_DTYPE_VALUES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:
        out, ref = out.float(), ref.float()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2


def make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype):
    """Random K/V pools and block tables whose blocks are a random permutation of the pool, so
    every sequence is scattered."""
    block_tables, num_blocks = random_block_tables([-(-n // block_size) for n in seq_lens])
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(shape, dtype=dtype, device=DEVICE)
    return k_cache, v_cache, block_tables.to(DEVICE)


def reference(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
    """fp32 reference on the same (possibly bf16) inputs."""
    return paged_attention_ref(
        q.float(), k_cache.float(), v_cache.float(), block_tables, query_start_loc, seq_lens, scale
    )


def int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def cumsum0(values) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_store_kvcache_skips_padding_slots(block_size):
    num_tokens, num_kv_heads, head_dim = 9, 3, 32
    num_blocks = -(-num_tokens // block_size) + 2
    slot_mapping = torch.randperm(num_blocks * block_size)[:num_tokens].to(DEVICE)
    slot_mapping[[2, 5, 8]] = -1
    keep = slot_mapping >= 0
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, 1234.0, device=DEVICE)
    v_cache = torch.full(shape, -1234.0, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    store_kvcache_ref(k, v, k_ref, v_ref, slot_mapping)

    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]], k[keep])
    assert (k_cache == 1234.0).all(dim=(2, 3)).sum() == num_blocks * block_size - 6


def test_store_kvcache_strided_input_and_cast():
    """K/V sliced out of a fused qkv projection, stored into a bf16-or-fp16 pool."""
    num_tokens, num_kv_heads, head_dim, block_size = 5, 2, 16, 4
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, device=DEVICE)
    k, v = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    shape = (3, block_size, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    slot_mapping = torch.tensor([3, 0, 11, -1, 6], device=DEVICE)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    store_kvcache_ref(k, v, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize(
    "block_size,heads,head_dim,num_splits,dtype",
    kernel_grid([1, 16, 256], HEADS, [16, 64], [1, 4], GRID_DTYPE_VALUES),
)
def test_paged_decode(block_size, heads, head_dim, num_splits, dtype):
    num_heads, num_kv_heads = heads
    # 1 key, one partial tile, exactly two tiles, and a context spanning two 256-blocks
    seq_lens = [1, 37, 128, int(torch.randint(257, 320, ()))]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim**-0.5

    out = paged_decode_attention(
        q, k_cache, v_cache, block_tables, int32(seq_lens), scale, num_splits=num_splits
    )

    assert out.dtype == dtype
    ref = reference(
        q, k_cache, v_cache, block_tables, list(range(len(seq_lens) + 1)), seq_lens, scale
    )
    assert_close(out, ref)


@pytest.mark.parametrize(
    "block_size,shared_blocks,heads,head_dim,dtype",
    [
        (*pool, *shape, dtype)
        for pool, shape, dtype in kernel_grid(
            [(16, 5), (1, 70)],
            [((4, 4), 64), ((9, 3), 40), ((12, 2), 128), ((16, 2), 256)],
            GRID_DTYPE_VALUES,
        )
    ],
)
def test_paged_decode_with_a_shared_prefix(block_size, shared_blocks, heads, head_dim, dtype):
    """Cascade attention: five of seven sequences start with the same physical blocks;
    attending to them once for those five and merging gives plain attention over each context
    (the other two read theirs in full). 21 rows for group 3: one partial row tile; head_dim
    256 with GQA 8 (the 32-key tiles); own contexts of 1 key to several tiles."""
    num_heads, num_kv_heads = heads
    shared = shared_blocks * block_size
    seq_lens = [shared + n for n in (1, 5, 16, 17, 64, 130, 3)]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    rows = int32([1, 1, 0, 1, 1, 0, 1])
    block_tables[rows.bool(), :shared_blocks] = block_tables[0, :shared_blocks]
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=DEVICE)
    ref = reference(
        q, k_cache, v_cache, block_tables, list(range(len(seq_lens) + 1)), seq_lens, 0.2
    )
    blocks = torch.cat(
        [block_tables[0, :shared_blocks], int32([7, 7])]
    )  # longer than needed, as in graphs
    for length, share in (
        (shared, rows),
        (0, rows),
        (shared, 0 * rows),
    ):  # 0: as a graph replay with none
        out = paged_decode_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            int32(seq_lens),
            0.2,
            shared=SharedPrefix(int32([length]), blocks, share),
        )
        assert_close(out, ref)


def test_paged_decode_odd_head_dim_and_default_splits():
    """head_dim 40 is padded to a 64-wide tile and masked; the split count comes from the
    heuristic."""
    seq_lens = [5, 90]
    k_cache, v_cache, block_tables = make_pool(seq_lens, 16, 2, 40, torch.float32)
    q = torch.randn(2, 4, 40, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, block_tables, int32(seq_lens), 0.3, out=out)
    assert_close(out, reference(q, k_cache, v_cache, block_tables, [0, 1, 2], seq_lens, 0.3))


@pytest.mark.parametrize(
    "block_size,heads,head_dim,fresh,dtype",
    kernel_grid([1, 16, 256], HEADS, [32, 64], [True, False], GRID_DTYPE_VALUES),
)
def test_paged_prefill(block_size, heads, head_dim, fresh, dtype):
    num_heads, num_kv_heads = heads
    query_lens = [1, 37, 80]  # 80 spans two 64-row query tiles
    cached = [0, 0, 0] if fresh else [16, int(torch.randint(1, 60, ())), 200]
    seq_lens = [c + n for c, n in zip(cached, query_lens)]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    query_start_loc = cumsum0(query_lens)
    q = torch.randn(query_start_loc[-1], num_heads, head_dim, dtype=dtype, device=DEVICE)
    scale = head_dim**-0.5

    out = paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        int32(query_start_loc),
        int32(seq_lens),
        max(query_lens),
        scale,
    )

    assert out.dtype == dtype
    assert_close(
        out, reference(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_paged_prefill_from_a_padded_work_list(block_size, dtype):
    # a captured step's prefill kernel runs over an upper bound of work items (-1: skip) and
    # sequence rows that start after the decodes: it computes exactly the listed prefills
    num_heads, num_kv_heads, head_dim = 6, 2, 32
    query_lens = [1, 1, 130, 64, 3]  # two decodes (not listed), 130 spans three tiles, 64 one
    cached = [20, 5, 10, 0, 77]
    seq_lens = [c + n for c, n in zip(cached, query_lens)]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    qsl = cumsum0(query_lens)
    q = torch.randn(qsl[-1] + 5, num_heads, head_dim, dtype=dtype, device=DEVICE)  # 5 padding rows
    work = prefill_work(query_lens[2:], 2, prefill_work_capacity(qsl[-1] + 5, 8))
    assert work.shape == (prefill_work_capacity(qsl[-1] + 5, 8), 2) and (work[5:] == -1).all()
    assert work[:5].tolist() == [[2, 0], [2, 1], [2, 2], [3, 0], [4, 0]]
    out = torch.full_like(q, float("nan"))

    paged_prefill_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        int32(qsl),
        int32(seq_lens),
        0,
        head_dim**-0.5,
        out=out,
        work=torch.from_numpy(work).to(DEVICE),
    )

    ref = reference(q, k_cache, v_cache, block_tables, qsl, seq_lens, head_dim**-0.5).to(dtype)
    assert_close(out[qsl[2] : qsl[-1]], ref[qsl[2] : qsl[-1]])
    assert (
        out[: qsl[2]].isnan().all() and out[qsl[-1] :].isnan().all()
    )  # rows not listed: untouched


def mixed_batch(block_size, num_heads, num_kv_heads, head_dim, dtype, fresh):
    """2 decodes + 2 prefill chunks, then one padding token (slot -1), as the model runner
    lays them out; the pool already holds the cached context."""
    query_lens = [1, 1, 50, 33]
    cached = [40, 130, 0, 0] if fresh else [40, 130, 0, 70]
    seq_lens = [c + n for c, n in zip(cached, query_lens)]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    slots = []
    for i, (c, n) in enumerate(zip(cached, query_lens)):
        for pos in range(c, c + n):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    slots.append(-1)
    num_tokens = len(slots)
    query_start_loc = cumsum0(query_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=DEVICE),
        query_start_loc=int32(query_start_loc),
        seq_lens=int32(seq_lens),
        block_tables=block_tables,
        num_decodes=2,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        prefill_is_fresh=fresh,
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    q, k, v = (
        torch.randn(num_tokens, h, head_dim, dtype=dtype, device=DEVICE)
        for h in (num_heads, num_kv_heads, num_kv_heads)
    )
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "cached-prefix"])
@pytest.mark.parametrize("block_size", [16, 256])
def test_triton_backend_mixed_batch(block_size, fresh, dtype):
    q, k, v, k_cache, v_cache, meta = mixed_batch(block_size, 9, 3, 64, dtype, fresh)
    k_ref, v_ref = k_cache.float().clone(), v_cache.float().clone()  # fp32 reference pools
    scale = 0.125

    out = TritonBackend().forward(q, k, v, k_cache, v_cache, meta, scale)
    ref = TorchRefBackend().forward(q.float(), k.float(), v.float(), k_ref, v_ref, meta, scale)

    assert torch.equal(k_cache.float(), k_ref) and torch.equal(v_cache.float(), v_ref)
    real = meta.query_start_loc_cpu[-1]  # the padding row's output is unspecified
    assert out.dtype == dtype
    assert_close(out[:real], ref[:real])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "cached-prefix"])
def test_triton_backend_mixed_batch_in_the_graph_layout(fresh, dtype):
    # a captured mixed step: padded to 12 sequence rows, decode lengths instead of a decode
    # count, the prefill work list padded with -1 rows; host values are placeholders
    q, k, v, k_cache, v_cache, meta = mixed_batch(16, 9, 3, 64, dtype, fresh)
    k_ref, v_ref = k_cache.float().clone(), v_cache.float().clone()
    ref = TorchRefBackend().forward(q.float(), k.float(), v.float(), k_ref, v_ref, meta, 0.125)
    rows, qsl = 12, meta.query_start_loc_cpu
    decode_lens = torch.zeros(rows, dtype=torch.int32, device=DEVICE)
    decode_lens[:2] = meta.seq_lens[:2]
    pad = rows - meta.num_seqs
    graph_meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping,
        query_start_loc=int32(qsl + [qsl[-1]] * pad),
        seq_lens=int32(meta.seq_lens_cpu + [0] * pad),
        block_tables=torch.cat(
            [meta.block_tables, meta.block_tables.new_zeros(pad, meta.block_tables.shape[1])]
        ),
        num_decodes=-1,
        max_query_len=-1,
        max_seq_len=meta.block_tables.shape[1] * 16,
        decode_lens=decode_lens,
        prefill_work=torch.from_numpy(
            prefill_work([50, 33], 2, prefill_work_capacity(len(q), rows))
        ).to(DEVICE),
    )

    out = TritonBackend().forward(q, k, v, k_cache, v_cache, graph_meta, 0.125)

    assert torch.equal(k_cache.float(), k_ref) and torch.equal(v_cache.float(), v_ref)
    assert_close(out[: qsl[-1]], ref[: qsl[-1]])
    assert not out[qsl[-1] :].any()  # the padding row


# Head sizes, GQA ratios and block sizes of real models and odd ones. The CPU interpreter runs a
# few shapes in fp32; the GPU every pair of head size, group, block size and dtype (kernel_grid).
GRID_HEAD_DIMS, GRID_GROUPS = [32, 48, 64, 80, 96, 128, 256], [1, 3, 5, 8]
GRID_BLOCKS, GRID_DTYPES = [1, 16, 32, 256], [torch.float32, torch.bfloat16, torch.float16]
if torch.cuda.is_available():
    GRID = kernel_grid(GRID_HEAD_DIMS, GRID_GROUPS, GRID_BLOCKS, GRID_DTYPES)
else:
    GRID = [(48, 5, 32, torch.float32), (80, 8, 256, torch.float32), (256, 3, 16, torch.float32)]
# kv heads: 1 for odd groups
GRID = [(d, g, 1 if g in (3, 5) else 2, b, dtype) for d, g, b, dtype in GRID]
GRID_IDS = [f"d{d}-g{g}-kv{kv}-b{b}-{str(dtype)[6:]}" for d, g, kv, b, dtype in GRID]


@pytest.mark.parametrize("head_dim,group,num_kv_heads,block_size,dtype", GRID, ids=GRID_IDS)
def test_paged_decode_over_the_shape_grid(head_dim, group, num_kv_heads, block_size, dtype):
    seq_lens = [1, 70, 300]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(seq_lens), group * num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    for num_splits in (None, 1):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            int32(seq_lens),
            head_dim**-0.5,
            out=out,
            num_splits=num_splits,
        )
        assert_close(
            out,
            reference(q, k_cache, v_cache, block_tables, [0, 1, 2, 3], seq_lens, head_dim**-0.5).to(
                dtype
            ),
        )


@pytest.mark.parametrize("head_dim,group,num_kv_heads,block_size,dtype", GRID, ids=GRID_IDS)
def test_paged_prefill_over_the_shape_grid(head_dim, group, num_kv_heads, block_size, dtype):
    query_lens, cached = [1, 70], [0, 33]
    seq_lens = [c + n for c, n in zip(cached, query_lens)]
    k_cache, v_cache, block_tables = make_pool(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    qsl = cumsum0(query_lens)
    q = torch.randn(qsl[-1], group * num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    ref = reference(q, k_cache, v_cache, block_tables, qsl, seq_lens, head_dim**-0.5).to(dtype)
    # the launch of eager steps, then the one of captured steps (a work list padded with -1)
    work = torch.from_numpy(prefill_work(query_lens, 0, prefill_work_capacity(len(q), 4))).to(
        DEVICE
    )
    for grid_work in (None, work):
        out = torch.full_like(q, float("nan"))
        paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            int32(qsl),
            int32(seq_lens),
            max(query_lens),
            head_dim**-0.5,
            out=out,
            work=grid_work,
        )
        assert_close(out, ref)


def test_triton_backend_refuses_a_block_table_narrower_than_the_context():
    q, k, v, k_cache, v_cache, meta = mixed_batch(16, 4, 2, 32, torch.float32, fresh=False)
    meta.block_tables = meta.block_tables[:, :1]  # 16 keys per sequence, contexts of up to 131
    with pytest.raises(ValueError, match="block table"):
        TritonBackend().forward(q, k, v, k_cache, v_cache, meta, 0.2)
