"""The fused MoE kernel on a GPU at three benchmark models' expert shapes, bf16, one layer:

1. checks it against ``fused_experts_torch`` on fresh random inputs (rel. error < 1e-2);
2. times it (``triton.testing.do_bench`` median, L2 flushed between replays) inside a CUDA
   graph at decode batches 1, 16, 64, 256 and a prefill of 4096 tokens, with the bandwidth it
   reaches over the bytes it must read: the experts the batch touches (under uniform routing
   E * (1 - (1 - k/E)^T) of them; the count of this batch's routing is used) x 3 * H * I * 2
   bytes, plus the hidden states in and out; and TFLOP/s;
3. with ``--tune``: for each shape and token bucket, times a few launch configs per GEMM
   (without graphs: do_bench's cache flush keeps the host ahead), prints the best as a table
   for ``TUNED_CONFIGS`` in vllm_lite/layers/fused_moe.py, and re-times (2) with it. Stops
   tuning at ``--budget-s`` (counted from the start) and prints what it has.

    python -m benchmarks.bench_fused_moe [--tune] [--budget-s 150]
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
from triton.runtime.errors import OutOfResources, PTXASError

from vllm_lite.layers import fused_moe
from vllm_lite.layers.fused_moe import (
    M_BUCKETS,
    GemmConfig,
    MoEConfig,
    _expert_gemm,
    align_assignments,
    default_config,
    fused_experts,
    fused_experts_torch,
)

# name: (experts, top-k, hidden, intermediate)
SHAPES = {
    "Qwen3-30B-A3B": (128, 8, 2048, 768),
    "Mixtral-8x7B": (8, 2, 4096, 14336),
    "Qwen1.5-MoE-A2.7B": (60, 4, 2048, 1408),
}
BATCHES = (1, 16, 64, 256, 4096)
DTYPE, DEVICE = torch.bfloat16, "cuda"
START = time.perf_counter()


def log(*args) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s]", *args, flush=True)


def experts_of(name: str):
    num_experts, _, hidden, inter = SHAPES[name]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=DTYPE, generator=g)
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=DTYPE, generator=g)
    return w13.mul_(hidden**-0.5), w2.mul_(inter**-0.5)


def batch_of(name: str, num_tokens: int, seed: int):
    """Hidden states and uniform random routing (k distinct experts, softmax weights)."""
    num_experts, top_k, hidden, _ = SHAPES[name]
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=DTYPE, generator=g)
    scores = torch.rand(num_tokens, num_experts, device=DEVICE, generator=g)
    weights, ids = scores.topk(top_k, dim=1)
    return x, weights.softmax(dim=1), ids


def copy_bandwidth() -> float:
    """Device copy, bytes read + written per second: the ceiling to compare against."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return (
        2
        * src.numel()
        / triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        / 1e-3
    )


def graph_ms(run) -> float:
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return triton.testing.do_bench(graph.replay, return_mode="median")


def time_shapes(copy_bw: float, label: str) -> bool:
    """Check and time every shape and batch; False if a check failed."""
    ok = True
    log(
        f"{label}: {'shape':<18} {'T':>5} {'experts':>13} {'rel err':>8} {'us':>8} {'GB/s':>6} "
        f"{'of copy':>7} {'TFLOP/s':>7}"
    )
    for name, (num_experts, top_k, hidden, inter) in SHAPES.items():
        w13, w2 = experts_of(name)
        for num_tokens in BATCHES:
            x, weights, ids = batch_of(name, num_tokens, seed=num_tokens)
            out = fused_experts(x, w13, w2, weights, ids)
            ref = fused_experts_torch(x, w13, w2, weights, ids).float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ok &= err < 1e-2
            ms = graph_ms(lambda: fused_experts(x, w13, w2, weights, ids))
            touched = ids.unique().numel()
            expected = num_experts * (1 - (1 - top_k / num_experts) ** num_tokens)
            nbytes = touched * 3 * hidden * inter * 2 + 2 * num_tokens * hidden * 2
            flops = 2 * num_tokens * top_k * 3 * hidden * inter
            log(
                f"{label}: {name:<18} {num_tokens:>5} {touched:>5} ({expected:5.1f}) {err:8.1e}"
                f"{'' if err < 1e-2 else ' FAIL'} {ms * 1e3:8.1f} {nbytes / ms / 1e6:6.0f} "
                f"{nbytes / ms / 1e-3 / copy_bw:6.0%} {flops / ms / 1e9:7.1f}"
            )
    return ok


# ----------------------------------------------------------------------------- tuning


def block_m_candidates(rows: float) -> list[int]:
    if rows <= 4:
        return [16]
    if rows <= 24:
        return [16, 32]
    if rows <= 96:
        return [32, 64]
    return [64, 128]


def gemm_candidates(block_m: int, gated: bool) -> list[GemmConfig]:
    """A few tiles per regime (the default config is added to them); gate/up holds two
    accumulators, so its BLOCK_N counts twice."""
    if block_m <= 32 and gated:  # a weight stream: many programs, long K blocks
        return [
            GemmConfig(*c)
            for c in [(32, 128, 1, 4, 4), (64, 128, 1, 4, 3), (32, 64, 1, 4, 5), (32, 256, 1, 4, 2)]
        ]
    if block_m <= 32:
        return [
            GemmConfig(*c)
            for c in [
                (64, 128, 1, 4, 4),
                (64, 64, 1, 4, 5),
                (128, 128, 1, 4, 3),
                (64, 256, 1, 4, 2),
            ]
        ]
    if gated:
        return [
            GemmConfig(*c)
            for c in [(64, 64, 8, 4, 3), (64, 64, 8, 8, 4), (128, 64, 8, 8, 3), (64, 128, 8, 4, 3)]
        ]
    return [
        GemmConfig(*c)
        for c in [(128, 64, 8, 4, 3), (128, 64, 8, 8, 4), (256, 64, 8, 8, 3), (128, 128, 8, 8, 3)]
    ]


def gemm_us(run) -> float:
    try:
        run()
    except (OutOfResources, PTXASError):  # too much shared memory or registers for this GPU
        return float("inf")
    return triton.testing.do_bench(run, warmup=5, rep=25, return_mode="median") * 1e3


def tune_one(name: str, w13, w2, num_tokens: int) -> tuple[MoEConfig, float, float]:
    """The fastest (block_m, up, down) for this batch, its time and the default config's (us)."""
    num_experts, top_k, hidden, inter = SHAPES[name]
    x, weights, ids = batch_of(name, num_tokens, seed=1)
    weights, num_assign = weights.reshape(-1).contiguous(), num_tokens * top_k
    act = torch.empty(num_assign, inter, device=DEVICE, dtype=DTYPE)
    out = torch.empty(num_assign, hidden, device=DEVICE, dtype=DTYPE)
    default = default_config(num_experts, top_k, fused_moe.m_bucket(num_tokens))
    best, best_us, default_us = None, float("inf"), float("inf")
    for block_m in sorted(set(block_m_candidates(num_assign / num_experts)) | {default.block_m}):
        sorted_ids, bounds = align_assignments(ids, num_experts, block_m)
        ups, downs = gemm_candidates(block_m, True), gemm_candidates(block_m, False)
        if block_m == default.block_m:
            ups, downs = (
                list(dict.fromkeys([default.up] + ups)),
                list(dict.fromkeys([default.down] + downs)),
            )
        up_us = {
            c: gemm_us(
                lambda c=c: _expert_gemm(
                    x, w13, act, sorted_ids, bounds, None, num_assign, top_k, True, block_m, c
                )
            )
            for c in ups
        }
        down_us = {
            c: gemm_us(
                lambda c=c: _expert_gemm(
                    act, w2, out, sorted_ids, bounds, weights, num_assign, 1, False, block_m, c
                )
            )
            for c in downs
        }
        up, down = min(up_us, key=up_us.get), min(down_us, key=down_us.get)
        if up_us[up] + down_us[down] < best_us:
            best, best_us = MoEConfig(block_m, up, down), up_us[up] + down_us[down]
        if block_m == default.block_m:
            default_us = up_us[default.up] + down_us[default.down]
    return best, best_us, default_us


def tune(deadline: float) -> dict:
    """Decode buckets first (they decide serving throughput), all shapes, until the deadline."""
    table = {}
    weights = {name: experts_of(name) for name in SHAPES}
    order = [b for b in (1, 16, 64, 256, 4096, 1024) if b in M_BUCKETS]
    for bucket in order:
        for name, (num_experts, top_k, hidden, inter) in SHAPES.items():
            if time.perf_counter() > deadline:
                log(f"tune: budget spent; {name} bucket {bucket} and later left to the defaults")
                return table
            cfg, us, default_us = tune_one(name, *weights[name], bucket)
            table[num_experts, hidden, inter, bucket] = (
                cfg.block_m,
                tuple(cfg.up),
                tuple(cfg.down),
            )
            log(
                f"tune: {name:<18} T={bucket:<5} gemms {default_us:8.1f} us (default) -> "
                f"{us:8.1f} us {table[num_experts, hidden, inter, bucket]}"
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tune", action="store_true", help="sweep launch configs per shape and bucket"
    )
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="stop tuning this long after start"
    )
    args = parser.parse_args()
    assert torch.cuda.is_available(), "a GPU benchmark"
    copy_bw = copy_bandwidth()
    log(
        f"GPU: {torch.cuda.get_device_name()}, {DTYPE}, one layer; "
        f"device copy {copy_bw / 1e9:.0f} GB/s"
    )
    ok = time_shapes(copy_bw, "table")
    if args.tune:
        table = tune(START + args.budget_s)
        print(
            "\n# paste into vllm_lite/layers/fused_moe.py (H200, bf16):\n"
            "TUNED_CONFIGS: dict[tuple[int, int, int, int], tuple] = {",
            flush=True,
        )
        for key, value in table.items():
            print(f"    {key}: {value},")
        print("}", flush=True)
        fused_moe.TUNED_CONFIGS.update(table)
        ok &= time_shapes(copy_bw, "tuned")
    log("all checks passed" if ok else "CHECK FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
