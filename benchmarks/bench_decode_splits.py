"""How many splits the paged decode kernel should use at large batches (issue 9).

256 sequences of mixed context lengths (uniform in 100..1600, as the nano-vllm workload has
mid-run), head_dim 128, bf16, block size 16, for the KV-head layouts of the benchmark's model
shapes; each forced split count is timed (median of ``triton.testing.do_bench``) and reported as
GB/s of K/V read, next to the count ``choose_num_splits`` picks.

    python -m benchmarks.bench_decode_splits   # on a GPU, from the repository root
"""

from __future__ import annotations

import torch
import triton

from vllm_lite.attention.triton_ops import choose_num_splits, paged_decode_attention

SHAPES = {
    "qwen3-0.6b": (16, 8),
    "qwen2.5-1.5b": (12, 2),
    "qwen2.5-7b": (28, 4),
    "llama-3.2-1b": (32, 8),
}
HEAD_DIM, BLOCK, BATCH = 128, 16, 256


def mixed_batch(heads: int, kv_heads: int, seed: int = 0):
    """BATCH decode queries over scattered paged K/V of contexts uniform in 100..1600 keys:
    (q, k_cache, v_cache, block_tables, seq_lens, bytes of K/V the step reads)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(100, 1601, (BATCH,), generator=gen)
    blocks = (lens + BLOCK - 1) // BLOCK
    num_blocks = int(blocks.sum())
    k = torch.randn(num_blocks, BLOCK, kv_heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    perm = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(BATCH, int(blocks.max()), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks.tolist()):
        tables[i, :n] = perm[at : at + n]
        at += n
    q = torch.randn(BATCH, heads, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    return (
        q,
        k,
        torch.randn_like(k),
        tables.cuda(),
        lens.int().cuda(),
        2 * int(lens.sum()) * kv_heads * HEAD_DIM * 2,
    )


def main() -> None:
    for name, (heads, kv_heads) in SHAPES.items():
        q, k, v, tables, seq_lens, kv_bytes = mixed_batch(heads, kv_heads)
        auto = choose_num_splits(BATCH * kv_heads, int(seq_lens.max()), q.device)
        print(
            f"{name}: {heads}/{kv_heads} heads, {BATCH} seqs, {int(seq_lens.sum())} context tokens, "
            f"{kv_bytes / 1e6:.0f} MB of K/V per layer; auto splits: {auto}"
        )
        for splits in (1, 2, 4, 8):
            ms = triton.testing.do_bench(
                lambda: paged_decode_attention(
                    q, k, v, tables, seq_lens, HEAD_DIM**-0.5, num_splits=splits
                ),
                return_mode="median",
            )
            print(f"  splits {splits}: {ms * 1e3:7.1f} us  {kv_bytes / ms / 1e6:6.0f} GB/s")


if __name__ == "__main__":
    main()
