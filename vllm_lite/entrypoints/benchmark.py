"""``vllm-lite bench throughput``: the common offline workload (256 requests, input and output
lengths uniform in 100..1024, random token ids, seed 0, ignore_eos) on real or dummy weights,
or ``--dataset nano-vllm`` (nano-vllm's bench.py requests, draw for draw), or ``--dataset
shared-prefix`` (every request starts with the same system prompt: prefix caching), timed ``--runs``
times on the user's path (default SamplingParams, so text is detokenized wherever a tokenizer
fits the model), with its memory-traffic floor and, with ``--peer hf``, HF transformers'
continuous batching on the same requests in the same call. ``--sampling extras`` puts penalties
and ``logprobs=5`` on every request (the cost of the sampling extras). ``--structured-output
json_schema`` holds every request to one JSON schema (the cost of structured outputs; the schema
cannot be complete within 256 tokens, so each request still makes its max_tokens), and reports
the grammar compile time per schema."""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from vllm_lite.config import EngineConfig, add_config_flags
from vllm_lite.models import get_model_class
from vllm_lite.models.moe import MoEForCausalLM, moe_spec

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "model_configs")
SMOLLM2_VOCAB = 49152  # a Llama shape with this vocabulary can use SmolLM2's tokenizer
DEFAULT_TEMPERATURE = {"random": 1.0, "nano-vllm": 0.6, "shared-prefix": 1.0}
DEFAULT_LENS = {
    "shared-prefix": ((128, 128), (128, 128))
}  # question and output lengths; else 100..1024
EXTRAS = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5, logprobs=5)


# a stop string random tokens do not produce: per-token text and its stop check, no early end
NEVER_STOP = "\u2063never\u2063"


def bench_schema(min_items: int = 64, field: str = "name") -> dict:
    """An array of records (integers, bounded strings, enums, nested arrays, booleans) at least
    ``min_items`` long: at ~20 tokens a record it never ends before 256 output tokens."""
    record = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": {"type": "integer"},
            field: {"type": "string", "maxLength": 16},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
            "ok": {"type": "boolean"},
        },
        "required": ["id", field, "tags", "ok"],
    }
    return {"type": "array", "items": record, "minItems": min_items}


def add_request_extra_flags(parser) -> None:
    """``--sampling`` and ``--structured-output``: what every request of a benchmark carries
    beyond the default SamplingParams (the throughput benchmark and ``bench_host_step``)."""
    parser.add_argument(
        "--sampling",
        choices=["default", "extras"],
        default="default",
        help="extras: " + ", ".join(f"{k}={v}" for k, v in EXTRAS.items()) + " on every request",
    )
    parser.add_argument(
        "--structured-output",
        choices=["none", "json_schema"],
        default="none",
        help="json_schema: every request held to one JSON schema (bench_schema)",
    )


def compile_seconds(engine, count: int = 8) -> list[float]:
    """First-compile time of ``count`` schemas of the benchmark's shape, each different."""
    from vllm_lite import StructuredOutputsParams

    manager = engine.structured_output_manager()
    out = []
    for i in range(count):
        so = StructuredOutputsParams(json=bench_schema(64 + i, f"field_{i}"))
        manager.compiled(so)
        out.append(manager.compile_seconds[so.key])
    return out


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @classmethod
    def random(
        cls,
        num: int,
        input_range: tuple[int, int],
        output_range: tuple[int, int],
        vocab: int,
        seed: int,
    ):
        rng = random.Random(seed)
        input_lens = [rng.randint(*input_range) for _ in range(num)]
        output_lens = [rng.randint(*output_range) for _ in range(num)]
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in input_lens]
        return cls(prompts, output_lens)

    @classmethod
    def nano_vllm(
        cls,
        num: int = 256,
        input_range: tuple[int, int] = (100, 1024),
        output_range: tuple[int, int] = (100, 1024),
        vocab: int = 10001,
    ):
        """nano-vllm's bench.py draws: ``random.seed(0)``; each prompt's length, then its ids in
        0..10000 (capped below ``vocab`` for smaller models); then each request's max_tokens."""
        rng = random.Random(0)
        top = min(10000, vocab - 1)
        prompts = [
            [rng.randint(0, top) for _ in range(rng.randint(*input_range))] for _ in range(num)
        ]
        output_lens = [rng.randint(*output_range) for _ in range(num)]
        return cls(prompts, output_lens)

    @classmethod
    def shared_prefix(
        cls,
        num: int,
        prefix_len: int,
        input_range: tuple[int, int],
        output_range: tuple[int, int],
        vocab: int,
        seed: int,
    ):
        """One system prompt of ``prefix_len`` random ids, then each request's own question."""
        rng = random.Random(seed)
        prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
        work = cls.random(num, input_range, output_range, vocab, seed + 1)
        return cls([prefix + p for p in work.prompts], work.output_lens)


def text_tokenizer_for_shape(hf_config) -> str | None:
    """A tokenizer folder for a weights-free shape: SmolLM2's for a Llama of its vocabulary,
    else None (no tokenizer fits: token ids only)."""
    if hf_config.model_type == "llama" and hf_config.vocab_size == SMOLLM2_VOCAB:
        from vllm_lite.default_model import default_model_path

        return default_model_path()
    return None


def model_folder(model_config: str) -> str:
    """A folder holding ``config.json`` for a named shape (``qwen3-0.6b``) or a JSON path."""
    path = (
        model_config
        if os.path.exists(model_config)
        else os.path.join(CONFIG_DIR, f"{model_config}.json")
    )
    if not os.path.exists(path):
        names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR))
        raise SystemExit(f"unknown model config {model_config!r}; known: {names}")
    if os.path.isdir(path):
        return path
    folder = tempfile.mkdtemp(prefix="vllm-lite-shape-")
    with open(path) as src, open(os.path.join(folder, "config.json"), "w") as dst:
        dst.write(src.read())
    return folder


@dataclass(frozen=True)
class WeightBytes:
    """The weights a step reads: ``always`` (embeddings and head, attention, dense MLPs, routers,
    shared experts) and, in each of ``moe_layers`` mixture-of-experts layers, every expert that
    one of the step's tokens picked (``per_expert`` bytes each)."""

    always: int
    per_expert: int = 0
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0

    @property
    def total(self) -> int:
        return self.always + self.moe_layers * self.num_experts * self.per_expert

    def read_by(self, tokens: int) -> float:
        """Bytes read by a step of ``tokens`` tokens, for uniform routing: an expert is missed by
        one token's ``top_k`` picks with probability 1 - k/E, by all of them with its power."""
        if not self.moe_layers:
            return self.always
        touched = self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)
        return self.always + self.moe_layers * touched * self.per_expert


def weight_and_kv_bytes(hf_config, dtype_bytes: int = 2) -> tuple[WeightBytes, int]:
    """The weights' bytes, and KV bytes per token (all layers, K and V). Norms are left out."""
    h, v, n = hf_config.hidden_size, hf_config.vocab_size, hf_config.num_hidden_layers
    hd = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * hd, hf_config.num_key_value_heads * hd
    attention = h * (q + 2 * kv) + q * h
    embeddings = v * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    dense_mlp = 3 * h * hf_config.intermediate_size
    if get_model_class(hf_config) is not MoEForCausalLM:
        weights = WeightBytes((n * (attention + dense_mlp) + embeddings) * dtype_bytes)
        return weights, 2 * n * kv * dtype_bytes
    spec = moe_spec(hf_config)
    sparse = len(spec.sparse_layers)
    shared = 3 * h * spec.shared_expert_size + h if spec.shared_expert_size else 0  # with its gate
    router = spec.num_experts * h
    always = n * attention + (n - sparse) * dense_mlp + sparse * (router + shared) + embeddings
    weights = WeightBytes(
        always * dtype_bytes,
        3 * h * spec.intermediate_size * dtype_bytes,
        sparse,
        spec.num_experts,
        spec.top_k,
    )
    return weights, 2 * n * kv * dtype_bytes


def decode_floor_seconds(
    work: Workload, weights: WeightBytes, kv_per_token: int, bandwidth: float
) -> float:
    """Every decode step reads the weights its tokens need (all of a dense model's; the touched
    experts of a mixture of experts) once, and every live sequence's KV once."""
    total, steps = 0, max(work.output_lens)
    for step in range(steps):
        live = [len(p) + step for p, o in zip(work.prompts, work.output_lens) if o > step]
        total += weights.read_by(len(live)) + sum(live) * kv_per_token
    return total / bandwidth


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() * 4 / (start.elapsed_time(end) / 1e3)


def prompts_pending(engine) -> bool:
    """Whether some request still has prompt tokens to compute (the run's prefill phase)."""
    return bool(engine.scheduler.waiting) or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    )


def record_steps(engine) -> list[tuple[int, int, int, float]]:
    """From now on, every ``engine.step()`` appends (decode rows, tokens, context tokens, wall
    seconds) of the batch it scheduled to the returned list (steps overlap: a step's wall time
    is mostly the GPU work of the one before)."""
    log: list[tuple[int, int, int, float]] = []
    last_batch = [(0, 0, 0)]
    step, schedule = engine.step, engine.scheduler.schedule

    def spy_schedule():
        b = schedule()
        ctx = sum(s.num_computed_tokens + n for s, n in zip(b.seqs, b.num_new_tokens))
        last_batch[0] = (b.num_decodes, b.num_tokens, ctx)
        return b

    def timed_step():
        t0 = time.perf_counter()
        out = step()
        log.append((*last_batch[0], time.perf_counter() - t0))
        return out

    engine.scheduler.schedule, engine.step = spy_schedule, timed_step
    return log


def run_ours(
    config: EngineConfig,
    work: Workload,
    temperature: float,
    runs: int = 1,
    dataset: str = "random",
    profile_path: str | None = None,
    extras: dict | None = None,
    structured: bool = False,
) -> dict:
    """Build the engine, warm it up, then time ``llm.generate`` on the workload ``runs`` times
    with default SamplingParams (detokenized when the engine has a tokenizer), plus ``extras``;
    then run it once more, untimed, recording every step."""
    from vllm_lite import LLM, SamplingParams

    llm = LLM(config=config)
    extras = dict(extras or {})
    if structured:
        from vllm_lite import StructuredOutputsParams

        extras["structured_outputs"] = StructuredOutputsParams(json=bench_schema())
    params = [
        SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, **extras)
        for n in work.output_lens
    ]
    engine = llm.engine
    if dataset == "nano-vllm":
        # nano-vllm's warm-up: one short generate with its default SamplingParams (64 tokens)
        llm.generate(
            ["Benchmark: "] if engine.tokenizer is not None else [work.prompts[0][:3]],
            SamplingParams(max_tokens=64),
            use_tqdm=False,
        )
    else:
        # compile every kernel variant outside the timed runs (fresh prefill, decode, and with
        # a tiny token budget chunked prefill next to decodes)
        warm = SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True)
        llm.generate(work.prompts[:16], warm, use_tqdm=False)  # full-budget steps, as a run starts
        budget, engine.scheduler.max_num_batched_tokens = (
            engine.scheduler.max_num_batched_tokens,
            64,
        )
        llm.generate(work.prompts[:4], warm, use_tqdm=False)
        engine.scheduler.max_num_batched_tokens = budget
    compile_s = []
    if structured:  # the grammar compiled, the mask kernels warmed up, outside the timed runs
        t0 = time.perf_counter()
        llm.generate(work.prompts[:4], SamplingParams(max_tokens=8, **extras), use_tqdm=False)
        compile_s = [time.perf_counter() - t0] + compile_seconds(engine)
    elapsed, cpu, preemptions, cache_hits = [], [], [], []
    for run in range(runs):
        before = engine.scheduler.num_preemptions
        queries, hits = engine.prefix_cache_queries, engine.prefix_cache_hits
        assert (
            llm.reset_prefix_cache()
        )  # every run computes its prompts: none is left from the last
        profiler = cProfile.Profile() if profile_path and run == 0 else None
        t0, cpu0 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        outputs = llm.generate(work.prompts, params, use_tqdm=False)
        elapsed.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - cpu0)
        if profiler:
            profiler.disable()
            with open(profile_path, "w") as fh:
                pstats.Stats(profiler, stream=fh).sort_stats("tottime").print_stats(40)
        assert [len(o.outputs[0].token_ids) for o in outputs] == work.output_lens
        preemptions.append(engine.scheduler.num_preemptions - before)
        cache_hits.append((engine.prefix_cache_hits - hits, engine.prefix_cache_queries - queries))
    median_run = sorted(range(runs), key=elapsed.__getitem__)[runs // 2]
    # the steps of one more, untimed run: the spies cost ~1% of a host-bound run
    steps = record_steps(engine)
    assert llm.reset_prefix_cache()
    llm.generate(work.prompts, params, use_tqdm=False)
    llm.close()
    text = engine.tokenizer is not None
    result = {
        "elapsed": elapsed,
        "cpu_s": cpu,
        "median_elapsed": statistics.median(elapsed),
        "steps": steps,
        "num_blocks": engine.block_manager.num_blocks,
        "preemptions": preemptions[median_run],
        "prefix_cache_hit_tokens": cache_hits[median_run][0],
        "prefix_cache_query_tokens": cache_hits[median_run][1],
        "dtype": str(engine.runner.dtype),
        "text": text,
        "grammar_compile_s": compile_s,
        "tokenizer": (config.tokenizer_path or engine.model_path) if text else None,
    }
    del llm, engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def run_hf_peer(folder: str, work: Workload, dtype: torch.dtype) -> float:
    """HF transformers continuous batching (``paged|sdpa``), each request with its own length."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    hf_config = AutoConfig.from_pretrained(folder)
    with torch.device(
        "cuda"
    ):  # built on the GPU: a 30B+ model's random init on the host takes minutes
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation="paged|sdpa"
        ).eval()
    gen = GenerationConfig(
        max_new_tokens=max(work.output_lens), do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen, block=True) as manager:
        ids = [
            manager.add_request(p, max_new_tokens=n, eos_token_id=-1)
            for p, n in zip(work.prompts, work.output_lens)
        ]
        done = 0
        while done < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
    return time.perf_counter() - t0


def bench_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vllm-lite bench", description=__doc__)
    parser.add_argument("mode", choices=["throughput"])
    parser.add_argument(
        "--model-config",
        default="qwen3-0.6b",
        help="a shape in vllm_lite/model_configs (qwen3-0.6b, qwen2.5-1.5b, llama-3.2-1b, "
        "smollm2-135m, qwen2.5-7b, and the mixtures of experts qwen3-30b-a3b, mixtral-8x7b, "
        "qwen1.5-moe-a2.7b) or a config.json path; weights are random (load_format dummy)",
    )
    parser.add_argument(
        "--dataset",
        choices=["random", "nano-vllm", "shared-prefix"],
        default="random",
        help="random: ids uniform over the vocabulary, "
        "lengths uniform in --input-len/--output-len, "
        "seed --seed; nano-vllm: nano-vllm's bench.py requests (random.seed(0), ids 0..10000, "
        "temperature 0.6), scaled by --num-prompts/--input-len/--output-len; shared-prefix: "
        "a --prefix-len system prompt shared by all, then --input-len own tokens (default 128) "
        "and --output-len (default 128)",
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument(
        "--input-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="default 100 1024"
    )
    parser.add_argument(
        "--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="default 100 1024"
    )
    parser.add_argument(
        "--prefix-len", type=int, default=1024, help="shared-prefix: the system prompt's length"
    )
    add_request_extra_flags(parser)
    parser.add_argument(
        "--temperature", type=float, help="default: 1.0 (random, shared-prefix), 0.6 (nano-vllm)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="timed runs after one warm-up; median and spread"
    )
    parser.add_argument("--peer", choices=["none", "hf"], default="none")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--profile", help="write a cProfile of the first timed run (host view) here"
    )
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    mode, json_path, peer, profile_path = (
        args.pop("mode"),
        args.pop("json"),
        args.pop("peer"),
        args.pop("profile"),
    )
    dataset, runs, model_config = args.pop("dataset"), args.pop("runs"), args.pop("model_config")
    default_in, default_out = DEFAULT_LENS.get(dataset, ((100, 1024), (100, 1024)))
    num, in_range, out_range = (
        args.pop("num_prompts"),
        args.pop("input_len"),
        args.pop("output_len"),
    )
    in_range, out_range = tuple(in_range or default_in), tuple(out_range or default_out)
    prefix_len, extras = (
        args.pop("prefix_len"),
        EXTRAS if args.pop("sampling") == "extras" else None,
    )
    temperature = args.pop("temperature")
    structured = args.pop("structured_output") == "json_schema"
    temperature = DEFAULT_TEMPERATURE[dataset] if temperature is None else temperature
    if runs < 1:
        raise SystemExit("--runs must be >= 1")

    from transformers import AutoConfig

    if "model_path" not in args:
        args["model_path"] = model_folder(model_config)
        args.setdefault("load_format", "dummy")
        if "tokenizer_path" not in args:  # a shape folder holds only config.json
            tokenizer_path = text_tokenizer_for_shape(
                AutoConfig.from_pretrained(args["model_path"])
            )
            if tokenizer_path is not None:
                args["tokenizer_path"] = tokenizer_path
    folder = args["model_path"]
    hf_config = AutoConfig.from_pretrained(folder)
    if (
        dataset == "nano-vllm"
    ):  # its bench.py's LLM(path, max_model_len=4096), within the model's limit
        args.setdefault(
            "max_model_len",
            max(min(4096, hf_config.max_position_embeddings), in_range[1] + out_range[1]),
        )
    args.setdefault(
        "max_model_len",
        in_range[1] + out_range[1] + (prefix_len if dataset == "shared-prefix" else 0),
    )
    config = EngineConfig(**args)

    if dataset == "nano-vllm":
        work = Workload.nano_vllm(num, in_range, out_range, hf_config.vocab_size)
    elif dataset == "shared-prefix":
        work = Workload.shared_prefix(
            num, prefix_len, in_range, out_range, hf_config.vocab_size, config.seed
        )
    else:
        work = Workload.random(num, in_range, out_range, hf_config.vocab_size, config.seed)
    total_in, total_out = sum(map(len, work.prompts)), sum(work.output_lens)

    ours = run_ours(config, work, temperature, runs, dataset, profile_path, extras, structured)
    weights, kv_per_token = weight_and_kv_bytes(hf_config)
    elapsed = ours["median_elapsed"]
    per_run = sorted(total_out / e for e in ours["elapsed"])
    result = {
        "mode": mode,
        "dataset": dataset,
        "model_config": model_config,
        "num_prompts": num,
        "temperature": temperature,
        "text": ours["text"],
        "tokenizer": ours["tokenizer"],
        "sampling": extras or "default",
        "prefix_caching": config.enable_prefix_caching,
        "structured_output": "json_schema" if structured else "none",
        "grammar_compile_s": ours["grammar_compile_s"],
        "prefix_cache_hit_tokens": ours["prefix_cache_hit_tokens"],
        "input_tokens": total_in,
        "output_tokens": total_out,
        "runs": runs,
        "elapsed_s": elapsed,
        "elapsed_s_runs": ours["elapsed"],
        "requests_per_s": num / elapsed,
        "output_tokens_per_s": total_out / elapsed,
        "output_tokens_per_s_min": per_run[0],
        "output_tokens_per_s_max": per_run[-1],
        "total_tokens_per_s": (total_in + total_out) / elapsed,
        "num_blocks": ours["num_blocks"],
        "preemptions": ours["preemptions"],
        "dtype": ours["dtype"],
        "steps": len(ours["steps"]),
        "first_steps(decodes,tokens,context,s)": ours["steps"][:30],
        "slowest_steps": sorted(ours["steps"], key=lambda s: -s[3])[:10],
    }
    text = (
        f"text on (detokenized, tokenizer {ours['tokenizer']})"
        if ours["text"]
        else "text OFF: token ids only, no tokenizer fits this model shape "
        "(detokenization not measured)"
    )
    print(
        f"\nvllm-lite  {model_config}, dataset {dataset}: {num} requests, "
        f"{total_in} input + {total_out} output "
        f"tokens, temperature {temperature}, {text}, sampling {'extras' if extras else 'default'}, "
        f"prefix caching {'on' if config.enable_prefix_caching else 'off'}, "
        f"structured output {'json_schema' if structured else 'none'}"
    )
    if structured:
        first, each = ours["grammar_compile_s"][0], sorted(ours["grammar_compile_s"][1:])
        print(
            f"  grammar: first structured generate (compile + 8 tokens) {first:.3f} s; "
            f"compile per schema median {1e3 * each[len(each) // 2]:.1f} ms "
            f"(max {1e3 * each[-1]:.1f} ms, {len(each)} schemas)"
        )
    print(
        f"  median of {runs} run(s): {elapsed:.2f} s, "
        f"{result['output_tokens_per_s']:.0f} output tokens/s "
        f"(runs {per_run[0]:.0f}..{per_run[-1]:.0f}), {result['requests_per_s']:.2f} requests/s, "
        f"{result['total_tokens_per_s']:.0f} total tokens/s  ({len(ours['steps'])} steps, "
        f"{ours['preemptions']} preemptions, {ours['num_blocks']} KV blocks, "
        f"{ours['prefix_cache_hit_tokens']} of {ours['prefix_cache_query_tokens']} prompt tokens "
        "from the prefix cache)"
    )
    if torch.cuda.is_available():
        bw = copy_bandwidth()
        floor = decode_floor_seconds(work, weights, kv_per_token, bw)
        decode_steps = [s for s in ours["steps"] if s[0] == s[1] and s[0] > 0]
        full = sorted(s for s in decode_steps if s[0] == max(d[0] for d in decode_steps))
        step_bw = [
            (weights.read_by(rows) + ctx * kv_per_token) / sec / bw for rows, _, ctx, sec in full
        ]
        step_bw.sort()
        result.update(
            {
                "copy_bandwidth_TBps": bw / 1e12,
                "decode_floor_s": floor,
                "floor_output_tokens_per_s": total_out / floor,
                "fraction_of_floor": floor / elapsed,
                "decode_step_bw_fraction_median": step_bw[len(step_bw) // 2] if step_bw else None,
                "decode_time_s": sum(s[3] for s in decode_steps),
                "prefill_or_mixed_time_s": sum(
                    s[3] for s in ours["steps"] if s not in decode_steps
                ),
            }
        )
        print(
            f"  memory-traffic floor {floor:.2f} s ({total_out / floor:.0f} output tokens/s at "
            f"{bw / 1e12:.2f} TB/s copy bandwidth): "
            f"the median run is at {100 * floor / elapsed:.0f}% of it"
        )
        if weights.moe_layers:
            batch = max((d[0] for d in decode_steps), default=1)
            result.update(
                {
                    "weight_GB": weights.total / 1e9,
                    "weight_GB_read_by_largest_decode_step": weights.read_by(batch) / 1e9,
                }
            )
            print(
                f"  mixture of experts: {weights.total / 1e9:.1f} GB of weights; "
                f"a decode step of 1 token reads {weights.read_by(1) / 1e9:.2f} GB, "
                f"of {batch} tokens {weights.read_by(batch) / 1e9:.2f} GB (uniform routing)"
            )
        if step_bw:
            print(
                f"  decode steps at the largest batch ({full[0][0]} seqs): median "
                f"{100 * result['decode_step_bw_fraction_median']:.0f}% of copy bandwidth "
                f"(weights + live KV bytes / step time, host time included)"
            )
        print(
            f"  one more run, untimed, with step spies: "
            f"{result['decode_time_s']:.2f} s in pure decode steps, "
            f"{result['prefill_or_mixed_time_s']:.2f} s in prefill/mixed steps"
        )
    if peer == "hf":
        from vllm_lite.worker.model_runner import DTYPES

        try:
            peer_s = run_hf_peer(
                folder, work, DTYPES.get(ours["dtype"].replace("torch.", ""), torch.bfloat16)
            )
        except Exception as exc:  # report ours even if the peer breaks
            import traceback

            traceback.print_exc()
            print(f"HF peer failed: {exc!r}")
            peer_s = float("nan")
        result.update(
            {
                "hf_elapsed_s": peer_s,
                "hf_output_tokens_per_s": total_out / peer_s,
                "speedup_vs_hf": peer_s / elapsed,
            }
        )
        print(
            f"HF transformers continuous batching (paged|sdpa): {peer_s:.1f} s, "
            f"{total_out / peer_s:.0f} output tokens/s -> vllm-lite is {peer_s / elapsed:.1f}x"
        )
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
