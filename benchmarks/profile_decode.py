"""Where the time of one decode step goes (GPU only): host work vs. GPU work, and the top GPU
kernels of one step, at the throughput workload's full batch (256 sequences, dummy weights).

    python -m benchmarks.profile_decode --model-config qwen3-0.6b
    python -m benchmarks.profile_decode --shared-prefix 1024      # bench throughput --dataset shared-prefix
    python -m benchmarks.profile_decode --sampling extras         # penalties + logprobs=5 on every request
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.entrypoints.benchmark import (
    DEFAULT_LENS,
    EXTRAS,
    Workload,
    model_folder,
    prompts_pending,
    weight_and_kv_bytes,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="profiles rank 0's kernels"
    )
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="N",
        help="every prompt: one N-token system prompt, then 128 own tokens (prefix caching)",
    )
    parser.add_argument("--sampling", choices=["default", "extras"], default="default")
    args = parser.parse_args()
    extras = EXTRAS if args.sampling == "extras" else {}

    folder = model_folder(args.model_config)
    llm = LLM(
        folder,
        load_format="dummy",
        max_model_len=2048,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    engine, runner = llm.engine, llm.engine.runner
    vocab = engine.hf_config.vocab_size
    work = (
        Workload.shared_prefix(
            args.num_seqs, args.shared_prefix, *DEFAULT_LENS["shared-prefix"], vocab, 0
        )
        if args.shared_prefix
        else Workload.random(args.num_seqs, (100, 1024), (100, 1024), vocab, 0)
    )
    for prompt in work.prompts:
        engine.add_request(
            prompt,
            SamplingParams(
                temperature=1.0, max_tokens=1024, ignore_eos=True, detokenize=False, **extras
            ),
        )
    while prompts_pending(engine):
        engine.step()
    engine.overlap = False  # drain the step in flight; the loop below runs steps one by one
    engine.step()

    rows = []
    for _ in range(args.steps):
        start, after_exec, after_sample = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        t0 = time.perf_counter()
        batch = engine.scheduler.schedule()
        step = runner.prepare(batch)
        t1 = time.perf_counter()
        start.record()
        logits = runner.execute(step)
        after_exec.record()
        sampling = engine._sampling_batch(batch.seqs)
        tokens = engine.sampler(logits, sampling, engine.generator)
        after_sample.record()
        t2 = time.perf_counter()
        token_ids = tokens.tolist()
        t3 = time.perf_counter()
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, token_ids):
            seq.num_computed_tokens += n
            seq.token_ids.append(token)
            engine._accept_token(seq, len(seq) - 1, token)
        t4 = time.perf_counter()
        rows.append(
            (
                1e3 * (t1 - t0),
                1e3 * (t2 - t1),
                1e3 * (t3 - t2),
                1e3 * (t4 - t3),
                start.elapsed_time(after_exec),
                after_exec.elapsed_time(after_sample),
                sum(s.num_computed_tokens for s in batch.seqs),
            )
        )
    med = [statistics.median(c) for c in zip(*rows)]
    weights, kv_per_token = weight_and_kv_bytes(engine.hf_config)
    floor_ms = (weights.read_by(len(batch.seqs)) + med[6] * kv_per_token) / 3.0e12 * 1e3
    print(
        f"\ndecode step, {len(batch.seqs)} seqs, {med[6]:.0f} context tokens (median of {args.steps} steps)"
    )
    print(
        f"  host: schedule+prepare {med[0]:.2f} ms | launch model+sampler {med[1]:.2f} ms | "
        f"wait for GPU {med[2]:.2f} ms | append/stop checks {med[3]:.2f} ms"
    )
    print(
        f"  GPU:  model (graph) {med[4]:.2f} ms | sampler {med[5]:.2f} ms | "
        f"bytes floor at 3.0 TB/s {floor_ms:.2f} ms"
    )
    print(
        f"  wall per step {sum(med[:4]):.2f} ms (steps run one by one; the engine overlaps the host work "
        f"of one step with the GPU work of the previous one)"
    )

    batch = engine.scheduler.schedule()
    step = runner.prepare(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        logits = runner.execute(step)
        engine.sampler(logits, engine._sampling_batch(batch.seqs), engine.generator).tolist()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    total = sum(e.self_device_time_total for e in events)
    nccl = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower())
    if total:
        print(
            f"all-reduce/all-gather (NCCL) kernels: {nccl / 1e3:.2f} ms of {total / 1e3:.2f} ms GPU time "
            f"on rank 0 ({100 * nccl / total:.1f}%)"
        )
    llm.close()


if __name__ == "__main__":
    main()
