"""Cold start as a user meets it, on a model shape with dummy weights: ``LLM(...)`` and its parts
(weights, the memory probe, the kernel warm-up, CUDA-graph capture), then the first token of the
first request and a first ``generate`` of a mixed batch (chunked prefill, decodes next to prefill
chunks, prefix-cache hits), each beside the same work repeated, and the Triton binaries compiled
inside them (should be none). Run it once with Triton's disk cache cold to see compile time:

    python -m benchmarks.cold_start --model-config qwen3-0.6b
    TRITON_CACHE_DIR=$(mktemp -d) python -m benchmarks.cold_start --model-config qwen3-0.6b
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.entrypoints.benchmark import model_folder
from vllm_lite.worker.model_runner import ModelRunner
from vllm_lite.worker.triton_variants import (
    compiled_variant_counts,
    describe,
    record_triton_variants,
)

PARTS = ("warm_up", "warm_up_kernels", "capture_cuda_graphs")


def timed_parts() -> dict[str, float]:
    """Seconds spent in each of ModelRunner's start-up methods, filled as they run."""
    spent: dict[str, float] = defaultdict(float)
    for name in PARTS:
        method = getattr(ModelRunner, name)

        def timed(self, *args, _method=method, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - t0

        setattr(ModelRunner, name, timed)
    return spent


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-config", default="qwen3-0.6b")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()

    spent = timed_parts()
    rng = random.Random(0)
    t0 = time.perf_counter()
    with record_triton_variants() as warm:
        llm = LLM(
            model_folder(args.model_config),
            load_format="dummy",
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
        )
    sync()
    start = time.perf_counter() - t0
    parts = ", ".join(f"{n} {spent[n]:.2f} s" for n in PARTS)
    print(f"LLM(...) {start:.2f} s (of which {parts}); {len(warm)} kernel variants launched")
    vocab = llm.engine.hf_config.vocab_size
    compiled = compiled_variant_counts()

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    def run(prompts, params) -> float:
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        sync()
        return time.perf_counter() - t0

    with record_triton_variants() as later:
        one = SamplingParams(max_tokens=1, ignore_eos=True)
        first = [run([prompt(100)], one) for _ in range(3)]
        print(
            f"first token of a 100-token request: first {first[0] * 1e3:.1f} ms, then "
            f"{first[1] * 1e3:.1f} ms, {first[2] * 1e3:.1f} ms"
        )
        shared = prompt(300)
        batch = [prompt(rng.randint(100, 1024)) for _ in range(48)] + [
            shared + prompt(50) for _ in range(16)
        ]
        params = [SamplingParams(max_tokens=rng.randint(16, 64), ignore_eos=True) for _ in batch]
        times = []
        for _ in range(3):
            llm.reset_prefix_cache()
            times.append(run(batch, params))
        print(
            f"generate of 64 mixed requests: first {times[0]:.3f} s, then {times[1]:.3f} s, {times[2]:.3f} s; "
            f"prefix-cache hit tokens {llm.engine.prefix_cache_hits}"
        )
    after = compiled_variant_counts()
    grown = {k: after[k] - compiled.get(k, 0) for k in after if after[k] != compiled.get(k, 0)}
    print(f"Triton binaries compiled after LLM(...): {sum(grown.values())} {grown or ''}")
    for key in sorted(later - warm):
        print("  new variant:", describe(key))
    llm.close()


if __name__ == "__main__":
    main()
