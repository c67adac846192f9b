"""``vllm-lite bench serve``: load a running server (``vllm-lite serve``, or any OpenAI-compatible
server that takes token-id prompts and vLLM's ``ignore_eos``) the way vLLM's
``benchmark_serving.py`` does, and report what a user of the server sees.

The workload is the throughput benchmark's (``vllm_lite.entrypoints.benchmark.Workload``: random
token prompts, or nano-vllm's draws), sent to ``/v1/completions`` as token ids with
``stream: true``, ``ignore_eos`` and ``max_tokens`` = the drawn output length (``--tokenizer``: as
the ids' text instead; ``--no-ignore-eos``: without vLLM's field, for strict OpenAI servers).
Requests start at a Poisson rate (``--request-rate R`` per second, exponential gaps, seeded) or all
at once (``inf``, the default), optionally at most ``--max-concurrency`` in flight. Per request the
client records the time to the first streamed token (TTFT), the gaps between streamed chunks
(inter-token latency, ITL: the server sends one chunk per engine step with new tokens) and the time
per output token after the first (TPOT = (latency - TTFT) / (output tokens - 1), output tokens from
the final usage chunk); it reports request and token throughput and the mean, p50, p90 and p99 of
each. The client reads the streams with aiohttp (``sse_events``), as vLLM's benchmark does: fast
enough not to be what it measures."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from vllm_lite.entrypoints.benchmark import DEFAULT_TEMPERATURE, Workload
from vllm_lite.entrypoints.cli_util import settled_heap


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100
    lo = int(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


async def sse_events(url: str, headers: dict, payload: dict):
    """POST ``payload`` and yield ``(status, data)``: the response's SSE ``data:`` payloads as
    they arrive, or one item with the whole body when the status is not 200.

    aiohttp, as vLLM's serving benchmark: the client must read chunks faster than the server
    writes them, and httpx spends ~200 us of Python per SSE chunk (anyio, h11, line decoding),
    which at tens of thousands of chunks a second would make the client the bottleneck."""
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, read_bufsize=1 << 22) as session:
        async with session.post(
            url, json=payload, headers={"Accept": "text/event-stream", **headers}
        ) as response:
            if response.status != 200:
                yield response.status, await response.text(errors="replace")
                return
            async for line in response.content:  # one line at a time
                if line.startswith(b"data:"):
                    yield response.status, line[5:].strip().decode()


async def send_one(url: str, headers: dict, payload: dict, prompt_len: int) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    start = time.perf_counter()
    last = None
    try:
        async with contextlib.aclosing(sse_events(url, headers, payload)) as events:
            async for status, data in events:
                if status != 200:
                    result.error = f"HTTP {status}: {data[:200]}"
                    return result
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk))
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - start
        result.ok = last is not None
        if not result.ok:
            result.error = "no tokens streamed"
    except Exception as exc:  # noqa: BLE001 - one failed request is reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def request_body(
    model: str,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    tokenizer=None,
    ignore_eos: bool = True,
) -> dict:
    """One streaming /v1/completions request: the prompt as token ids, or as their text."""
    body = {
        "model": model,
        "prompt": tokenizer.decode(prompt) if tokenizer is not None else prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return {**body, "ignore_eos": True} if ignore_eos else body


async def run_benchmark(
    base_url: str,
    model: str | None,
    work: Workload,
    temperature: float,
    request_rate: float,
    max_concurrency: int | None,
    api_key: str | None,
    seed: int,
    tokenizer=None,
    ignore_eos: bool = True,
    client_processes: int = 1,
) -> dict:
    """``tokenizer``: send each prompt as its ids' text (for servers that take only strings);
    ``client_processes``: read the streams from that many processes (no ``max_concurrency``)."""
    if client_processes > 1 and max_concurrency:
        raise ValueError("--max-concurrency works with one client process")
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/completions"
    if model is None:
        async with httpx.AsyncClient(timeout=30.0) as client:
            model = await served_model(client, base_url, headers)

    def payload(prompt, max_tokens):
        return request_body(model, prompt, max_tokens, temperature, tokenizer, ignore_eos)

    # one short untimed request: the server answers, and its first-request costs are paid
    probe = await send_one(url, headers, payload(work.prompts[0][:16], 4), 16)
    if not probe.ok:
        raise SystemExit(f"the server at {base_url} did not serve a test request: {probe.error}")

    rng = random.Random(seed)
    offsets, t = [], 0.0  # when each request starts, seconds after the first (Poisson gaps)
    for _ in work.prompts:
        offsets.append(t)
        if request_rate != float("inf"):
            t += rng.expovariate(request_rate)
    requests = [
        (payload(prompt, n), len(prompt), offset)
        for prompt, n, offset in zip(work.prompts, work.output_lens, offsets)
    ]
    if client_processes > 1:
        results, duration, cpu = await asyncio.to_thread(
            _in_processes, url, headers, requests, client_processes
        )
    else:
        start, cpu = time.monotonic(), time.process_time()
        results = await send_all(url, headers, requests, start, max_concurrency)
        duration, cpu = time.monotonic() - start, time.process_time() - cpu
    out = summarize(results, duration, model, base_url, request_rate, max_concurrency)
    return {**out, "client_processes": client_processes, "client_cpu_s": cpu}


async def send_all(
    url: str, headers: dict, requests: list, start: float, max_concurrency: int | None = None
) -> list[RequestResult]:
    """Send each ``(payload, prompt length, offset)`` at ``start`` (``time.monotonic()``) +
    its offset; the results in the same order."""
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(body, prompt_len):
        if semaphore is None:
            return await send_one(url, headers, body, prompt_len)
        async with semaphore:
            return await send_one(url, headers, body, prompt_len)

    tasks = []
    for body, prompt_len, offset in requests:
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(limited(body, prompt_len)))
    return await asyncio.gather(*tasks)


def _in_processes(url: str, headers: dict, requests: list, count: int) -> tuple[list, float, float]:
    """The requests dealt round-robin to ``count`` client processes that start together (one
    Python client reads ~50k SSE chunks a second on one core: past that, its own lag would
    count as the server's). Returns the results in order, the duration and the processes' CPU
    seconds from their start to their end."""
    import multiprocessing

    # a fork server imports this module (torch, transformers) once; each client forks from it
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    children, done = [], False
    for i in range(count):
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=_client_process, args=(child, url, headers, requests[i::count])
        )
        process.start()
        child.close()  # the client process has its own copy
        children.append((process, parent))

    def receive(process, conn):
        try:
            return conn.recv()
        except EOFError:
            process.join(5)
            raise SystemExit(f"a client process failed (exit {process.exitcode})") from None

    try:
        for process, conn in children:
            receive(process, conn)  # "ready": imported, heap settled
        start = time.monotonic() + 0.2  # CLOCK_MONOTONIC: the same clock in every process
        for _, conn in children:
            conn.send(start)
        results: list = [None] * len(requests)
        end, cpu = start, 0.0
        for i, (process, conn) in enumerate(children):
            share, share_end, share_cpu = receive(process, conn)
            results[i::count] = share
            end, cpu = max(end, share_end), cpu + share_cpu
        done = True
    finally:
        for process, _ in children:
            process.join(30 if done else 0)
            if process.is_alive():
                process.kill()
    return results, end - start, cpu


def _client_process(conn, url: str, headers: dict, requests: list) -> None:
    with settled_heap():
        conn.send("ready")
        start = conn.recv()
        cpu = time.process_time()
        results = asyncio.run(send_all(url, headers, requests, start))
        end, cpu = time.monotonic(), time.process_time() - cpu
    conn.send((results, end, cpu))


async def served_model(client, base_url: str, headers: dict) -> str:
    response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def model_card(base_url: str, api_key: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30.0) as client:
        response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        response.raise_for_status()
        return response.json()["data"][0]


def summarize(
    results: list[RequestResult],
    duration: float,
    model: str,
    base_url: str,
    request_rate: float,
    max_concurrency: int | None,
) -> dict:
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2el = [r.latency for r in ok]
    out = {
        "model": model,
        "base_url": base_url,
        "request_rate": request_rate if request_rate != float("inf") else "inf",
        "max_concurrency": max_concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        ms = [v * 1000 for v in values]
        out[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else float("nan")
        for p in (50, 90, 99):
            out[f"p{p}_{name}_ms"] = percentile(ms, p)
    return out


def print_report(r: dict) -> None:
    rate = (
        "inf (all at once)"
        if r["request_rate"] == "inf"
        else f"{r['request_rate']:g} req/s (Poisson)"
    )
    lines = [
        "{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="),
        f"{'Model:':<44}{r['model']}",
        f"{'Request rate:':<44}{rate}",
        f"{'Max concurrency:':<44}{r['max_concurrency'] or 'unlimited'}",
        f"{'Successful requests:':<44}{r['completed']}",
        f"{'Failed requests:':<44}{r['failed']}",
        f"{'Benchmark duration (s):':<44}{r['duration_s']:.2f}",
        f"{'Total input tokens:':<44}{r['total_input_tokens']}",
        f"{'Total generated tokens:':<44}{r['total_output_tokens']}",
        f"{'Request throughput (req/s):':<44}{r['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<44}{r['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':<44}{r['total_token_throughput']:.2f}",
    ]
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
    }
    for key, title in titles.items():
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        lines.append(f"{'Mean ' + key.upper() + ' (ms):':<44}{r[f'mean_{key}_ms']:.2f}")
        for p in (50, 90, 99):
            lines.append(f"{f'P{p} ' + key.upper() + ' (ms):':<44}{r[f'p{p}_{key}_ms']:.2f}")
    lines.append("=" * 60)
    for error in r["errors"]:
        lines.append(f"error: {error}")
    print("\n".join(lines))


def bench_serve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-lite bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", help="model name to send (default: the server's first model)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VLLM_LITE_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $VLLM_LITE_API_KEY)",
    )
    parser.add_argument(
        "--dataset",
        choices=["random", "nano-vllm"],
        default="random",
        help="the throughput benchmark's workloads (vllm_lite/entrypoints/benchmark.py)",
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument(
        "--input-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--output-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="token ids are drawn below this (default: the server's /v1/models vocab_size)",
    )
    parser.add_argument("--temperature", type=float, help="default: 1.0 (random), 0.6 (nano-vllm)")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default inf: all at once)",
    )
    parser.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="send prompts as text, the workload's ids decoded by this tokenizer "
        "(servers that take "
        "only strings, such as `transformers serve`)",
    )
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send vLLM's ignore_eos (default on; off for servers that refuse unknown fields)",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="read the streams from N processes (a Python client reads ~50k chunks/s per core)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    for name in ("num_prompts",):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1")
    if args.request_rate <= 0:
        parser.error("argument --request-rate: must be > 0 (inf: all at once)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("argument --max-concurrency: must be >= 1")
    if args.client_processes < 1:
        parser.error("argument --client-processes: must be >= 1")
    if args.client_processes > 1 and args.max_concurrency is not None:
        parser.error("argument --max-concurrency: works with one client process")
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            parser.error(
                f"argument --{name.replace('_', '-')}: needs 1 <= MIN <= MAX, got {lo} {hi}"
            )
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    temperature = (
        DEFAULT_TEMPERATURE[args.dataset] if args.temperature is None else args.temperature
    )

    try:
        card = asyncio.run(model_card(base_url, args.api_key))
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(
            f"no server answers at {base_url}/v1/models: {type(exc).__name__}: {exc}"
        ) from None
    vocab = args.vocab_size or card.get("vocab_size")
    if not vocab:
        parser.error("the server does not say its vocab_size: give --vocab-size")
    max_len = card.get("max_model_len")
    if max_len and args.input_len[1] + args.output_len[1] > max_len:
        print(
            f"note: the longest request ({args.input_len[1]} + {args.output_len[1]} tokens) "
            f"exceeds the server's "
            f"max_model_len ({max_len}); such requests stop early or are refused",
            file=sys.stderr,
        )
    if args.dataset == "nano-vllm":
        work = Workload.nano_vllm(
            args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab
        )
    else:
        work = Workload.random(
            args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, args.seed
        )
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with settled_heap():  # no full collection of the client's start-up heap while it reads
        result = asyncio.run(
            run_benchmark(
                base_url,
                args.model or card["id"],
                work,
                temperature,
                args.request_rate,
                args.max_concurrency,
                args.api_key,
                args.seed,
                tokenizer,
                args.ignore_eos,
                args.client_processes,
            )
        )
    result.update(dataset=args.dataset, temperature=temperature)
    print_report(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(bench_serve_main(sys.argv[1:]))
