"""Host (Python) time of one engine decode step, part by part, with the model forward taken out.

On a GPU the throughput benchmark overlaps one step: the host schedules and launches step N+1
while step N runs, so host time above a decode step's few ms of GPU time is lost. This runs
the real engine on CPU with the model forward replaced by a fixed table of random bf16 logits
(returned at once), 256 sequences of the nano-vllm workload decoding (temperature 0.6,
ignore_eos, default SamplingParams otherwise), and times each part of ``LLMEngine.step``:

  schedule      Scheduler.schedule
  prepare       ModelRunner.prepare (step arrays) + the upload's host side
  sampling      LLMEngine._sampling_batch (the sampling parameters as tensors)
  grammar mask  LLMEngine._grammar_mask (structured outputs: the masks, waited for or filled)
  process       LLMEngine._process: read back, stop checks, detokenization
  message       --core: pickling the step's message for the front ends (EngineCore's)
  prefix keys   BlockManager.cache_full_blocks alone (inside rest)
  rest          the rest: launch bookkeeping, _InFlight, the tokens' copy back, the output
                processor
  host total    LLMEngine.step minus the fake forward and the sampler
  sampler       Sampler.sample over [256, --logits-width] logits (default 64 columns, so
                sampled ids are < 64: the host's per-op overhead, a stand-in for kernel
                launches; CPU math over the whole vocabulary takes ~1 s a step here, says
                nothing of a GPU and evicts the host's caches); not in host total

Each part is the median over ``--steps`` decode steps at full batch (no sequence finishes in
the window), or with ``--whole-run`` the mean over every step of the workload (prefill, and
the tail where requests finish and the batch changes every few steps); ``--repeats`` fresh
engines give the spread.

    python -m benchmarks.bench_host_step                    # qwen2.5-1.5b vocabulary, no text
    python -m benchmarks.bench_host_step --shape smollm2    # SmolLM2 vocabulary, text on
    python -m benchmarks.bench_host_step --no-prefix-caching
    python -m benchmarks.bench_host_step --whole-run --repeats 1
    python -m benchmarks.bench_host_step --shape smollm2 --structured-output json_schema
    python -m benchmarks.bench_host_step --shape smollm2 --stop --repeats 5
    python -m benchmarks.bench_host_step --shape smollm2 --core   # a server's engine core

``--structured-output json_schema`` holds every request to the throughput benchmark's JSON
schema (``bench_schema``); the logits are the whole vocabulary then, so that the mask leaves
tokens to draw. The matchers' token checks and the next masks' fill run on the grammar worker
thread, which on a GPU overlaps the forward pass; here the forward takes no time, so what the
engine's thread waits for them shows in "process" (checks) and "grammar mask" (fill).

The heap is frozen after start-up, as the engine freezes it on CUDA (on a CPU it does not, and
collections of torch's heap would be most of what differs between runs).

``--stop`` gives every request a stop string that never matches: offline, every
``TEXT_EVERY``-th step then hands all requests' new tokens to the output processor (their
text, the stop check), a spike the medians above do not show; it is reported on its own
("text step": its host total and the output processor's share, the median over those steps).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import torch

from vllm_lite.config import EngineConfig
from vllm_lite.engine.llm_engine import TEXT_EVERY, LLMEngine
from vllm_lite.entrypoints.benchmark import (
    CONFIG_DIR,
    EXTRAS,
    NEVER_STOP,
    Workload,
    add_request_extra_flags,
    bench_schema,
    prompts_pending,
    text_tokenizer_for_shape,
)
from vllm_lite.entrypoints.engine_core import encode_message
from vllm_lite.sampling_params import SamplingParams, StructuredOutputsParams

SHAPES = {"qwen": "qwen2.5-1.5b", "smollm2": "smollm2-135m"}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
PARTS = [
    "schedule",
    "prepare",
    "sampling",
    "grammar mask",
    "process",
    "message",
    "prefix keys",
    "rest",
    "host total",
    "sampler",
]


def tiny_folder(shape: str) -> str:
    """A shape's config.json (its vocabulary and architecture) with a one-layer, 64-wide body."""
    with open(os.path.join(CONFIG_DIR, f"{SHAPES[shape]}.json")) as fh:
        config = json.load(fh)
    config.update(TINY)
    folder = tempfile.mkdtemp(prefix="vllm-lite-host-")
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    return folder


def timed(times: dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    return wrapper


def build(
    shape: str, caching: bool, work: Workload, width: int | None
) -> tuple[LLMEngine, dict[str, float]]:
    from transformers import AutoConfig

    folder = tiny_folder(shape)
    tokenizer = text_tokenizer_for_shape(AutoConfig.from_pretrained(folder))
    tokens = sum(len(p) + n for p, n in zip(work.prompts, work.output_lens))
    config = EngineConfig(
        model_path=folder,
        tokenizer_path=tokenizer,
        load_format="dummy",
        device="cpu",
        max_model_len=2048,
        max_num_seqs=256,
        enable_prefix_caching=caching,
        num_blocks=tokens // 16 + 2 * len(work.prompts),
    )
    engine = LLMEngine(config)
    runner, width = engine.runner, width or engine.hf_config.vocab_size
    logits = torch.randn(
        config.max_num_seqs, width, generator=torch.Generator().manual_seed(0)
    ).bfloat16()

    def fake_execute(step, prev_tokens=None):
        t0 = time.perf_counter()
        runner._upload(step)  # the upload's host side stays in the measurement
        times["upload"] = times.get("upload", 0.0) + time.perf_counter() - t0
        # a copy: the sampler writes into its logits (grammar masks, penalties)
        return logits[: len(step.logits_indices)].clone()

    times: dict[str, float] = {}
    engine.scheduler.schedule = timed(times, "schedule", engine.scheduler.schedule)
    runner.prepare = timed(times, "prepare", runner.prepare)
    runner.execute = timed(times, "forward", fake_execute)
    engine._sampling_batch = timed(times, "sampling", engine._sampling_batch)
    engine.sampler.sample = timed(times, "sampler", engine.sampler.sample)
    engine._grammar_mask = timed(times, "grammar mask", engine._grammar_mask)
    engine._process = timed(times, "process", engine._process)
    processor = engine.output_processor
    processor.process = timed(times, "output processor", processor.process)
    engine.block_manager.cache_full_blocks = timed(
        times, "prefix keys", engine.block_manager.cache_full_blocks
    )
    return engine, times


def measure(
    shape: str,
    caching: bool,
    warmup: int,
    steps: int,
    width: int | None,
    whole_run: bool = False,
    extras: dict | None = None,
    core: bool = False,
) -> dict[str, float]:
    """µs per part of one fresh engine: the median over ``steps`` full-batch decode steps, or
    with ``whole_run`` the mean over every step of the workload (prefill, and the tail where
    requests finish and the batch changes). ``core``: a server's engine core's step instead
    (every token reported, the step's message pickled: "message")."""
    work = Workload.nano_vllm(256, (100, 1024), (100, 1024))
    engine, times = build(shape, caching, work, width)
    engine.report_every_token = core
    gc.collect()
    gc.freeze()  # as the engine does after start-up on CUDA (a CPU engine does not)
    try:

        def step():
            if not core:
                return engine.step()
            outputs = engine.core_step()
            t0 = time.perf_counter()
            encode_message(("step", outputs, [], None))  # EngineCore's message
            times["message"] = time.perf_counter() - t0

        for prompt, n in zip(work.prompts, work.output_lens):
            engine.add_request(
                prompt,
                SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True, **(extras or {})),
            )
        running = engine.scheduler.running
        if not whole_run:
            while prompts_pending(engine):
                step()
            assert min(work.output_lens) > warmup + steps + 2, (
                "a sequence would finish inside the window"
            )
        rows = []
        while engine.has_unfinished_requests() if whole_run else len(rows) < warmup + steps:
            times.clear()
            t0 = time.perf_counter()
            step()
            total = time.perf_counter() - t0
            t = {k: 1e6 * v for k, v in times.items()}
            host = (
                1e6 * total - t.get("forward", 0.0) + t.get("upload", 0.0) - t.get("sampler", 0.0)
            )
            parts = {
                "schedule": t["schedule"],
                "prepare": t.get("prepare", 0.0) + t.get("upload", 0.0),
                "sampling": t.get("sampling", 0.0),
                "grammar mask": t.get("grammar mask", 0.0),
                "process": t.get("process", 0.0),
                "message": t.get("message", 0.0),
            }
            rows.append(
                parts
                | {
                    "prefix keys": t.get("prefix keys", 0.0),
                    "rest": host - sum(parts.values()),
                    "host total": host,
                    "sampler": t.get("sampler", 0.0),
                    "output processor": t.get("output processor", 0.0),
                    "text step": engine._num_steps % TEXT_EVERY == 0,
                }
            )
        if not whole_run:
            assert len(running) == 256 and all(
                s.num_computed_tokens >= s.num_prompt_tokens for s in running
            )
            rows = rows[warmup:]
    finally:
        engine.close()
        gc.unfreeze()
    average = statistics.mean if whole_run else statistics.median
    text_steps = [r for r in rows if r["text step"]] or [
        {"host total": 0.0, "output processor": 0.0}
    ]
    return {p: average(r[p] for r in rows) for p in PARTS} | {
        "steps": len(rows),
        "text step host total": statistics.median(r["host total"] for r in text_steps),
        "text step output processor": statistics.median(r["output processor"] for r in text_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="qwen",
        help="qwen: Qwen2.5's 151,936-token vocabulary, no tokenizer (token ids only, as the "
        "H100 benchmark of that shape); smollm2: 49,152 tokens with SmolLM2's tokenizer (text)",
    )
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--whole-run",
        action="store_true",
        help="the mean over every step of the workload instead (prefill, finishing requests)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--logits-width",
        type=int,
        help="0: the whole vocabulary; default 64, with "
        "--sampling extras 10,240 (penalties index the prompts' token ids, all below 10,000)",
    )
    add_request_extra_flags(parser)  # --structured-output json_schema needs --shape smollm2
    parser.add_argument(
        "--stop",
        action="store_true",
        help="a stop string that never matches on every request (needs --shape smollm2): text "
        f"decoded and checked every {TEXT_EVERY}th step, reported as 'text step'",
    )
    parser.add_argument(
        "--core",
        action="store_true",
        help="a server's engine core's step: every token reported and the step's message "
        "pickled ('message'), no output processor",
    )
    args = parser.parse_args()
    if args.core and args.stop:
        parser.error("--stop is the offline text step: not with --core")
    torch.set_num_threads(1)
    extras = dict(EXTRAS) if args.sampling == "extras" else None
    if args.stop:
        if args.shape != "smollm2":
            parser.error("--stop needs a tokenizer: --shape smollm2")
        extras = (extras or {}) | {"stop": [NEVER_STOP]}
    if args.structured_output == "json_schema":
        if args.shape != "smollm2":
            parser.error("--structured-output needs a tokenizer: --shape smollm2")
        extras = (extras or {}) | {
            "structured_outputs": StructuredOutputsParams(json=bench_schema())
        }
        args.logits_width = 0
    if args.logits_width is None:
        args.logits_width = 10240 if args.sampling == "extras" else 64

    results = [
        measure(
            args.shape,
            args.prefix_caching,
            args.warmup,
            args.steps,
            args.logits_width,
            args.whole_run,
            extras,
            args.core,
        )
        for _ in range(args.repeats)
    ]
    window = (
        f"mean of all {results[0]['steps']} steps of the workload"
        if args.whole_run
        else f"median of {args.steps} full-batch decode steps"
    )
    print(
        f"\nhost µs per step, 256 requests, shape {args.shape}, prefix caching "
        f"{'on' if args.prefix_caching else 'off'}: {window}, {args.repeats} fresh engines "
        f"(min..max); logits {args.logits_width or 'vocab'} wide; sampling {args.sampling}; "
        f"structured output {args.structured_output}; stop string {args.stop}"
        f"{'; a server engine core' if args.core else ''}"
    )
    for part in PARTS:
        values = [r[part] for r in results]
        note = "  (CPU tensor math; not counted in host total)" if part == "sampler" else ""
        print(
            f"  {part:12s} {statistics.median(values):9.1f}   ({min(values):.1f}..{max(values):.1f}){note}"
        )
    if args.stop:
        print(f"  every {TEXT_EVERY}th step (text handed over), median over those steps:")
        for part in ("text step host total", "text step output processor"):
            values = [r[part] for r in results]
            print(
                f"  {part:27s} {statistics.median(values):9.1f}   "
                f"({min(values):.1f}..{max(values):.1f})"
            )


if __name__ == "__main__":
    main()
