"""The balanced decode kernel (equal keys per program) against the split kernel, per KV-head
layout and batch shape (issue 9: few KV heads left most SMs idle behind the longest contexts).

Each launch is captured in a CUDA graph (as the engine runs decode steps) and replayed 50 times;
median of 5 such timings, reported as GB/s of K/V read. The split kernel gets the split count the
engine's graphs get (``max_seq_len`` = 4096, nano-vllm's max_model_len); the balanced one is
swept over programs per SM and minimum span. Outputs are compared (bf16, relative error).

    python -m benchmarks.bench_decode_balanced   # on a GPU, from the repository root
"""
from __future__ import annotations

import statistics

import torch

from vllm_lite.attention import triton_ops
from vllm_lite.attention.triton_ops import balanced_decode_attention, paged_decode_attention

# (q heads, kv heads, head_dim): the benchmark's shapes, and Qwen2.5-7B's per rank at tp 2 and 4
LAYOUTS = {"qwen3-0.6b": (16, 8, 128), "qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128),
           "qwen2.5-7b/tp2": (14, 2, 128), "qwen2.5-7b/tp4": (7, 1, 128), "smollm2-135m": (9, 3, 64)}
BATCHES = {"256 x U(100,1600)": (256, 100, 1600), "64 x U(100,1600)": (64, 100, 1600),
           "16 x U(1000,4000)": (16, 1000, 4000), "1 x 4000": (1, 4000, 4000)}
BLOCK = 16


def batch(heads: int, kv_heads: int, head_dim: int, num: int, lo: int, hi: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (num,), generator=gen)
    blocks = (lens + BLOCK - 1) // BLOCK
    perm = torch.randperm(int(blocks.sum()), generator=gen).int()
    tables = torch.zeros(num, 4096 // BLOCK, dtype=torch.int32)  # as wide as max_model_len 4096
    at = 0
    for i, n in enumerate(blocks.tolist()):
        tables[i, :n] = perm[at:at + n]
        at += n
    k = torch.randn(len(perm), BLOCK, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(num, heads, head_dim, dtype=torch.bfloat16, device="cuda")
    return q, k, torch.randn_like(k), tables.cuda(), lens.int().cuda(), 2 * int(lens.sum()) * kv_heads * head_dim * 2


def graph_us(fn) -> float:
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 50)
    return statistics.median(times)


def main() -> None:
    print(torch.cuda.get_device_name(), triton_ops._num_sms(torch.device("cuda")), "SMs")
    for name, (heads, kv_heads, head_dim) in LAYOUTS.items():
        for label, (num, lo, hi) in BATCHES.items():
            q, k, v, tables, lens, kv_bytes = batch(heads, kv_heads, head_dim, num, lo, hi)
            scale = head_dim ** -0.5
            out_split, out_bal = torch.empty_like(q), torch.empty_like(q)
            split_us = graph_us(lambda: paged_decode_attention(q, k, v, tables, lens, scale, out=out_split,
                                                               max_seq_len=4096))
            row = [f"{name:15s} {label:18s} split {split_us:7.1f} us {kv_bytes / split_us / 1e3:5.0f} GB/s |"]
            best = None
            for per_sm in (2, 4, 8):
                for min_span in (64, 128, 256):
                    programs = -(-per_sm * triton_ops._num_sms(q.device) // kv_heads)
                    us = graph_us(lambda: balanced_decode_attention(q, k, v, tables, lens, scale, out=out_bal,
                                                                    num_programs=programs, min_span=min_span))
                    err = ((out_bal.float() - out_split.float()).norm() / out_split.float().norm()).item()
                    assert err < 1e-2, (name, label, per_sm, min_span, err)
                    if best is None or us < best[0]:
                        best = (us, per_sm, min_span)
                    if (per_sm, min_span) == (triton_ops._BALANCED_PROGRAMS_PER_SM, triton_ops._MIN_SPAN):
                        row.append(f"balanced (default {per_sm}/SM, span >= {min_span}) {us:7.1f} us "
                                   f"{kv_bytes / us / 1e3:5.0f} GB/s |")
            row.append(f"best {best[0]:7.1f} us ({best[1]}/SM, span >= {best[2]}) {split_us / best[0]:.2f}x")
            print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
