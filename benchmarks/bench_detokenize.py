"""Host cost of incremental detokenization per output token, as the engine pays it: every step
adds one token to each of N sequences. Compares the DecodeStream path (fast tokenizers) with the
window algorithm through ``tokenizer.decode`` (the previous path, still the one for slow
tokenizers), and reports the cost of a fresh process's first detokenized step. Then the engine's
own path, ``BatchDetokenizer.step`` over all sequences at once, with 1 new token a step (the
server) and ``TEXT_EVERY`` (8: offline requests with stop strings).

    python -m benchmarks.bench_detokenize                       # SmolLM2's tokenizer, 256 x 200
    python -m benchmarks.bench_detokenize --tokenizer PATH --num-seqs 64 --tokens 500
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def run(tokenizer, prompts, outputs, use_stream: bool) -> tuple[float, list[str]]:
    from vllm_lite.engine.detokenizer import IncrementalDetokenizer

    detoks = [IncrementalDetokenizer(tokenizer, p, True, use_stream=use_stream) for p in prompts]
    t0 = time.perf_counter()
    for step in range(len(outputs[0])):
        for d, out in zip(detoks, outputs):
            d.add(out[step])
    for d in detoks:
        d.flush()
    return time.perf_counter() - t0, [d.text for d in detoks]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--tokenizer", help="HF tokenizer folder (default: SmolLM2-135M-Instruct's)"
    )
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=200, help="output tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from vllm_lite.default_model import default_model_path
    from vllm_lite.engine.detokenizer import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_model_path())
    print(
        f"tokenizer {type(tokenizer).__name__} ({len(tokenizer)} tokens) loaded in {time.perf_counter() - t0:.2f} s"
    )

    # a fresh process's first step (every sequence adds its first token), before anything is warm
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    prompts = [[rng.choice(ordinary) for _ in range(100)] for _ in range(args.num_seqs)]
    outputs = [[rng.choice(ordinary) for _ in range(args.tokens)] for _ in range(args.num_seqs)]
    for use_stream in (True, False):
        t0 = time.perf_counter()
        first = [IncrementalDetokenizer(tokenizer, p, True, use_stream=use_stream) for p in prompts]
        for d, out in zip(first, outputs):
            d.add(out[0])
        print(
            f"first step, {'stream' if use_stream else 'window'}: {1e3 * (time.perf_counter() - t0):.2f} ms "
            f"for {args.num_seqs} sequences (includes creating them)"
        )

    n = args.num_seqs * args.tokens

    def timed(runner, *extra) -> list[float]:
        """Seconds of ``args.repeats`` runs; every text must equal tokenizer.decode."""
        times = []
        for _ in range(args.repeats):
            seconds, texts = runner(tokenizer, prompts, outputs, *extra)
            times.append(seconds)
        assert all(
            t == tokenizer.decode(o, skip_special_tokens=True) for t, o in zip(texts, outputs)
        )
        return times

    results = {}
    for use_stream in (False, True):
        times = timed(run, use_stream)
        results[use_stream] = statistics.median(times)
        name = "DecodeStream" if use_stream else "window + tokenizer.decode (old)"
        print(
            f"{name:32s} {1e6 * results[use_stream] / n:7.2f} us/token  (median of {args.repeats}, "
            f"{args.num_seqs} seqs x {args.tokens} tokens, {min(times):.3f}..{max(times):.3f} s per run)"
        )
    print(
        f"speed-up {results[False] / results[True]:.1f}x; texts equal tokenizer.decode(output ids)"
    )
    from vllm_lite.engine.llm_engine import TEXT_EVERY

    for per_step in (1, TEXT_EVERY):
        times = timed(run_batched, per_step)
        print(
            f"batched, {per_step} token(s) a step{'':9s} "
            f"{1e6 * statistics.median(times) / n:7.2f} us/token  (median of {args.repeats}, "
            f"{min(times):.3f}..{max(times):.3f} s per run)"
        )


def run_batched(tokenizer, prompts, outputs, per_step: int) -> tuple[float, list[str]]:
    """What the engine's output processor does: every sequence's new tokens in one step call."""
    from vllm_lite.engine.detokenizer import BatchDetokenizer

    batch = BatchDetokenizer(tokenizer)
    states = [batch.new_state(p) for p in prompts]
    t0 = time.perf_counter()
    for step in range(0, len(outputs[0]), per_step):
        for s, out in zip(states, outputs):
            s.ids += out[step : step + per_step]
        batch.step(states)
    for s in states:
        batch.flush(s)
    return time.perf_counter() - t0, [s.text for s in states]


if __name__ == "__main__":
    main()
