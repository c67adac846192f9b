"""Triton kernels for the paged KV cache: store, split-K decode, chunked prefill.

Every kernel reads keys through the block table one token at a time (physical block of token
``n`` is ``block_tables[seq, n // block_size]``), so any block size works, 1 and 256 included.
Nothing here reads a tensor value on the host, so the decode path can be captured in a CUDA
graph. Softmax runs online in fp32 in the log2 domain (``exp2`` is the cheap instruction).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
import triton
import triton.language as tl

import vllm_lite.triton_compat  # noqa: F401  (runs the kernels under the CPU interpreter)
from vllm_lite.attention.metadata import AttentionBackend, AttentionMetadata, SharedPrefix

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch
    varlen_attn = None


_LOG2E = 1.4426950408889634
# a decode split keeps at least this many keys, so partial results stay a small share of traffic
_MIN_SPLIT_TOKENS = 128
_MAX_SPLITS = 64
# query rows per program of the prefill kernel
PREFILL_BLOCK_M = 64


# Triton compiles a variant per specialization of each argument (an int equal to 1 or divisible
# by 16, a pointer aligned to 16 bytes). The block-table width changes every step, and metadata
# tensors are often slices (``seq_lens[num_decodes:]``) or packed at odd offsets; they are read a
# scalar at a time, so specializing on them would buy nothing but compiles inside a request.
_METADATA_PTRS = ["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"]


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots (tf32 would miss fp32 tolerances); 16-bit use tensor
    cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_layout(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.stride(-1) == 1, "head_dim must be contiguous"


# ----------------------------------------------------------------------------- store


@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program copies all heads of one token into its slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM) & (slot >= 0)
    dst = (
        (slot // BLOCK_SIZE) * stride_cb
        + (slot % BLOCK_SIZE) * stride_cs
        + offs_h * stride_ch
        + offs_d
    )
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    """Write token ``t``'s K/V at flat slot ``slot_mapping[t]``; slots of -1 are left alone."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _check_layout(k, v, k_cache, v_cache)
    assert k_cache.stride() == v_cache.stride()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    _store_kvcache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=_pow2(num_kv_heads),
        BLOCK_D=_pow2(head_dim),
    )


# ----------------------------------------------------------------------------- decode


@triton.jit
def _attend(
    q,
    lo,
    hi,
    table_ptr,
    k_cache_ptr,
    v_cache_ptr,
    kv_head,
    stride_cb,
    stride_cs,
    stride_ch,
    scale_log2,
    q_pos,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The query rows ``q`` [M, BLOCK_D] attend to keys ``lo..hi-1`` of one KV head, read through
    the block-table row ``table_ptr``: online softmax in fp32, in the log2 domain. Returns the
    unnormalized output, the running max and the sum of exponentials per row. CAUSAL: row r
    sees only keys at positions <= q_pos[r]."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([q.shape[0]], float("-inf"), tl.float32)
    l_i = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_mask = n < hi
        block = tl.load(table_ptr + n // BLOCK_SIZE, mask=n_mask, other=0)
        kv_off = block.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        nd_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0).to(
            q.dtype
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


_SHARED_PTRS = ["shared_len_ptr", "shared_rows_ptr", "shared_blocks_ptr"]


@triton.jit(
    do_not_specialize=["stride_bt"], do_not_specialize_on_alignment=_METADATA_PTRS + _SHARED_PTRS
)
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    shared_len_ptr,
    shared_rows_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SHARED_SLOTS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (seq, kv head, split): all GROUP query heads of one KV head attend to one slice
    of the context, so each K/V byte is read once. With one split it writes the final output;
    otherwise it writes the slice's normalized output and log2-sum-exp for the reduce kernel.
    Cascade attention (SHARED_SLOTS > 0, one split): a sharing row's context starts after the
    ``shared_len`` keys that ``_shared_prefix_kernel`` (launched first) attended to; its
    SHARED_SLOTS partial results are merged here into the output."""
    b = tl.program_id(0)  # grid x: up to 2**31 - 1 sequences (y and z stop at 65,535)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    start = 0
    if SHARED_SLOTS > 0:
        start = tl.load(shared_len_ptr) * tl.load(shared_rows_ptr + b)
    # slices are whole key tiles; sized per sequence so short sequences leave late splits empty
    split_len = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * split_len
    hi = tl.minimum(lo + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    gd_mask = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gd_mask,
        other=0.0,
    )

    acc, m_i, l_i = _attend(
        q,
        lo,
        hi,
        block_tables_ptr + b * stride_bt,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        stride_cb,
        stride_cs,
        stride_ch,
        scale_log2,
        lo,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        BLOCK_D,
        False,
        DOT_PRECISION,
    )

    # an empty slice (or a padded sequence of length 0) has l = 0: write zeros, lse = -inf
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    if SHARED_SLOTS > 0:  # weigh each part by its share of the softmax mass (-inf: none)
        first = (b * NUM_HEADS + heads) * SHARED_SLOTS  # part_o is [B, Hq, slots, BLOCK_D]
        top = lse
        for j in tl.static_range(SHARED_SLOTS):
            top = tl.maximum(
                top, tl.load(part_lse_ptr + first + j, mask=offs_g < GROUP, other=float("-inf"))
            )
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.exp2(lse - top)
        acc = acc * total[:, None]
        for j in tl.static_range(SHARED_SLOTS):
            w = tl.exp2(
                tl.load(part_lse_ptr + first + j, mask=offs_g < GROUP, other=float("-inf")) - top
            )
            o = tl.load(
                part_o_ptr + (first + j)[:, None] * BLOCK_D + offs_d[None, :],
                mask=gd_mask,
                other=0.0,
            )
            acc += w[:, None] * o
            total += w
        acc = acc / tl.where(total > 0, total, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        row = (b * NUM_HEADS + heads) * NUM_SPLITS + split  # part_o is [B, Hq, splits, BLOCK_D]
        tl.store(part_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=gd_mask)
        tl.store(part_lse_ptr + row, lse, mask=offs_g < GROUP)


@triton.jit(do_not_specialize=["num_rows"], do_not_specialize_on_alignment=_SHARED_PTRS)
def _shared_prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    shared_blocks_ptr,
    shared_len_ptr,
    shared_rows_ptr,
    part_o_ptr,
    part_lse_ptr,
    scale_log2,
    num_rows,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SHARED_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Cascade attention's first half (the decode kernel merges). Program (row tile, kv head,
    split): the ``shared_len`` keys of the blocks ``shared_blocks`` attend to BLOCK_M query rows
    at once, a row being (sequence, query head of this KV head): the shared keys are read once
    per tile instead of once per sequence, and the scores are a real matrix product. Writes each
    split's normalized output and log2-sum-exp into slot ``split`` of its row; -inf for
    sequences that do not share."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    shared_len = tl.load(shared_len_ptr)
    split_len = tl.cdiv(tl.cdiv(shared_len, SHARED_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, shared_len)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this KV head: seq * GROUP + g
    seq = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    md_mask = (rows < num_rows)[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + seq[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=md_mask,
        other=0.0,
    )

    acc, m_i, l_i = _attend(
        q,
        lo,
        hi,
        shared_blocks_ptr,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        stride_cb,
        stride_cs,
        stride_ch,
        scale_log2,
        lo,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        BLOCK_D,
        False,
        DOT_PRECISION,
    )

    # the other sequences got the same work on keys not theirs: their weight is zero
    shares = tl.load(shared_rows_ptr + seq, mask=rows < num_rows, other=0) > 0
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    slot = (seq * NUM_HEADS + head) * SHARED_SPLITS + split
    tl.store(
        part_o_ptr + slot[:, None] * BLOCK_D + offs_d[None, :], acc / l_safe[:, None], mask=md_mask
    )
    lse = tl.where(shares & (l_i > 0), m_i + tl.log2(l_safe), float("-inf"))
    tl.store(part_lse_ptr + slot, lse, mask=rows < num_rows)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (seq, query head): weight each split's output by its share of the softmax mass."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b * NUM_HEADS + h) * NUM_SPLITS + offs_s
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all empty: weights become 0
    w = tl.exp2(lse - lse_max)
    o = tl.load(
        part_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    w_sum = tl.sum(w, 0)
    o = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the CPU interpreter runs programs one by one: fewer is faster
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Enough (seq, kv head, split) programs to fill every SM about twice, but no split shorter
    than _MIN_SPLIT_TOKENS keys: large batches get 1 split, small batches with long contexts
    many."""
    wanted = triton.cdiv(2 * _num_sms(device), num_programs)
    useful = triton.cdiv(max_seq_len, _MIN_SPLIT_TOKENS)
    splits = max(1, min(wanted, useful, _MAX_SPLITS))
    return 1 << (splits.bit_length() - 1)  # a power of two: few kernel variants to compile


# cascade attention: the shared prefix is cut into this many slices (more programs for few rows)
_SHARED_SPLITS = 4


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query per sequence, at its last position
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    shared: SharedPrefix | None = None,
) -> torch.Tensor:
    """Flash-decoding over the paged cache. The split count depends only on shapes (or on the
    ``max_seq_len`` hint), never on tensor values, so the call can be graph-captured.

    ``shared`` (cascade attention): the rows it names start with its blocks, whole blocks below
    each such row's ``seq_lens``; their attention to those keys is computed once for all of them
    and merged with each one's attention to its own keys."""
    if out is None:
        out = torch.empty_like(q)
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return out
    _check_layout(q, out, k_cache, v_cache)
    assert k_cache.stride() == v_cache.stride()
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if shared is not None:
        # the shared keys are split apart; the rows' own contexts are short next to them, and a
        # single split keeps the cascade to one compiled variant per kernel
        num_splits = 1
    elif num_splits is None:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch * num_kv_heads, max_seq_len, q.device)
    block_d, block_n = _pow2(head_dim, 16), 64 if head_dim <= 128 else 32
    slots = _SHARED_SPLITS if shared is not None else num_splits
    if slots > 1:
        part_o = torch.empty(batch, num_heads, slots, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, slots, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused: the kernel writes the output directly
    if shared is not None:  # first: the decode kernel merges its results
        block_m = 64
        _shared_prefix_kernel[(triton.cdiv(batch * group, block_m), num_kv_heads, _SHARED_SPLITS)](
            q,
            k_cache,
            v_cache,
            shared.blocks,
            shared.length,
            shared.rows,
            part_o,
            part_lse,
            scale * _LOG2E,
            batch * group,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            NUM_HEADS=num_heads,
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            SHARED_SPLITS=_SHARED_SPLITS,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=4,
        )
    shared_args = (
        (shared.length, shared.rows) if shared is not None else (seq_lens, seq_lens)
    )  # (unused)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        *shared_args,
        out,
        part_o,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=num_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        SHARED_SLOTS=_SHARED_SPLITS if shared is not None else 0,
        BLOCK_G=_pow2(group, 16),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_o,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=_pow2(num_splits),
            BLOCK_D=block_d,
        )
    return out


# ----------------------------------------------------------------------------- prefill


@triton.jit(
    do_not_specialize=["stride_bt"], do_not_specialize_on_alignment=_METADATA_PTRS + ["work_ptr"]
)
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    work_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cb,
    stride_cs,
    stride_ch,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_WORK: tl.constexpr,
):
    """Program (query tile, query head, seq): the tile's queries sit at the end of the context
    and attend causally to every key up to their position, cached prefix included. USE_WORK:
    program (work item, query head) instead, the item's (seq, tile) read from ``work`` [W, 2]
    (seq -1: nothing to do), so that the grid does not depend on the step (CUDA graphs)."""
    if USE_WORK:
        seq = tl.load(work_ptr + 2 * tl.program_id(0))
        tile = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
        if seq < 0:
            return
    else:
        tile = tl.program_id(0)
        seq = tl.program_id(2)
    head = tl.program_id(1)
    kv_head = head // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = seq_len - q_len + offs_m
    md_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    rows = q_start + offs_m
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=md_mask, other=0.0)

    # keys past the tile's last query are masked for every row; a tile past the chunk reads none
    hi = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
    hi = tl.where(tile * BLOCK_M < q_len, hi, 0)
    # key 0 is visible to every row, so m_i is finite after the first tile
    acc, m_i, l_i = _attend(
        q,
        0,
        hi,
        block_tables_ptr + seq * stride_bt,
        k_cache_ptr,
        v_cache_ptr,
        kv_head,
        stride_cb,
        stride_cs,
        stride_ch,
        scale_log2,
        q_pos,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        BLOCK_D,
        True,
        DOT_PRECISION,
    )

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=md_mask)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D] packed queries
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], this chunk already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, rows of q (need not start at 0)
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the chunk
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks over all their keys in the paged cache; serves
    chunked prefill and prefix caching. Only the rows named by query_start_loc are written.
    ``work`` ([W, 2] int32 from ``prefill_work``): the (seq, query tile) pairs to compute, -1
    rows skipped; the grid is then W programs per head whatever the step (``max_query_len`` is
    not read), so the call can be graph-captured with W an upper bound."""
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    if num_seqs == 0 or (work is None and max_query_len == 0):
        return out
    _check_layout(q, out, k_cache, v_cache)
    assert k_cache.stride() == v_cache.stride()
    _, block_size, num_kv_heads, _ = k_cache.shape
    if work is None:
        grid = (triton.cdiv(max_query_len, PREFILL_BLOCK_M), num_heads, num_seqs)
    else:
        grid = (work.shape[0], num_heads, 1)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        seq_lens if work is None else work,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=64 if head_dim <= 128 else 32,
        BLOCK_D=_pow2(head_dim, 16),
        DOT_PRECISION=_dot_precision(q.dtype),
        USE_WORK=work is not None,
        num_warps=4,
    )
    return out


def prefill_work(query_lens: np.ndarray, first_seq: int, capacity: int | None = None) -> np.ndarray:
    """The (seq, query tile) pairs of the sequences ``first_seq, first_seq + 1, ...`` with these
    query lengths, [W, 2] int32, padded with -1 rows up to ``capacity``."""
    tiles = -(-np.asarray(query_lens, np.int64) // PREFILL_BLOCK_M)
    total = int(tiles.sum())
    work = np.full((max(total, capacity or 0), 2), -1, np.int32)
    work[:total, 0] = np.repeat(np.arange(first_seq, first_seq + len(tiles)), tiles)
    work[:total, 1] = np.arange(total) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    return work


def prefill_work_capacity(num_tokens: int, num_seqs: int) -> int:
    """An upper bound on ``prefill_work``'s rows for up to ``num_tokens`` query tokens in up to
    ``num_seqs`` sequences: each sequence adds at most one partial tile."""
    return triton.cdiv(num_tokens, PREFILL_BLOCK_M) + num_seqs


# ----------------------------------------------------------------------------- backend

# torch 2.13 wants enable_gqa=True when Hq != Hkv; versions without the flag do GQA implicitly
_VARLEN_GQA_KW = (
    {"enable_gqa": True}
    if varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters
    else {}
)


class TritonBackend(AttentionBackend):
    """Triton store + split-K decode + paged prefill. A fresh prefill (no cached context) on
    CUDA goes to torch's varlen FlashAttention over the step's own K/V instead."""

    name = "triton"
    supports_shared_prefix = True
    supports_mixed_cuda_graphs = True

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.block_tables.shape[1] * k_cache.shape[1] < meta.max_seq_len:
            # the kernels read block ids up to the longest context: a narrower table would
            # send them past its row into unrelated memory
            raise ValueError(
                f"block table of {meta.block_tables.shape[1]} blocks cannot hold "
                f"max_seq_len {meta.max_seq_len} at block_size {k_cache.shape[1]}"
            )
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.prefill_work is not None:
            return self._forward_graph_layout(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd > 0:
            # next to prefill work the GPU is busy anyway: one split, one compiled variant. Else
            # the split count follows the longest context (so the warm-up can meet each count)
            paged_decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                meta.block_tables[:nd],
                meta.seq_lens[:nd],
                scale,
                out=out[:nd],
                num_splits=1 if meta.num_seqs > nd else None,
                max_seq_len=meta.max_seq_len,
                shared=meta.shared_prefix,
            )
        if meta.num_seqs == nd:
            return out
        if self._use_varlen(q, meta):
            # decodes own rows 0..nd-1, so the prefill part starts at row nd
            cu_seqlens = meta.query_start_loc[nd:] - nd
            out[nd:] = varlen_attn(
                q[nd:],
                k[nd:],
                v[nd:],
                cu_seqlens,
                cu_seqlens,
                meta.max_query_len,
                meta.max_query_len,
                scale=scale,
                window_size=(-1, 0),
                **_VARLEN_GQA_KW,
            )
        else:
            paged_prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables[nd:],
                meta.query_start_loc[nd:],
                meta.seq_lens[nd:],
                meta.max_query_len,
                scale,
                out=out,
            )
        return out

    @staticmethod
    def _forward_graph_layout(
        q, k_cache, v_cache, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """A step whose grids depend only on its padded shapes (a captured mixed step). The
        decode kernel runs over every sequence row with ``decode_lens`` (0: writes zeros to that
        row, which is a prefill token's or padding); the prefill kernel then writes every prefill
        token's row from its work list. Padding rows stay zero."""
        out = torch.zeros_like(q)
        rows = meta.decode_lens.shape[0]  # <= the step's tokens: every sequence has one
        paged_decode_attention(
            q[:rows],
            k_cache,
            v_cache,
            meta.block_tables,
            meta.decode_lens,
            scale,
            out=out[:rows],
            num_splits=1,
        )
        paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            0,
            scale,
            out=out,
            work=meta.prefill_work,
        )
        return out

    @staticmethod
    def _use_varlen(q: torch.Tensor, meta: AttentionMetadata) -> bool:
        """FlashAttention needs CUDA and 16-bit inputs, and only sees the step's own keys."""
        return (
            varlen_attn is not None
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and meta.prefill_is_fresh
        )
