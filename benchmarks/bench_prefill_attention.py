"""Prefill attention of fresh prompts: torch's varlen FlashAttention (what the Triton backend runs
for a step whose prompts have no cached context) against the paged Triton prefill kernel (what it
runs otherwise), per prompt mix and head layout (q heads / KV heads / head_dim of Qwen3-0.6B,
Qwen2.5-1.5B, SmolLM2, and a head_dim-256 one), bf16, block 16. Median of
``triton.testing.do_bench``; outputs compared.

    python -m benchmarks.bench_prefill_attention   # on a GPU, from the repository root
"""

from __future__ import annotations

import torch
import triton

from vllm_lite.attention.triton_ops import (
    _VARLEN_GQA_KW,
    paged_prefill_attention,
    store_kvcache,
    varlen_attn,
)

LAYOUTS = {
    "qwen3-0.6b": (16, 8, 128),
    "qwen2.5-1.5b": (12, 2, 128),
    "smollm2-135m": (9, 3, 64),
    "head_dim 256": (8, 4, 256),
}
BLOCK = 16
MIXES = {
    "8 x 1024": [1024] * 8,
    "15 x U(100,1024)": None,
    "64 x 128": [128] * 64,
    "2 x 4096": [4096] * 2,
    "1 x 8192": [8192],
}


def main() -> None:
    for layout, (heads, kv_heads, head_dim) in LAYOUTS.items():
        print(f"{layout}: {heads} q heads, {kv_heads} KV heads, head_dim {head_dim}")
        compare(heads, kv_heads, head_dim)


def compare(heads: int, kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, lens in MIXES.items():
        lens = lens or torch.randint(100, 1025, (15,), generator=gen).tolist()
        n = sum(lens)
        q = torch.randn(n, heads, head_dim, dtype=torch.bfloat16, device="cuda")
        k, v = (
            torch.randn(n, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
            for _ in range(2)
        )
        blocks = [(x + BLOCK - 1) // BLOCK for x in lens]
        perm = torch.randperm(sum(blocks), generator=gen).int()
        tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
        slots, at = [], 0
        for i, (x, b) in enumerate(zip(lens, blocks)):
            tables[i, :b] = perm[at : at + b]
            at += b
            slots += [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(x)]
        tables = tables.cuda()
        k_cache = torch.zeros(
            sum(blocks), BLOCK, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda"
        )
        v_cache = torch.zeros_like(k_cache)
        store_kvcache(k, v, k_cache, v_cache, torch.tensor(slots, device="cuda"))
        qsl = torch.tensor(
            [0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda"
        )
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        scale = head_dim**-0.5

        def flash():
            return varlen_attn(
                q,
                k,
                v,
                qsl,
                qsl,
                max(lens),
                max(lens),
                scale=scale,
                window_size=(-1, 0),
                **_VARLEN_GQA_KW,
            )

        def paged():
            return paged_prefill_attention(
                q, k_cache, v_cache, tables, qsl, seq_lens, max(lens), scale
            )

        a, b = flash().float(), paged().float()
        err = ((a - b).norm() / a.norm()).item()
        t_flash = triton.testing.do_bench(flash, return_mode="median") * 1e3
        t_paged = triton.testing.do_bench(paged, return_mode="median") * 1e3
        print(
            f"  {name:18s} {n:5d} tokens: varlen FlashAttention {t_flash:7.1f} us, paged Triton {t_paged:7.1f} us "
            f"({t_flash / t_paged:.2f}x), relative difference {err:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
