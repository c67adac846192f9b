"""Where the time of one whole run goes (GPU only): every engine step's wall time next to what it
scheduled (prefill tokens, decode rows), grouped by kind, then the top GPU kernels of a second,
profiled run. Steps run as the engine runs them (overlapped), so a step's wall time is mostly the
GPU work of the step before it.

    python -m benchmarks.profile_run --shared-prefix 1024     # bench throughput --dataset shared-prefix
    python -m benchmarks.profile_run --dataset nano-vllm
"""

from __future__ import annotations

import argparse
import time

import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.entrypoints.benchmark import (
    DEFAULT_LENS,
    Workload,
    model_folder,
    prompts_pending,
    record_steps,
)
from vllm_lite.worker.model_runner import ModelRunner


def add_requests(llm: LLM, work: Workload) -> None:
    for prompt, n in zip(work.prompts, work.output_lens):
        llm.engine.add_request(
            prompt, SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, detokenize=False)
        )


def run(llm: LLM, work: Workload, log: list) -> list[tuple[int, int, float]]:
    """(prefill tokens, decode rows, wall ms) of each step of one run of the workload; ``log``:
    ``record_steps(llm.engine)``."""
    engine = llm.engine
    add_requests(llm, work)
    log.clear()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return [(tokens - decodes, decodes, 1e3 * seconds) for decodes, tokens, _, seconds in log]


def prefill_phase(llm: LLM, work: Workload, profile: bool) -> None:
    """Wall time of the steps until every prompt is computed (the run's prefill phase), and with
    ``profile`` the GPU kernel time inside it: far less kernel time than wall time means the
    host (or a gap between steps) is the bound there, not the GPU."""
    engine = llm.engine
    add_requests(llm, work)
    prof = (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        if profile
        else None
    )
    torch.cuda.synchronize()
    t0, steps = time.perf_counter(), 0
    if prof:
        prof.start()
    while prompts_pending(engine):
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0)
    if prof:
        prof.stop()
    while engine.has_unfinished_requests():
        engine.step()
    line = f"prefill phase: {steps} steps, wall {wall:.0f} ms"
    if prof:
        events = prof.key_averages()
        line += (
            f" (profiled), GPU kernels {sum(e.self_device_time_total for e in events) / 1e3:.0f} ms"
        )
        print(events.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", default="qwen3-0.6b")
    parser.add_argument("--dataset", choices=["random", "nano-vllm"], default="random")
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="N",
        help="every prompt: one N-token system prompt, then 128 own tokens",
    )
    parser.add_argument("--no-enable-prefix-caching", dest="caching", action="store_false")
    parser.add_argument(
        "--prefill-phase",
        action="store_true",
        help="only the prefill phase: its wall time (3 runs), then its GPU kernel time",
    )
    parser.add_argument(
        "--mixed-graph-max-tokens", type=int, help="ModelRunner.mixed_graph_max_tokens"
    )
    args = parser.parse_args()
    if args.mixed_graph_max_tokens:
        ModelRunner.mixed_graph_max_tokens = args.mixed_graph_max_tokens

    llm = LLM(
        model_folder(args.model_config),
        load_format="dummy",
        max_model_len=4096,
        enable_prefix_caching=args.caching,
    )
    vocab = llm.engine.hf_config.vocab_size
    log = record_steps(llm.engine)
    if args.shared_prefix:
        work = Workload.shared_prefix(
            256, args.shared_prefix, *DEFAULT_LENS["shared-prefix"], vocab, 0
        )
    elif args.dataset == "nano-vllm":
        work = Workload.nano_vllm()
    else:
        work = Workload.random(256, (100, 1024), (100, 1024), vocab, 0)
    run(llm, Workload.random(16, (16, 64), (4, 8), vocab, 1), log)  # warm-up
    llm.engine.reset_prefix_cache()
    if args.prefill_phase:
        for profile in (False, False, False, True):
            prefill_phase(llm, work, profile)
            llm.engine.reset_prefix_cache()
        llm.close()
        return
    steps = run(llm, work, log)
    total = sum(ms for *_, ms in steps)
    print(f"{len(steps)} steps, {total:.0f} ms")
    kinds = {"prefill only": [], "prefill + decode": [], "decode only": []}
    for p, d, ms in steps:
        kinds["decode only" if not p else "prefill only" if not d else "prefill + decode"].append(
            (p, d, ms)
        )
    for kind, rows in kinds.items():
        if rows:
            print(
                f"  {kind}: {len(rows)} steps, {sum(r[2] for r in rows):.0f} ms, "
                f"{sum(r[0] for r in rows)} prefill tokens, mean {sum(r[1] for r in rows) / len(rows):.0f} decode rows"
            )
    buckets: dict[int, list[float]] = {}
    for p, d, ms in kinds["decode only"]:
        buckets.setdefault(min(d // 32, 7), []).append(ms)
    for b, times in sorted(buckets.items()):
        print(
            f"    decode rows {32 * b:3d}..{32 * b + 31 if b < 7 else 'max'}: {len(times):4d} steps, "
            f"{sum(times):6.0f} ms, {sum(times) / len(times):.2f} ms per step"
        )
    print(
        "first 12 steps (prefill tokens, decode rows, wall ms):",
        ", ".join(f"({p}, {d}, {ms:.1f})" for p, d, ms in steps[:12]),
    )

    llm.engine.reset_prefix_cache()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(llm, work, log)
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profiled run: {gpu_total:.0f} ms of GPU kernels")
    print(events.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=70))
    llm.close()


if __name__ == "__main__":
    main()
