"""The sampler's GPU time on a decode step's logits (issues 9, 10): 256 rows x 151,936 (Qwen's
vocabulary), bf16 as the model returns them, temperature 0.6; the fused Gumbel-max kernel vs the
torch path it replaces (softmax, exponential noise, argmax), and the fused logprobs pass (k = 5)
vs torch's log_softmax + gather + rank + topk. Median of ``triton.testing.do_bench``.

    python -m benchmarks.bench_sampler   # on a GPU, from the repository root
"""

from __future__ import annotations

import torch
import triton

from vllm_lite.layers.fused_ops import gumbel_sample, token_logprobs
from vllm_lite.worker.logprobs import token_logprobs_native


def main() -> None:
    rows, vocab = 256, 151936
    logits = torch.randn(rows, vocab, device="cuda").to(torch.bfloat16)
    temperature = torch.full((rows,), 0.6, device="cuda")
    seeds = torch.arange(rows, device="cuda")

    def torch_path():
        probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
        return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)

    index = torch.arange(rows, device="cuda")
    tokens = torch_path()
    for name, fn in [
        ("sample: torch softmax + exponential race", torch_path),
        ("sample: fused Gumbel-max kernel", lambda: gumbel_sample(logits, temperature, seeds)),
        ("logprobs k=5: torch", lambda: token_logprobs_native(logits, index, tokens, 5)),
        ("logprobs k=5: fused kernel", lambda: token_logprobs(logits, index, tokens, 5)),
    ]:
        print(f"  {name:<42} {triton.testing.do_bench(fn, return_mode='median') * 1e3:8.1f} us")


if __name__ == "__main__":
    main()
