"""Launch configurations of the paged decode kernel at 256 sequences (issue 9): key tile
(BLOCK_N), warps and pipeline stages, one split, for the KV layouts of Qwen3-0.6B (16/8 heads)
and Qwen2.5-1.5B (12/2), contexts uniform in 100..1600, head_dim 128, bf16, block size 16.
Reports GB/s of K/V read (median of ``triton.testing.do_bench``), best first.

``--shared-prefix``: cascade attention as in ``bench throughput --dataset shared-prefix`` mid-run
(Qwen3-0.6B layout): 248 rows share 1,024 keys and own 128..256 more, 8 rows own 1,152..1,280
(the requests admitted before the prefix was cached). Times the decode kernel (rows' own keys +
the merge) and the shared-prefix kernel under each launch configuration.

    python -m benchmarks.bench_decode_configs [--shared-prefix]   # on a GPU, from the repository root
"""
from __future__ import annotations

import itertools
import sys

import torch
import triton

from benchmarks.bench_decode_splits import BATCH, BLOCK, HEAD_DIM, mixed_batch
from vllm_lite.attention import triton_ops
from vllm_lite.attention.metadata import SharedPrefix

SHARED, SHARING, HEADS, KV_HEADS = 1024, 248, 16, 8


def shared_batch(seed: int = 0):
    """(q, k_cache, v_cache, block_tables, seq_lens, SharedPrefix, bytes of K/V the decode kernel reads)."""
    gen = torch.Generator().manual_seed(seed)
    own = torch.randint(128, 257, (BATCH,), generator=gen)
    own[SHARING:] += SHARED  # the rows that do not share hold a copy of the prefix of their own
    own_blocks = (own + BLOCK - 1) // BLOCK
    num_shared = SHARED // BLOCK
    num_blocks = num_shared + int(own_blocks.sum())
    perm = torch.randperm(num_blocks, generator=gen).int()
    shared_blocks, rest = perm[:num_shared], perm[num_shared:]
    tables = torch.zeros(BATCH, num_shared + int(own_blocks.max()), dtype=torch.int32)
    at = 0
    for i, n in enumerate(own_blocks.tolist()):
        first = 0 if i >= SHARING else num_shared
        if i < SHARING:
            tables[i, :num_shared] = shared_blocks
        tables[i, first:first + n] = rest[at:at + n]
        at += n
    seq_lens = own + torch.where(torch.arange(BATCH) < SHARING, SHARED, 0)
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(BATCH, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    rows = (torch.arange(BATCH) < SHARING).int().cuda()
    shared = SharedPrefix(torch.tensor([SHARED], dtype=torch.int32, device="cuda"), shared_blocks.cuda(), rows)
    kv_bytes = 2 * int(own.sum()) * KV_HEADS * HEAD_DIM * 2
    return q, k, torch.randn_like(k), tables.cuda(), seq_lens.int().cuda(), shared, kv_bytes


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def sweep(name: str, launch, error, kv_bytes: int, configs) -> None:
    """Times ``launch(*config)`` for each config; ``error()`` after one launch: its relative error."""
    results = []
    for config in configs:
        try:
            launch(*config)
            err = error()
            ms = triton.testing.do_bench(lambda: launch(*config), return_mode="median")
        except Exception as e:  # e.g. out of shared memory
            print(f"  {config}: {type(e).__name__}")
            continue
        results.append((ms, config, err))
    print(name)
    for ms, config, err in sorted(results)[:8]:
        print(f"  {config}: {ms * 1e3:7.1f} us {kv_bytes / ms / 1e6:6.0f} GB/s (rel err {err:.1e})")


def main_shared() -> None:
    q, k, v, tables, seq_lens, shared, kv_bytes = shared_batch()
    scale = HEAD_DIM ** -0.5
    ref = triton_ops.paged_decode_attention(q, k, v, tables, seq_lens, scale, num_splits=1)
    cascade = triton_ops.paged_decode_attention(q, k, v, tables, seq_lens, scale, shared=shared)
    print(f"cascade vs plain decode: rel err {rel_err(cascade, ref):.1e}; "
          f"plain decode {triton.testing.do_bench(lambda: triton_ops.paged_decode_attention(q, k, v, tables, seq_lens, scale, num_splits=1), return_mode='median') * 1e3:.1f} us, "
          f"cascade (both kernels, today) {triton.testing.do_bench(lambda: triton_ops.paged_decode_attention(q, k, v, tables, seq_lens, scale, shared=shared), return_mode='median') * 1e3:.1f} us")
    slots, group = triton_ops._SHARED_SPLITS, HEADS // KV_HEADS
    part_o = torch.empty(BATCH, HEADS, slots, HEAD_DIM, dtype=torch.float32, device="cuda")
    part_lse = torch.empty(BATCH, HEADS, slots, dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)

    def shared_kernel(block_m, block_n, warps, stages):
        triton_ops._shared_prefix_kernel[(triton.cdiv(BATCH * group, block_m), KV_HEADS, slots)](
            q, k, v, shared.blocks, shared.length, shared.rows, part_o, part_lse, scale * triton_ops._LOG2E,
            BATCH * group, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            NUM_HEADS=HEADS, GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK, SHARED_SPLITS=slots,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=HEAD_DIM, DOT_PRECISION="tf32",
            num_warps=warps, num_stages=stages)

    def decode_kernel(block_n, warps, stages):
        triton_ops._decode_split_kernel[(BATCH, KV_HEADS, 1)](
            q, k, v, tables, seq_lens, shared.length, shared.rows, out, part_o, part_lse, scale * triton_ops._LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            k.stride(0), k.stride(1), k.stride(2),
            NUM_HEADS=HEADS, GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK, NUM_SPLITS=1, SHARED_SLOTS=slots,
            BLOCK_G=16, BLOCK_N=block_n, BLOCK_D=HEAD_DIM, DOT_PRECISION="tf32", num_warps=warps, num_stages=stages)

    def error():
        return rel_err(out, ref)

    shared_kernel(64, 64, 4, 3)  # the partials the decode kernel merges
    sweep(f"decode kernel (own keys + merge), {kv_bytes / 1e6:.0f} MB of own K/V; today (64, 4, default)",
          decode_kernel, error, kv_bytes, itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)))
    sweep("shared-prefix kernel (BLOCK_M, BLOCK_N, warps, stages); today (64, 64, 4, default)",
          shared_kernel, lambda: (decode_kernel(64, 4, 3), error())[1], 2 * SHARED * KV_HEADS * HEAD_DIM * 2,
          itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))


def main() -> None:
    for name, heads, kv_heads in [("qwen3-0.6b", 16, 8), ("qwen2.5-1.5b", 12, 2)]:
        q, k, v, tables, seq_lens, kv_bytes = mixed_batch(heads, kv_heads)
        out = torch.empty_like(q)
        ref = triton_ops.paged_decode_attention(q, k, v, tables, seq_lens, HEAD_DIM ** -0.5, num_splits=1)
        group = heads // kv_heads

        def launch(block_n, warps, stages):
            triton_ops._decode_split_kernel[(len(q), kv_heads, 1)](
                q, k, v, tables, seq_lens, seq_lens, seq_lens, out, out, out, HEAD_DIM ** -0.5 * triton_ops._LOG2E,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
                k.stride(0), k.stride(1), k.stride(2),
                NUM_HEADS=heads, GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK, NUM_SPLITS=1, SHARED_SLOTS=0,
                BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=HEAD_DIM,
                DOT_PRECISION="tf32", num_warps=warps, num_stages=stages)

        sweep(f"{name}: {heads}/{kv_heads} heads, {kv_bytes / 1e6:.0f} MB of K/V; (BLOCK_N, warps, stages), "
              "today (64, 4, default)", launch, lambda: rel_err(out, ref),
              kv_bytes, itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)))


if __name__ == "__main__":
    main_shared() if "--shared-prefix" in sys.argv else main()
