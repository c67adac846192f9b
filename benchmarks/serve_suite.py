"""Issue 23's table in one command (GPU, ~5 minutes on an H200): serving at the engine's speed with
text on. A Llama shape with SmolLM2's vocabulary (hidden 2048, 16 layers, 32 / 8 heads, head_dim
64, intermediate 8192, vocabulary 49,152, tied; dummy weights) and SmolLM2's real tokenizer, so
text is on everywhere; nano-vllm's bench.py workload (256 requests, temperature 0.6).

Rows: offline ``LLM.generate`` (its first run after ``LLM(...)``, and the median of the next
ones, steps and step time); ``vllm-lite serve`` loaded by ``bench serve``'s client all at once,
at 64 and at 16 requests/s (TTFT, TPOT; CPU seconds of the front end per output token and the
engine process' busy share; the client reads from ``--client-processes`` processes, 2 by
default: one is near a core's worth at the SmolLM2 shape's rate); then the SmolLM2-135M shape
(text off / decoded at the end / per token, a stop string that never matches) offline, and
served all at once.

    python -m benchmarks.serve_suite                  # the whole table (the server's default
                                                      # front ends: --api-server-count auto)
    python -m benchmarks.serve_suite --runs 2 --skip-smollm2
    python -m benchmarks.serve_suite --api-server-count 1   # served through one front end
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import httpx
from transformers import AutoConfig

from benchmarks.serve_overhead import served_run, start_server
from vllm_lite.config import EngineConfig
from vllm_lite.entrypoints.bench_serve import run_benchmark
from vllm_lite.entrypoints.benchmark import CONFIG_DIR, NEVER_STOP, Workload, model_folder
from vllm_lite.entrypoints.openai_server import auto_api_server_count

# the Llama shape with SmolLM2's vocabulary (vllm_lite/model_configs/llama-1b-smollm2-vocab.json)
LLAMA_SMOLLM2_VOCAB = "llama-1b-smollm2-vocab"


def shape_folder(config: dict) -> str:
    folder = tempfile.mkdtemp(prefix="vllm-lite-shape-")
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    return folder


def offline_runs(
    config: EngineConfig, work: Workload, temperature: float, variants: dict, runs: int
) -> dict:
    """``LLM(...)`` once, then ``runs`` rounds of ``generate`` over the variants (extra
    SamplingParams each), alternating; no warm-up generate: a variant's first run is the first
    a user times. Returns per variant the elapsed seconds of each run and the steps of the last."""
    from vllm_lite import LLM, SamplingParams

    llm = LLM(config=config)
    engine, steps = llm.engine, [0]
    step = engine.step
    stamps: dict | None = None  # request id -> [first token time, time it was last seen]

    def counted():
        steps[0] += 1
        outputs = step()
        if stamps is not None:  # an untimed run: when each request's tokens came
            now = time.perf_counter()
            for seq in engine.sequences.values():
                if seq.num_output_tokens:
                    stamps.setdefault(seq.request_id, [now, now])[1] = now
            for output in outputs:  # finished in this step
                stamps.setdefault(output.request_id, [now, now])[1] = now
        return outputs

    engine.step = counted

    def params_of(extra: dict) -> list:
        return [
            SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, **extra)
            for n in work.output_lens
        ]

    out = {name: {"elapsed": []} for name in variants}
    for _ in range(runs):
        for name, extra in variants.items():
            params = params_of(extra)
            assert llm.reset_prefix_cache()
            steps[0] = 0
            t0 = time.perf_counter()
            outputs = llm.generate(work.prompts, params, use_tqdm=False)
            out[name]["elapsed"].append(time.perf_counter() - t0)
            out[name]["steps"] = steps[0]
            assert [len(o.outputs[0].token_ids) for o in outputs] == work.output_lens
    # one more run of "text at end" (what is served), untimed, for each request's TPOT as a
    # client computes it ((last token - first token) / (tokens - 1)): the served TPOT's match
    name = "text at end" if "text at end" in variants else next(iter(variants))
    assert llm.reset_prefix_cache()
    stamps = {}
    outputs = llm.generate(work.prompts, params_of(variants[name]), use_tqdm=False)
    tpots = [
        (stamps[o.request_id][1] - stamps[o.request_id][0]) / (len(o.outputs[0].token_ids) - 1)
        for o in outputs
        if len(o.outputs[0].token_ids) > 1
    ]
    out[name]["tpot_p50_ms"] = 1e3 * statistics.median(tpots)
    llm.close()
    total = sum(work.output_lens)
    for r in out.values():
        warm = r["elapsed"][1:] or r["elapsed"]
        r["first_tok_s"], r["warm_tok_s"] = total / r["elapsed"][0], total / statistics.median(warm)
        r["step_ms"] = 1e3 * statistics.median(warm) / r["steps"]
    return out


def served(
    config: EngineConfig,
    overrides: dict,
    work: Workload,
    temperature: float,
    rates: list[float],
    runs: int,
    api_server_count: int,
    clients: int,
) -> dict:
    proc, url = start_server(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        config.model_path,
        overrides,
        ("--api-server-count", str(api_server_count)),
    )
    try:
        warm = Workload(work.prompts[:32], [16] * 32)
        asyncio.run(run_benchmark(url, None, warm, temperature, float("inf"), None, None, seed=0))
        result = {
            "all": [
                served_run(url, proc.pid, work, temperature, float("inf"), clients)
                for _ in range(runs)
            ]
        }
        for rate in rates:
            result[rate] = served_run(url, proc.pid, work, temperature, rate, clients)
        httpx.get(url + "/metrics")
    finally:
        proc.terminate()
        proc.wait(60)
    return result


def describe(r: dict) -> str:
    tokens = r["total_output_tokens"]
    busy = r["cpu_engine_process_s"] / r["duration_s"]
    shares = "/".join(f"{100 * t / r['duration_s']:.0f}" for t in r["cpu_front_ends_s"] if t > 0.01)
    return (
        f"{r['output_throughput']:,.0f} tok/s, TTFT p50 {r['p50_ttft_ms']:.1f} ms p99 {r['p99_ttft_ms']:.1f} ms, "
        f"TPOT p50 {r['p50_tpot_ms']:.2f} ms | front end {1e6 * r['cpu_server_s'] / tokens:.1f} us CPU/token "
        f"({shares}% of a core by process), "
        f"engine process busy {100 * busy:.0f}%, client CPU "
        f"{100 * r['client_cpu_s'] / r['duration_s'] / r['client_processes']:.0f}% a process "
        f"(of {r['client_processes']}), GC {1e3 * r['client_gc_s']:.0f} ms "
        f"({r['client_full_gcs']} full), {r['failed']} failed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="offline generates per variant (the first is cold)"
    )
    parser.add_argument(
        "--served-runs", type=int, default=3, help="all-at-once served runs (median)"
    )
    parser.add_argument("--rates", type=float, nargs="*", default=[64.0, 16.0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--skip-smollm2", action="store_true", help="only the Llama shape")
    parser.add_argument(
        "--api-server-count",
        type=int,
        default=auto_api_server_count(),
        help="the server's front-end processes (default: its own, auto: %(default)s here)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a 2-layer Llama, 8 short requests (CPU)"
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=2,
        help="bench serve's client processes (one read ~48k chunks/s at 87%% of a core on the "
        "H200 host: its own lag would count as the server's)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--tokenizer-path",
        default=os.environ.get("TOKENIZER"),
        help="a folder of SmolLM2's tokenizer files (default: the embedded model's)",
    )
    args = parser.parse_args()
    from vllm_lite.default_model import default_model_path

    tokenizer = args.tokenizer_path or default_model_path()
    temperature, result, t0 = 0.6, {}, time.perf_counter()

    def row(what: str, value: str) -> None:  # printed as soon as known: a timeout keeps them
        print(f"| {what} | {value} |", flush=True)

    def stage(what: str) -> None:
        print(f"[serve_suite {time.perf_counter() - t0:.0f} s] {what}", flush=True)

    print("\n| what | result |\n|---|---|", flush=True)
    with open(os.path.join(CONFIG_DIR, f"{LLAMA_SMOLLM2_VOCAB}.json")) as fh:
        llama = json.load(fh)
    if args.smoke:  # the same path on a CPU in a few minutes: a 2-layer model, a few short requests
        llama = {
            **llama,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
        }
        args.num_prompts, args.runs, args.served_runs, args.rates = 8, 2, 1, [16.0]
    n = args.api_server_count
    fronts = f" ({n} front end{'s' if n > 1 else ''})"
    shapes = [("llama-2048 (SmolLM2 vocab)", shape_folder(llama))]
    if not args.skip_smollm2:
        shapes.append(("smollm2-135m", model_folder("smollm2-135m")))
    for name, folder in shapes:
        vocab = AutoConfig.from_pretrained(folder).vocab_size
        lens = ((16, 64), (8, 32)) if args.smoke else ((100, 1024), (100, 1024))
        work = Workload.nano_vllm(args.num_prompts, *lens, vocab=vocab)
        overrides = {
            "model_path": folder,
            "load_format": "dummy",
            "tokenizer_path": tokenizer,
            "max_model_len": 4096,
        }
        config = EngineConfig(**overrides)
        variants = {"text at end": {}}
        if name.startswith("smollm2"):
            variants = {
                "text off": {"detokenize": False},
                "text at end": {},
                "stop string": {"stop": [NEVER_STOP]},
            }
        stage(f"{name}: offline")
        off = offline_runs(config, work, temperature, variants, args.runs)
        base = off["text at end"]
        first_variant = next(iter(variants))  # the process' first generate
        first = off[first_variant]
        row(
            f"{name}: offline, first generate after LLM(...) / the next (median)",
            f"{first['first_tok_s']:,.0f} / {first['warm_tok_s']:,.0f} tok/s "
            f"(first {100 * (1 - first['first_tok_s'] / first['warm_tok_s']):.1f}% below the "
            f"next; {first_variant}); text at end: {base['steps']} steps, "
            f"{base['step_ms']:.2f} ms a step, TPOT p50 {base['tpot_p50_ms']:.2f} ms",
        )
        for variant, r in off.items():
            if variant != "text at end":
                row(
                    f"{name}: offline, {variant}",
                    f"{r['warm_tok_s']:,.0f} tok/s (first run {r['first_tok_s']:,.0f}), "
                    f"{100 * (r['warm_tok_s'] / off['text off']['warm_tok_s'] - 1):+.1f}% vs text off"
                    if "text off" in off
                    else f"{r['warm_tok_s']:,.0f} tok/s",
                )
        if "text off" in off:
            row(
                f"{name}: offline, text at end",
                f"{base['warm_tok_s']:,.0f} tok/s (first run {base['first_tok_s']:,.0f}), "
                f"{100 * (base['warm_tok_s'] / off['text off']['warm_tok_s'] - 1):+.1f}% vs text off",
            )
        stage(f"{name}: served")
        rates = args.rates if name.startswith("llama") else []
        srv = served(
            config,
            overrides,
            work,
            temperature,
            rates,
            args.served_runs,
            args.api_server_count,
            args.client_processes,
        )
        result[name] = {"offline": off, "served": {str(k): v for k, v in srv.items()}}
        best = max(srv["all"], key=lambda r: r["output_throughput"])
        ratio = statistics.median(r["output_throughput"] for r in srv["all"]) / base["warm_tok_s"]
        runs = ", ".join(f"{r['output_throughput']:,.0f}" for r in srv["all"])
        row(
            f"{name}: served{fronts}, all at once (median of {len(srv['all'])})",
            f"{100 * ratio:.0f}% of offline (runs {runs} tok/s); "
            f"best run {describe(best)}; TPOT p50 / offline step "
            f"{best['p50_tpot_ms'] / base['step_ms']:.2f}, / offline TPOT p50 "
            f"{best['p50_tpot_ms'] / base['tpot_p50_ms']:.2f}",
        )
        for rate in rates:
            row(f"{name}: served{fronts}, {rate:g} req/s", describe(srv[rate]))
    stage("done")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
