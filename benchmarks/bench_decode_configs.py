"""Launch configurations of the paged decode kernel at 256 sequences (issue 9): key tile
(BLOCK_N), warps and pipeline stages, one split, for the KV layouts of Qwen3-0.6B (16/8 heads)
and Qwen2.5-1.5B (12/2), contexts uniform in 100..1600, head_dim 128, bf16, block size 16.
Reports GB/s of K/V read (median of ``triton.testing.do_bench``), best first.

    python -m benchmarks.bench_decode_configs   # on a GPU, from the repository root
"""
from __future__ import annotations

import itertools

import torch
import triton

from benchmarks.bench_decode_splits import BLOCK, HEAD_DIM, mixed_batch
from vllm_lite.attention import triton_ops


def main() -> None:
    for name, heads, kv_heads in [("qwen3-0.6b", 16, 8), ("qwen2.5-1.5b", 12, 2)]:
        q, k, v, tables, seq_lens, kv_bytes = mixed_batch(heads, kv_heads)
        out = torch.empty_like(q)
        ref = triton_ops.paged_decode_attention(q, k, v, tables, seq_lens, HEAD_DIM ** -0.5, num_splits=1)
        group = heads // kv_heads
        results = []
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4)):
            def launch():
                triton_ops._decode_split_kernel[(len(q), kv_heads, 1)](
                    q, k, v, tables, seq_lens, seq_lens, seq_lens, out, out, out, HEAD_DIM ** -0.5 * triton_ops._LOG2E,
                    q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
                    k.stride(0), k.stride(1), k.stride(2),
                    NUM_HEADS=heads, GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK, NUM_SPLITS=1, SHARED_SLOTS=0,
                    BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=HEAD_DIM,
                    DOT_PRECISION="tf32", num_warps=warps, num_stages=stages)
            try:
                launch()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                ms = triton.testing.do_bench(launch, return_mode="median")
            except Exception as e:  # e.g. out of shared memory
                print(f"  BLOCK_N {block_n} warps {warps} stages {stages}: {type(e).__name__}")
                continue
            results.append((kv_bytes / ms / 1e6, block_n, warps, stages, ms, err))
        print(f"{name}: {heads}/{kv_heads} heads, {kv_bytes / 1e6:.0f} MB of K/V; today: BLOCK_N 64, 4 warps, default stages")
        for gbs, block_n, warps, stages, ms, err in sorted(results, reverse=True)[:8]:
            print(f"  BLOCK_N {block_n:3d} warps {warps} stages {stages}: {ms * 1e3:7.1f} us {gbs:6.0f} GB/s (rel err {err:.1e})")


if __name__ == "__main__":
    main()
