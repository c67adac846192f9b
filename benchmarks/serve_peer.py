"""``vllm-lite serve`` next to ``transformers serve --continuous-batching`` (transformers' own
OpenAI server, the peer of issue 11): the same weights, the same requests, the same client
(``vllm-lite bench serve``'s, streaming), one server after the other (GPU only).

No tokenizer of the Qwen vocabularies is on our machines, and ``transformers serve`` takes only
text prompts, so the model folder is made here: random weights of the shape (transformers' own
initialization, saved as safetensors, bf16) and a word-level tokenizer covering the whole
vocabulary (id i <-> the word ``w{i}``, space separated), so a prompt's text tokenizes back to
exactly its ids on both servers and both detokenize every output token. Requests omit
``ignore_eos`` (the peer refuses unknown fields); with random weights an end-of-sequence token is
one draw in ~150,000.

    python -m benchmarks.serve_peer --model-config qwen3-0.6b --rates 4 16 inf
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile

import httpx
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from benchmarks.serve_overhead import REPO, start_server, wait_until_healthy
from vllm_lite.entrypoints.bench_serve import run_benchmark
from vllm_lite.entrypoints.benchmark import Workload, model_folder


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Id i <-> the word ``w{i}``, space separated: any ids' text tokenizes back to exactly them.
    No special tokens: an added token "w2" would split the word "w200" (the engines take the
    end-of-sequence id from the model's config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=words)


def make_text_model(shape: str, folder: str) -> str:
    """Random bf16 weights of ``shape`` and its word tokenizer in ``folder``."""
    config = AutoConfig.from_pretrained(model_folder(shape))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    word_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_transformers(folder: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        "transformers",
        "serve",
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        folder,
    ]
    log = os.path.join(
        folder, "transformers-serve.log"
    )  # a file: a full pipe would stall the server
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url, "transformers serve", log)
    return proc, url


def engine_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of vllm-lite's engine-side time-to-first-token histogram (arrival at the
    engine front end to the first token leaving the engine), from /metrics."""
    text = httpx.get(url + "/metrics").text
    values = [
        sum(
            float(m)
            for m in re.findall(
                rf"^vllm:time_to_first_token_seconds_{part}{{[^}}]*}} (\S+)$", text, re.M
            )
        )
        for part in ("sum", "count")
    ]
    return values[0], values[1]


def measure(
    name: str,
    url: str,
    model: str | None,
    work: Workload,
    tokenizer,
    rates: list[float],
    timeout: float,
) -> None:
    for rate in rates:
        before = engine_ttft(url) if name == "vllm-lite" else None
        try:
            r = asyncio.run(
                asyncio.wait_for(
                    run_benchmark(
                        url, model, work, 1.0, rate, None, None, 0, tokenizer, ignore_eos=False
                    ),
                    timeout,
                )
            )
        except TimeoutError:
            print(f"{name:12s} rate {rate:>4g}: not finished in {timeout:.0f} s", flush=True)
            continue
        print(
            f"{name:12s} rate {rate:>4g}: {r['output_throughput']:7.0f} output tok/s, {r['completed']} done "
            f"{r['failed']} failed {r['errors'][:1]}; TTFT p50 {r['p50_ttft_ms']:.1f} ms p90 {r['p90_ttft_ms']:.1f}; "
            f"TPOT p50 {r['p50_tpot_ms']:.1f} ms; ITL p50 {r['p50_itl_ms']:.1f} ms p99 {r['p99_itl_ms']:.1f}; "
            f"{r['total_output_tokens']} tokens in {r['duration_s']:.1f} s",
            flush=True,
        )
        if before is not None:
            after = engine_ttft(url)
            print(
                f"{'':12s} TTFT mean: client {r['mean_ttft_ms']:.1f} ms, inside the server (engine front end to "
                f"the token leaving the engine) {1e3 * (after[0] - before[0]) / max(after[1] - before[1], 1):.1f} ms",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-config", default="qwen3-0.6b")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=[100, 1024])
    parser.add_argument("--output-len", type=int, nargs=2, default=[100, 512])
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[4.0, 16.0, float("inf")],
        help="requests/s of each run, in order (repeat one to see a warm rerun)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one run may take")
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=["vllm-lite", "transformers"],
        default=["vllm-lite", "transformers"],
    )
    args = parser.parse_args()
    folder = make_text_model(args.model_config, tempfile.mkdtemp(prefix="serve-peer-"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = AutoConfig.from_pretrained(folder).vocab_size
    work = Workload.random(
        args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab, 0
    )
    print(
        f"{args.model_config}, random bf16 weights + word-level tokenizer (text on for both); {len(work.prompts)} "
        f"requests, prompts U{tuple(args.input_len)}, outputs U{tuple(args.output_len)}, temperature 1",
        flush=True,
    )
    for name in args.servers:
        if name == "vllm-lite":
            proc, url = start_server(
                REPO, folder, {"max_model_len": args.input_len[1] + args.output_len[1]}
            )
            model = None  # the server's first model
        else:  # its /v1/models lists the hub cache; the preloaded model is named by its path
            (proc, url), model = start_transformers(folder), folder
        try:
            measure(name, url, model, work, tokenizer, args.rates, args.timeout)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    sys.stdout.flush()
    os._exit(0)  # a peer's stray threads must not hold the call open


if __name__ == "__main__":
    main()
