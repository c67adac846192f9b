"""What serving costs over the offline engine, on one workload and one engine config: the
offline throughput (``LLM.generate``, as ``vllm-lite bench throughput`` times it), then
``vllm-lite serve`` loaded by ``vllm-lite bench serve``'s client with every request at once
(streaming, ignore_eos: the same requests), then at a low Poisson rate for the time to first
token. Prints served/offline (issue 11's target: >= 90% on an H100, TTFT p50 < 30 ms at 4
requests/s) and where the CPU went during each served run: the client (this process), the
server process and the engine process (Linux /proc; with an engine thread instead of a
process, the engine's CPU is inside the server's), and offline CPU / the busiest serving
process' CPU: the ratio with a free core per process. On a shared CPU both move with other load
(on 2 shared cores, 78..116% between invocations): compare medians of several.

    python -m benchmarks.serve_overhead --model-config smollm2-135m          # GPU: dummy weights
    python -m benchmarks.serve_overhead --tiny /tmp/tiny --num-blocks 4096   # CPU: a 2-layer model
    python -m benchmarks.serve_overhead ... --server-tree /path/to/other/checkout  # A/B a server

Defaults: 128 requests, prompts U(50, 200), outputs U(64, 128), temperature 1, 3 timed runs of
each after one warm-up; then ``--rate-prompts`` (32) requests at each Poisson rate of ``--rate``
(default: 4 per second). Engine flags (``--max-num-seqs`` ...) go to both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
from transformers import AutoConfig

from vllm_lite.config import EngineConfig, add_config_flags
from vllm_lite.entrypoints.bench_serve import run_benchmark
from vllm_lite.entrypoints.benchmark import (
    Workload,
    model_folder,
    run_ours,
    text_tokenizer_for_shape,
)
from vllm_lite.entrypoints.cli_util import settled_heap
from vllm_lite.entrypoints.engine_core import CORE_PROCESS_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_cpu_seconds(pid: int) -> dict[int, tuple[bool, float]]:
    """(engine?, CPU seconds (user + system)) of ``pid`` and each of its descendants, by pid;
    engine: the engine core process (named ``CORE_PROCESS_NAME``) and its children (tensor-
    parallel ranks); the others are the server's front end(s) (and a supervisor)."""
    out, todo = {}, [(pid, False)]
    while todo:
        p, engine = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as fh:
                name, fields = fh.read().split("(", 1)[1].rsplit(")", 1)
            engine = engine or name == CORE_PROCESS_NAME
            out[p] = (
                engine,
                (int(fields.split()[11]) + int(fields.split()[12])) / os.sysconf("SC_CLK_TCK"),
            )
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [(int(c), engine) for c in fh.read().split()]
        except OSError:  # exited meanwhile
            continue
    return out


def serve_flags(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{key.replace('_', '-')}")
        elif value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def start_server(
    tree: str, model_path: str, overrides: dict, flags: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """``vllm-lite serve`` with the engine settings ``overrides`` and the server's ``flags``."""
    env = {
        **os.environ,
        "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "VLLM_LITE_API_KEY": "",
    }
    cmd = [
        sys.executable,
        "-m",
        "vllm_lite.entrypoints.cli",
        "serve",
        model_path,
        "--port",
        "0",
        "--log-level",
        "warning",
        *serve_flags({k: v for k, v in overrides.items() if k != "model_path"}),
        *flags,
    ]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = line.split(" on ")[1].split()[0]
    wait_until_healthy(proc, url, "the server")
    return proc, url


def wait_until_healthy(proc: subprocess.Popen, url: str, what: str, log: str | None = None) -> None:
    """Poll ``url``/health for up to 10 minutes; SystemExit (with the end of ``log``) if the
    process exits first or never answers."""
    for _ in range(1200):
        if proc.poll() is not None:
            tail = open(log).read()[-2000:] if log else ""
            raise SystemExit(f"{what} exited with status {proc.returncode}: {tail}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{what} did not become healthy")


class GcPauses:
    """The garbage collector's pauses in this process while entered: a client that stops to
    collect reads its streams late, which the run would count against the server."""

    def __init__(self) -> None:
        self.seconds, self.full, self._start = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.full += info["generation"] == 2

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def served_run(
    url: str, pid: int, work: Workload, temperature: float, rate: float, clients: int = 1
) -> dict:
    """One ``bench serve`` run from ``clients`` client processes. The GC pauses are this
    process' (with several clients it does not read the streams)."""
    httpx.post(url + "/reset_prefix_cache")  # every run computes its prompts, as offline
    with settled_heap(), GcPauses() as pauses:  # the client: no full collection while it reads
        before = tree_cpu_seconds(pid)
        result = asyncio.run(
            run_benchmark(
                url, None, work, temperature, rate, None, None, seed=0, client_processes=clients
            )
        )
    result["client_gc_s"], result["client_full_gcs"] = pauses.seconds, pauses.full
    after = tree_cpu_seconds(pid)
    cpu = {p: (engine, t - before.get(p, (engine, 0.0))[1]) for p, (engine, t) in after.items()}
    result["cpu_server_s"] = sum(t for engine, t in cpu.values() if not engine)  # front end(s)
    # each front-end process' share (and the supervisor's, ~0), busiest first: how evenly the
    # connections were spread
    result["cpu_front_ends_s"] = sorted(
        (t for engine, t in cpu.values() if not engine), reverse=True
    )
    result["cpu_engine_process_s"] = sum(t for engine, t in cpu.values() if engine)
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} (runs {min(values):.0f}..{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-config",
        default="smollm2-135m",
        help="a shape in vllm_lite/model_configs (random weights) or a config.json path",
    )
    parser.add_argument(
        "--tiny",
        metavar="DIR",
        help="make the tests' 2-layer Llama (with a tokenizer) in DIR "
        "and use it: on a CPU, a step is then mostly Python, i.e. host overhead",
    )
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, nargs=2, default=[50, 200], metavar=("MIN", "MAX"))
    parser.add_argument(
        "--output-len", type=int, nargs=2, default=[64, 128], metavar=("MIN", "MAX")
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--rate",
        type=float,
        nargs="*",
        default=[4.0],
        help="requests/s of the Poisson runs after the all-at-once ones (TTFT; none: skip)",
    )
    parser.add_argument("--rate-prompts", type=int, default=32)
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument(
        "--server-tree", default=REPO, help="the checkout whose server runs (default: this one)"
    )
    parser.add_argument("--json", help="write the results here")
    add_config_flags(parser)
    args = vars(parser.parse_args())
    opts = {
        k: args.pop(k)
        for k in (
            "model_config",
            "tiny",
            "num_prompts",
            "input_len",
            "output_len",
            "temperature",
            "runs",
            "rate",
            "rate_prompts",
            "skip_offline",
            "server_tree",
            "json",
        )
    }
    overrides = args  # the engine flags given
    if opts["tiny"]:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from tiny_models import make_tiny_model

        os.makedirs(opts["tiny"], exist_ok=True)
        overrides["model_path"] = make_tiny_model(opts["tiny"], "llama")
    elif "model_path" not in overrides:
        overrides["model_path"] = model_folder(opts["model_config"])
        overrides.setdefault("load_format", "dummy")
        if "tokenizer_path" not in overrides:  # SmolLM2's for its shape (text on), else none
            tokenizer = text_tokenizer_for_shape(
                AutoConfig.from_pretrained(overrides["model_path"])
            )
            if tokenizer is not None:
                overrides["tokenizer_path"] = tokenizer
    overrides.setdefault("max_model_len", opts["input_len"][1] + opts["output_len"][1])
    config = EngineConfig(**overrides)
    vocab = AutoConfig.from_pretrained(config.model_path).vocab_size
    work = Workload.random(
        opts["num_prompts"], tuple(opts["input_len"]), tuple(opts["output_len"]), vocab, config.seed
    )
    total_out = sum(work.output_lens)
    result = {
        "workload": {k: opts[k] for k in ("num_prompts", "input_len", "output_len", "temperature")},
        "engine_flags": overrides,
        "server_tree": opts["server_tree"],
    }

    if not opts["skip_offline"]:
        offline = run_ours(config, work, opts["temperature"], opts["runs"])
        result["offline_output_tok_s"] = [total_out / e for e in offline["elapsed"]]
        result["offline_cpu_s"] = offline["cpu_s"]
        result["text"] = offline["text"]
        print(
            f"offline LLM.generate: {spread(result['offline_output_tok_s'])} output tok/s "
            f"({total_out} tokens, text {'on' if offline['text'] else 'OFF'}); CPU s per run "
            f"{', '.join(f'{c:.2f}' for c in offline['cpu_s'])}",
            flush=True,
        )

    proc, url = start_server(opts["server_tree"], config.model_path, overrides)
    try:
        warm = Workload(work.prompts[:16], [8] * 16)
        asyncio.run(
            run_benchmark(url, None, warm, opts["temperature"], float("inf"), None, None, seed=0)
        )
        runs = [
            served_run(url, proc.pid, work, opts["temperature"], float("inf"))
            for _ in range(opts["runs"])
        ]
        result["served_runs"] = runs
        result["served_output_tok_s"] = [r["output_throughput"] for r in runs]
        print(
            f"served, all at once:  {spread(result['served_output_tok_s'])} output tok/s; TTFT p50 "
            f"{spread([r['p50_ttft_ms'] for r in runs])} ms, ITL p50 {spread([r['p50_itl_ms'] for r in runs])} ms"
        )
        for r in runs:
            print(
                f"  run: {r['output_throughput']:.0f} tok/s in {r['duration_s']:.2f} s; CPU s: client "
                f"{r['client_cpu_s']:.2f}, server process {r['cpu_server_s']:.2f}, engine process "
                f"{r['cpu_engine_process_s']:.2f}; {r['failed']} failed"
            )
        result["rate_runs"] = []
        for rate in opts["rate"]:
            low = Workload(
                work.prompts[: opts["rate_prompts"]], work.output_lens[: opts["rate_prompts"]]
            )
            r = served_run(url, proc.pid, low, opts["temperature"], rate)
            result["rate_runs"].append({"rate": rate, **r})
            print(
                f"served, {rate:g} requests/s ({len(low.prompts)} requests): {r['output_throughput']:.0f} tok/s; "
                f"TTFT p50 {r['p50_ttft_ms']:.1f} ms, p90 {r['p90_ttft_ms']:.1f}, p99 {r['p99_ttft_ms']:.1f}; "
                f"TPOT p50 {r['p50_tpot_ms']:.1f} ms; ITL p50 {r['p50_itl_ms']:.1f} ms, p99 {r['p99_itl_ms']:.1f}; "
                f"{r['failed']} failed"
            )
    finally:
        proc.terminate()
        proc.wait(60)
    if "offline_output_tok_s" in result:
        ratio = statistics.median(result["served_output_tok_s"]) / statistics.median(
            result["offline_output_tok_s"]
        )
        # The CPU the slowest serving process needed: an engine thread shares its process'
        # GIL with the event loop (their CPU adds up), an engine process runs beside it.
        critical = statistics.median(
            max(r["cpu_server_s"], r["cpu_engine_process_s"])
            if r["cpu_engine_process_s"]
            else r["cpu_server_s"]
            for r in result["served_runs"]
        )
        cpu_ratio = statistics.median(result["offline_cpu_s"]) / critical
        result.update(served_over_offline=ratio, offline_cpu_over_served_critical_cpu=cpu_ratio)
        print(
            f"served / offline (medians): {100 * ratio:.0f}%; offline CPU s / CPU s of the busiest serving "
            f"process: {100 * cpu_ratio:.0f}% (what the ratio is with a free core per process)"
        )
    if opts["json"]:
        with open(opts["json"], "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
