"""The server's front end alone, on a CPU: what one front-end process spends per streamed token.

The real front end (the FastAPI app on uvicorn, ``AsyncLLM.attach``ed to a core through its
pipes, the output processor with SmolLM2's tokenizer, Prometheus metrics) is driven by a
synthetic engine core: a process that takes requests and, every ``--step-ms``, reports one random
token for each of them in the core's own step message (``EngineCore`` runs it; no model). ``vllm-lite
bench serve``'s client streams ``--num-prompts`` requests from it at once. Printed: the front-end
process' CPU per output token, its garbage collections (count and seconds by generation), and the
client's throughput and TPOT. A front end that keeps up streams a token per request per step (TPOT
= the step); past its CPU it falls behind and merges steps into fewer chunks.

    python -m benchmarks.bench_front_end                     # 256 requests x 300 tokens, 15 ms steps
    python -m benchmarks.bench_front_end --step-ms 3 --runs 3
    TOKENIZER=<SmolLM2 tokenizer folder> python -m benchmarks.bench_front_end

On a 2-core machine the client shares the CPU with the front end: compare runs of one call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from benchmarks.bench_grammar import tokenizer_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SyntheticEngine:
    """What ``EngineCore`` calls on an ``LLMEngine``: each step, one token for every request
    until its ``max_tokens``, paced to one step per ``step_s``."""

    def __init__(self, step_s: float) -> None:
        from vllm_lite.engine.output_processor import CoreOutputs

        self._outputs = CoreOutputs
        self.step_s, self.next_step = step_s, time.monotonic()
        self.sequences: dict[str, int] = {}  # request id -> tokens left
        self.scheduler = SimpleNamespace(
            running=self.sequences,
            waiting=[],
            num_preemptions=0,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
        )
        self.block_manager = SimpleNamespace(num_free_blocks=1, num_blocks=1)
        self.pending = CoreOutputs()
        self.rng = random.Random(0)

    def add_request(self, token_ids, params, request_id) -> None:
        self.sequences[request_id] = params.max_tokens

    def abort_request(self, request_id) -> None:
        if self.sequences.pop(request_id, None) is not None:
            row = self.pending.add(request_id, 0, -1)
            self.pending.finished.append((row, "abort", None))

    def stop_completion(self, request_id, index) -> None:
        self.sequences.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.sequences or self.pending.req_ids)

    def take_outputs(self):
        outputs, self.pending = self.pending, self._outputs()
        return outputs

    def core_step(self):
        now = time.monotonic()
        if self.next_step > now:
            time.sleep(self.next_step - now)
        self.next_step = max(now, self.next_step) + self.step_s
        out = self.take_outputs()
        for request_id in list(self.sequences):
            row = out.add(request_id, 0, self.rng.randrange(1000, 30000))
            self.sequences[request_id] -= 1
            if self.sequences[request_id] <= 0:
                del self.sequences[request_id]
                out.finished.append((row, "length", None))
        return out

    def reset_prefix_cache(self) -> bool:
        return True


def synthetic_core(clients: list, tokenizer_dir: str, step_s: float) -> None:
    """The core process: ``EngineCore`` as ``run_engine_core`` runs it, on ``SyntheticEngine``."""
    from transformers import AutoTokenizer

    from vllm_lite.engine.llm_engine import RequestLimits
    from vllm_lite.entrypoints.engine_core import EngineCore, EngineInfo, _send_to

    outputs = [out for _, out in clients]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    config = SimpleNamespace(max_model_len=4096, model_path=tokenizer_dir)
    limits = RequestLimits(vocab, 4096, 1024, 1 << 20, 16)
    _send_to(outputs, ("ready", EngineInfo(tokenizer_dir, config, vocab, limits, tokenizer)))
    core = EngineCore(SyntheticEngine(step_s), outputs)
    for client, (commands, _) in enumerate(clients):
        threading.Thread(target=core.receive, args=(client, commands), daemon=True).start()
    threading.Thread(target=core.send_outputs, daemon=True).start()
    core.run()


def serve(port: int, tokenizer_dir: str, step_s: float) -> None:
    """The front-end process: ``vllm-lite serve``'s path, on the synthetic core."""
    from vllm_lite.entrypoints.async_engine import AsyncLLM, wait_until_ready
    from vllm_lite.entrypoints.cli_util import settle_heap
    from vllm_lite.entrypoints.metrics import ServerMetrics
    from vllm_lite.entrypoints.openai_server import bind, build_app, make_server
    from vllm_lite.worker.tp_executor import pipe

    commands_out, commands = pipe()
    outputs, outputs_in = pipe()
    core = multiprocessing.get_context("spawn").Process(
        target=synthetic_core,
        args=([(commands_out, outputs_in)], tokenizer_dir, step_s),
        daemon=True,
    )
    core.start()
    info = wait_until_ready(outputs, core)
    metrics = ServerMetrics("synthetic")
    app = build_app(AsyncLLM.attach(commands, outputs, info, metrics), ["synthetic"], None, metrics)
    server = make_server(app, 5, "warning")
    sock = bind("127.0.0.1", port)
    settle_heap()
    collections = {"count": [0, 0, 0], "seconds": [0.0, 0.0, 0.0]}
    started = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections["count"][info["generation"]] += 1
            collections["seconds"][info["generation"]] += time.perf_counter() - started[0]

    gc.callbacks.append(timed)

    def report() -> None:  # the driver reads the last line before and after each run
        while True:
            time.sleep(0.5)
            print("gc " + json.dumps(collections), flush=True)

    threading.Thread(target=report, daemon=True).start()
    print(f"ready {sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=300)
    parser.add_argument("--step-ms", type=float, default=15.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help="default: $TOKENIZER, else the embedded SmolLM2's")
    args = parser.parse_args()
    tokenizer = args.tokenizer or tokenizer_folder()
    if args.serve is not None:
        serve(args.serve, tokenizer, args.step_ms / 1e3)
        return

    from benchmarks.serve_overhead import tree_cpu_seconds
    from vllm_lite.entrypoints.bench_serve import run_benchmark
    from vllm_lite.entrypoints.benchmark import Workload

    cmd = [sys.executable, "-m", "benchmarks.bench_front_end", "--serve", "0"]
    cmd += ["--tokenizer", tokenizer, "--step-ms", str(args.step_ms)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("ready "):
            raise SystemExit(f"the front end did not start: {line!r}")
        url = f"http://127.0.0.1:{line.split()[1]}"
        gc_lines: list[str] = []
        threading.Thread(
            target=lambda: [gc_lines.append(x) for x in proc.stdout if x.startswith("gc ")],
            daemon=True,
        ).start()
        rng = random.Random(0)
        n = args.num_prompts
        work = Workload(
            [[rng.randrange(1000, 9000) for _ in range(64)] for _ in range(n)],
            [args.output_len] * n,
        )
        warm = Workload(work.prompts[:32], [16] * 32)
        asyncio.run(run_benchmark(url, None, warm, 1.0, float("inf"), None, None, seed=0))
        print(
            f"{n} streamed requests x {args.output_len} tokens, a synthetic step every "
            f"{args.step_ms:g} ms, SmolLM2's tokenizer, {os.cpu_count()} CPUs"
        )
        per_token = []
        for run in range(args.runs):
            time.sleep(1.0)  # the report line of the warm-up / last run
            gc_before = json.loads(gc_lines[-1][3:]) if gc_lines else None
            before = tree_cpu_seconds(proc.pid)[proc.pid][1]  # the front end, not its core
            r = asyncio.run(run_benchmark(url, None, work, 1.0, float("inf"), None, None, seed=run))
            cpu = tree_cpu_seconds(proc.pid)[proc.pid][1] - before
            time.sleep(1.0)
            gc_after = json.loads(gc_lines[-1][3:]) if gc_lines else None
            tokens = r["total_output_tokens"]
            per_token.append(1e6 * cpu / tokens)
            collected = ""
            if gc_before and gc_after:
                count = [a - b for a, b in zip(gc_after["count"], gc_before["count"])]
                secs = [a - b for a, b in zip(gc_after["seconds"], gc_before["seconds"])]
                collected = (
                    f"; gc {sum(count)} collections ({'/'.join(map(str, count))}), "
                    f"{1e3 * sum(secs):.0f} ms ({'/'.join(f'{1e3 * s:.0f}' for s in secs)})"
                )
            print(
                f"  run {run + 1}: front end {per_token[-1]:.1f} us CPU/token{collected}; "
                f"{r['output_throughput']:,.0f} tok/s, TPOT p50 {r['p50_tpot_ms']:.2f} ms, TTFT p50 {r['p50_ttft_ms']:.0f} p99 {r['p99_ttft_ms']:.0f} ms, "
                f"{r['failed']} failed"
            )
        print(f"front end CPU per output token: {statistics.median(per_token):.1f} us (median)")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
