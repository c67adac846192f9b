"""The host work of structured outputs per decode step, alone: 256 matchers of the throughput
benchmark's JSON schema (``bench_schema``) on SmolLM2's tokenizer advance by one token each and
fill the next bitmask. In the engine this runs on the grammar worker thread between a step's
tokens coming back and the next step's sampling, while the GPU runs the next forward pass; when
it takes longer than that forward pass, it is the step time (``structured_output.py``).

A fixed token trajectory (``--steps`` steps: each row's token drawn uniformly among those its
grammar allows) is replayed on fresh matchers for each way of doing the work:

  accept            BatchGrammarMatcher.batch_accept_token, one call for all rows
  accept chunks K   the same in K Python threads, each a share of the rows
  fill T            BatchGrammarMatcher(T threads).batch_fill_next_token_bitmask
  accept + fill T   both, one after the other (T = 1: what the worker runs)
  chunks K          K Python threads, each accepting and filling its share of the rows
                    (xgrammar releases the GIL), a one-thread BatchGrammarMatcher each
  worker job        StructuredOutputManager.advance_async, as the engine runs it (on the
                    worker thread: accept, publish the verdicts, fill with one thread)

    python -m benchmarks.bench_grammar [--rows 256] [--steps 64] [--repeats 3]
    TOKENIZER=<SmolLM2 tokenizer folder> python -m benchmarks.bench_grammar

Each line: ms per step, median over the repeats (min..max).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def tokenizer_folder() -> str:
    if os.environ.get("TOKENIZER"):
        return os.environ["TOKENIZER"]
    from vllm_lite.default_model import default_model_path

    return default_model_path()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import xgrammar as xgr
    from transformers import AutoTokenizer

    from vllm_lite.entrypoints.benchmark import bench_schema
    from vllm_lite.structured_output import (
        SWITCH_INTERVAL,
        StructuredOutputManager,
        StructuredOutputsParams,
        apply_bitmask,
    )

    # every way runs under the engine's GIL switch interval (set while its grammar worker lives)
    sys.setswitchinterval(SWITCH_INTERVAL)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder())
    vocab = len(tokenizer)
    manager = StructuredOutputManager(tokenizer, vocab, {tokenizer.eos_token_id})
    params = StructuredOutputsParams(json=bench_schema())
    rows = list(range(args.rows))

    def fresh() -> list:
        return [manager.matcher(params) for _ in rows]

    matchers, generator, trajectory = fresh(), torch.Generator().manual_seed(0), []
    for _ in range(args.steps):  # each row's next token: uniform among the allowed ones
        mask = manager.bitmask(matchers, rows, len(rows))
        logits = torch.rand(len(rows), vocab, generator=generator)
        apply_bitmask(logits, mask, None)
        tokens = logits.argmax(-1).tolist()
        assert all(code == 0 for code in manager.advance(matchers, tokens))
        trajectory.append(tokens)
    print(
        f"{args.rows} rows, {args.steps} steps of bench_schema, vocabulary {vocab}, "
        f"{os.cpu_count()} CPUs"
    )

    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    counts = [t for t in (1, 4, 8, 16) if t <= (os.cpu_count() or 1)]  # xgrammar caps them
    fillers = {t: xgr.BatchGrammarMatcher(t) for t in counts}

    def accept(ms, tokens) -> None:
        xgr.BatchGrammarMatcher.batch_accept_token(ms, tokens)

    def chunked(k: int):
        pool, parts = ThreadPoolExecutor(k), [rows[i::k] for i in range(k)]
        one = [xgr.BatchGrammarMatcher(1) for _ in range(k)]

        def part(i, ms, tokens) -> None:
            mine = [ms[r] for r in parts[i]]
            accept(mine, [tokens[r] for r in parts[i]])
            one[i].batch_fill_next_token_bitmask(mine, bitmask, parts[i])

        return lambda ms, tokens: list(pool.map(lambda i: part(i, ms, tokens), range(k)))

    def accept_chunked(k: int):
        pool, parts = ThreadPoolExecutor(k), [rows[i::k] for i in range(k)]

        def part(i, ms, tokens) -> None:
            accept([ms[r] for r in parts[i]], [tokens[r] for r in parts[i]])

        return lambda ms, tokens: list(pool.map(lambda i: part(i, ms, tokens), range(k)))

    ways = {"accept": accept}
    for k in (2, 4):
        ways[f"accept chunks {k}"] = accept_chunked(k)
    for t in counts:
        ways[f"fill {t}"] = lambda ms, tokens, t=t: fillers[t].batch_fill_next_token_bitmask(
            ms, bitmask, rows
        )
    for t in (1, max(counts)):
        ways[f"accept + fill {t}"] = lambda ms, tokens, t=t: (
            accept(ms, tokens),
            fillers[t].batch_fill_next_token_bitmask(ms, bitmask, rows),
        )
    for k in (2, 4, 8):
        ways[f"chunks {k}"] = chunked(k)
    ways["worker job"] = lambda ms, tokens: (  # what the engine runs: advance_async
        manager.advance_async(ms, rows, len(rows), lambda: tokens, bitmask).mask.result()
    )

    for name, way in ways.items():
        times = []
        for _ in range(args.repeats):
            ms, total = fresh(), 0.0
            for tokens in trajectory:
                t0 = time.perf_counter()
                way(ms, tokens)
                total += time.perf_counter() - t0
                if name.startswith("fill"):
                    accept(ms, tokens)  # untimed: the fill ways still walk the trajectory
            times.append(1e3 * total / len(trajectory))
        times.sort()
        print(
            f"  {name:<16} {statistics.median(times):6.2f} ms/step "
            f"({times[0]:.2f}..{times[-1]:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
