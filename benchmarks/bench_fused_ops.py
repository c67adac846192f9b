"""Time the fused Triton RMSNorm / RoPE / SiLU-and-mul against the layers' eager PyTorch code on
a GPU (median of triton.testing.do_bench), at Qwen3-0.6B's shapes in bf16: hidden 1024, 16 q
heads, 8 KV heads, head_dim 128, intermediate 3072, 28 layers.

    python -m benchmarks.bench_fused_ops   # from the repository root
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton

from vllm_lite.layers.activation import SiluAndMul
from vllm_lite.layers.fused_ops import rms_norm, rotary, silu_and_mul
from vllm_lite.layers.norm import RMSNorm
from vllm_lite.layers.rotary import RotaryEmbedding

HIDDEN, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE, NUM_LAYERS = 1024, 16, 8, 128, 3072, 28
MAX_POS, DTYPE = 40960, torch.bfloat16


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def cases(num_tokens: int):
    """(name, eager fn, fused fn, bytes the fused kernel moves, times per layer)."""
    dev, el = "cuda", torch.tensor([], dtype=DTYPE).element_size()
    norm = RMSNorm(HIDDEN, 1e-6, DTYPE).to(dev)
    head_norm = RMSNorm(HEAD_DIM, 1e-6, DTYPE).to(dev)
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rope = RotaryEmbedding(config, HEAD_DIM, MAX_POS).to(dev)
    act = SiluAndMul()

    x = torch.randn(num_tokens, HIDDEN, dtype=DTYPE, device=dev)
    res = torch.randn_like(x)
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, dtype=DTYPE, device=dev)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(-1, NUM_HEADS, HEAD_DIM), k.view(-1, NUM_KV_HEADS, HEAD_DIM)
    positions = torch.randint(0, MAX_POS, (num_tokens,), device=dev)
    gate_up = torch.randn(num_tokens, 2 * INTERMEDIATE, dtype=DTYPE, device=dev)

    qk_bytes = 2 * num_tokens * (q_size + kv_size) * el  # read + write of q and k
    return [
        (
            "add + rms_norm",
            lambda: norm.forward_native(x, res),
            lambda: rms_norm(x, norm.weight, norm.eps, res),
            4 * num_tokens * HIDDEN * el,
            2,
        ),
        (
            "q_norm + k_norm (strided)",
            lambda: (head_norm.forward_native(q), head_norm.forward_native(k)),
            lambda: (rms_norm(q, head_norm.weight, 1e-6), rms_norm(k, head_norm.weight, 1e-6)),
            qk_bytes,
            1,
        ),
        (
            "rotary q + k (strided)",
            lambda: rope.forward_native(positions, q, k),
            lambda: rotary(positions, q, k, rope.cos, rope.sin),
            qk_bytes + 2 * num_tokens * HEAD_DIM * 4,
            1,
        ),
        (
            "silu_and_mul",
            lambda: act.forward_native(gate_up),
            lambda: silu_and_mul(gate_up),
            3 * num_tokens * INTERMEDIATE * el,
            1,
        ),
    ]


def main() -> None:
    assert torch.cuda.is_available(), "a GPU benchmark"
    print(f"GPU: {torch.cuda.get_device_name()}, Qwen3-0.6B shapes, {DTYPE}")
    print(
        f"  {'op':<28} {'T':>5} {'torch us':>9} {'fused us':>9} {'speedup':>8} {'fused GB/s':>11}"
    )
    for num_tokens in (256, 8192):
        torch_layer = fused_layer = 0.0
        for name, eager, fused, nbytes, per_layer in cases(num_tokens):
            t_ms, f_ms = bench_ms(eager), bench_ms(fused)
            torch_layer += per_layer * t_ms
            fused_layer += per_layer * f_ms
            print(
                f"  {name:<28} {num_tokens:>5} {t_ms * 1e3:9.1f} {f_ms * 1e3:9.1f} "
                f"{t_ms / f_ms:7.2f}x {nbytes / f_ms / 1e6:11.0f}"
            )
        print(
            f"  {f'all of it x {NUM_LAYERS} layers':<28} {num_tokens:>5} {NUM_LAYERS * torch_layer * 1e3:9.1f} "
            f"{NUM_LAYERS * fused_layer * 1e3:9.1f} {torch_layer / fused_layer:7.2f}x"
        )


if __name__ == "__main__":
    main()
