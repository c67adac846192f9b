"""What a prefill of a token count the process has not seen before costs over a second one of the
same count (GPU only; issue 11's time to first token): one request of L tokens, one output
token, prefix caching off, each L twice in a row, with and without the CUDA graphs of steps with
prefill tokens (on, off, on again: the order's share); then a bare bf16 GEMM of the Qwen3-0.6B MLP's
shape, first vs second call for each new M.

    python -m benchmarks.cold_shapes
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.entrypoints.benchmark import model_folder


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def one_request_prefills(mixed_graphs: bool) -> None:
    llm = LLM(
        model_folder("qwen3-0.6b"),
        load_format="dummy",
        max_model_len=2048,
        enable_prefix_caching=False,
    )
    if not mixed_graphs:  # steps with prefill tokens run eagerly, as before they had graphs
        llm.engine.runner.mixed_graphs = {}
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    rng = random.Random(1)
    lengths = rng.sample(range(100, 1025), 24)
    first, second = [], []
    for n in lengths:
        prompt = [rng.randrange(1000) for _ in range(n)]
        first.append(timed(lambda: llm.generate([prompt], params, use_tqdm=False)))
        second.append(timed(lambda: llm.generate([prompt], params, use_tqdm=False)))
    print(
        f"mixed graphs {'on ' if mixed_graphs else 'off'}: one request, prefill of L in 100..1024 (24 lengths): "
        f"first time {statistics.median(first):.1f} ms (median; {min(first):.1f}..{max(first):.1f}), "
        f"same L again {statistics.median(second):.1f} ms ({min(second):.1f}..{max(second):.1f})"
    )
    llm.close()


def main() -> None:
    for mixed_graphs in (True, False, True):
        one_request_prefills(mixed_graphs)

    rng = random.Random(2)
    w = torch.randn(1024, 6144, dtype=torch.bfloat16, device="cuda")
    first, second = [], []
    for m in rng.sample(range(100, 8192), 48):
        x = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
        first.append(timed(lambda: x @ w))
        second.append(timed(lambda: x @ w))
    print(
        f"GEMM [M, 1024] x [1024, 6144] bf16, 48 new M: first call {statistics.median(first) * 1e3:.0f} us "
        f"(median; max {max(first) * 1e3:.0f}), second {statistics.median(second) * 1e3:.0f} us"
    )


if __name__ == "__main__":
    main()
