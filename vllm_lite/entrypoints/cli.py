"""Command line: ``vllm-lite generate`` (what ``python main.py`` runs), ``vllm-lite serve`` (the
OpenAI-compatible server), ``vllm-lite bench throughput|serve`` and ``vllm-lite report TRACE``
(the page of a run traced with ``--trace FILE``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from vllm_lite.config import EngineConfig, add_config_flags

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a KV cache is.",
    "List three prime numbers.",
]


def generate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vllm-lite generate", description="Chat with a model offline."
    )
    parser.add_argument(
        "--config", default="config.yaml", help="YAML config (default: ./config.yaml if present)"
    )
    parser.add_argument(
        "--prompt", action="append", help="a user message (repeatable); default: built-in prompts"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--raw", action="store_true", help="send prompts as plain text, without the chat template"
    )
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    prompts = args.pop("prompt") or DEFAULT_PROMPTS
    max_tokens, temperature, top_p, raw = (
        args.pop(k) for k in ("max_tokens", "temperature", "top_p", "raw")
    )
    if os.path.exists(config_path):
        config = EngineConfig.from_yaml(config_path, overrides=args)
    elif config_path != "config.yaml":
        raise SystemExit(f"config file {config_path!r} not found")
    else:
        config = EngineConfig(**args)

    from vllm_lite import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(config=config)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    t0 = time.perf_counter()
    if raw:
        outputs = llm.generate(prompts, params)
    else:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    gen_s = time.perf_counter() - t0
    for prompt, out in zip(prompts, outputs):
        print(f"\n>>> {prompt}\n{out.outputs[0].text.strip()}")
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    engine = llm.engine
    print(
        f"\n[{engine.model_path} | {engine.device} {engine.runner.dtype} "
        f"| blocks {engine.block_manager.num_blocks}"
        f" x {config.block_size}] load {load_s:.1f} s, generate {gen_s:.2f} s, "
        f"{n_out} tokens, {n_out / gen_s:.1f} tokens/s"
    )
    llm.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vllm-lite [generate|serve|bench|report] ...``; a bad flag or config value is one line on
    stderr and exit status 2 (vllm_lite/entrypoints/cli_util.py)."""
    from vllm_lite.entrypoints.cli_util import one_line_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    command = (
        argv.pop(0) if argv and argv[0] in ("generate", "bench", "serve", "report") else "generate"
    )
    with one_line_errors(f"vllm-lite {command}"):
        if command == "serve":
            from vllm_lite.entrypoints.openai_server import serve_main

            return serve_main(argv)
        if command == "report":
            from vllm_lite.trace_report import report_main

            return report_main(argv)
        if command == "bench" and argv and argv[0] == "serve":
            from vllm_lite.entrypoints.bench_serve import bench_serve_main

            return bench_serve_main(argv[1:])
        if command == "bench":
            from vllm_lite.entrypoints.benchmark import bench_main

            return bench_main(argv)
        return generate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
