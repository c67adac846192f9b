"""Time the Triton paged-attention kernels on a GPU (median of triton.testing.do_bench).

Decode is memory bound, so it is reported as GB/s of K/V read and compared with torch's varlen
FlashAttention over the same keys laid out contiguously (the bar: 64 x 2048 took 0.239 ms on an
H100). Shapes are Qwen3-0.6B's: 16 query heads, 8 KV heads, head_dim 128, bf16.

    python -m benchmarks.bench_kernels   # from the repository root
"""

from __future__ import annotations

import torch
import triton

from vllm_lite.attention.torch_ref import paged_attention_ref, store_kvcache_ref
from vllm_lite.attention.triton_ops import (
    choose_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
    store_kvcache,
    varlen_attn,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5
VARLEN_GQA = {"enable_gqa": True}  # torch >= 2.13 asks for it explicitly


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def row(name: str, ms: float, kv_bytes: int | None = None) -> None:
    rate = f"{kv_bytes / ms / 1e6:8.0f} GB/s" if kv_bytes else ""
    print(f"  {name:<40} {ms * 1e3:9.1f} us {rate}")


def paged_pool(batch: int, seq_len: int, block_size: int):
    """A pool just big enough for the batch, each sequence's blocks scattered at random."""
    blocks_per_seq = triton.cdiv(seq_len, block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    block_tables = torch.randperm(num_blocks, device="cuda").int().view(batch, blocks_per_seq)
    return k_cache, v_cache, block_tables


def try_varlen(fn) -> float | None:
    """varlen_attn may be missing, or reject a layout (e.g. paged KV with small pages)."""
    if varlen_attn is None:
        return None
    try:
        return bench_ms(fn)
    except (RuntimeError, ValueError, TypeError) as e:
        print(f"  (varlen_attn failed: {str(e).splitlines()[0][:80]})")
        return None


def bench_decode(batch: int, seq_len: int) -> None:
    kv_bytes = 2 * batch * seq_len * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    print(f"decode  batch {batch} x context {seq_len}  ({kv_bytes / 1e6:.0f} MB of K/V)")
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    cu_k = cu_q * seq_len
    for block_size in (256, 16):
        k_cache, v_cache, block_tables = paged_pool(batch, seq_len, block_size)
        auto = choose_num_splits(batch * NUM_KV_HEADS, seq_len, q.device)
        for splits in sorted({auto, 1, 2, 4}):
            ms = bench_ms(
                lambda: paged_decode_attention(
                    q, k_cache, v_cache, block_tables, seq_lens, SCALE, out=out, num_splits=splits
                )
            )
            tag = " (auto)" if splits == auto else ""
            row(f"triton block {block_size} splits {splits}{tag}", ms, kv_bytes)
        if block_size == 256:
            ms = try_varlen(
                lambda: varlen_attn(
                    q,
                    k_cache,
                    v_cache,
                    cu_q,
                    cu_k,
                    1,
                    seq_len,
                    scale=SCALE,
                    seqused_k=seq_lens,
                    block_table=block_tables,
                    **VARLEN_GQA,
                )
            )
            if ms is not None:
                row("varlen_attn paged, block 256", ms, kv_bytes)

    # the bar: FlashAttention decode over contiguous K/V (one query per sequence sees all keys)
    k = torch.randn(batch * seq_len, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    ms = try_varlen(lambda: varlen_attn(q, k, v, cu_q, cu_k, 1, seq_len, scale=SCALE, **VARLEN_GQA))
    if ms is not None:
        row("varlen_attn contiguous (bar)", ms, kv_bytes)


def bench_prefill(batch: int, chunk: int, cached: int, block_size: int = 256) -> None:
    seq_len = cached + chunk
    print(
        f"prefill {batch} x {chunk}-token chunk after a {cached}-token cached prefix, block {block_size}"
    )
    k_cache, v_cache, block_tables = paged_pool(batch, seq_len, block_size)
    num_tokens = batch * chunk
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    pos = torch.arange(cached, seq_len, device="cuda").repeat(batch)
    seq = torch.arange(batch, device="cuda").repeat_interleave(chunk)
    slot_mapping = block_tables[seq, pos // block_size].long() * block_size + pos % block_size
    row(
        "store_kvcache triton",
        bench_ms(lambda: store_kvcache(k, v, k_cache, v_cache, slot_mapping)),
    )
    row(
        "store_kvcache torch ref",
        bench_ms(lambda: store_kvcache_ref(k, v, k_cache, v_cache, slot_mapping)),
    )

    query_start_loc = torch.arange(0, num_tokens + 1, chunk, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    row(
        "paged_prefill_attention triton",
        bench_ms(
            lambda: paged_prefill_attention(
                q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, chunk, SCALE, out=out
            )
        ),
    )
    qsl_cpu, lens_cpu = query_start_loc.tolist(), seq_lens.tolist()
    row(
        "paged_attention torch ref",
        bench_ms(
            lambda: paged_attention_ref(q, k_cache, v_cache, block_tables, qsl_cpu, lens_cpu, SCALE)
        ),
    )
    cu_k = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32, device="cuda")
    ms = try_varlen(
        lambda: varlen_attn(
            q,
            k_cache,
            v_cache,
            query_start_loc,
            cu_k,
            chunk,
            seq_len,
            scale=SCALE,
            window_size=(-1, 0),
            seqused_k=seq_lens,
            block_table=block_tables,
            **VARLEN_GQA,
        )
    )
    if ms is not None:
        row("varlen_attn paged", ms)


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    print(
        torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__
    )
    bench_decode(256, 1024)
    bench_decode(64, 2048)
    bench_prefill(8, 512, 1024)


if __name__ == "__main__":
    main()
