"""The plain API as a user runs it, on nano-vllm's bench.py workload draw for draw: ``LLM(path,
max_model_len=4096, load_format="dummy")``, one warm-up ``generate``, then the timed
``llm.generate(prompts, params, use_tqdm=False)`` with ``SamplingParams(temperature=0.6,
ignore_eos=True, max_tokens=...)``. Runs default SamplingParams (text on where a tokenizer fits)
and ``detokenize=False`` alternately in one process, ``--runs`` times each, first run included.

    python -m benchmarks.plain_api --model-config qwen3-0.6b --runs 3
    python -m benchmarks.plain_api --model-config smollm2-135m --tokenizer-path /path/to/smollm2
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import AutoConfig

from vllm_lite import LLM, SamplingParams
from vllm_lite.entrypoints.benchmark import Workload, model_folder, text_tokenizer_for_shape


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-config", default="qwen3-0.6b")
    parser.add_argument(
        "--tokenizer-path", help="default: SmolLM2's for a Llama of its vocabulary, else none"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=256)
    args = parser.parse_args()

    folder = model_folder(args.model_config)
    hf_config = AutoConfig.from_pretrained(folder)
    tokenizer = args.tokenizer_path or text_tokenizer_for_shape(hf_config)
    work = Workload.nano_vllm(args.num_prompts, vocab=hf_config.vocab_size)
    t0 = time.perf_counter()
    llm = LLM(folder, max_model_len=4096, load_format="dummy", tokenizer_path=tokenizer)
    print(
        f"LLM(...) {time.perf_counter() - t0:.1f} s; text {'on' if llm.engine.tokenizer else 'OFF (no tokenizer)'}"
    )
    llm.generate(
        ["Benchmark: "] if llm.engine.tokenizer else [work.prompts[0][:3]],
        SamplingParams(),
        use_tqdm=False,
    )
    rates: dict[str, list[float]] = {"default": [], "detokenize=False": []}
    for run in range(args.runs):
        for name, extra in (("default", {}), ("detokenize=False", {"detokenize": False})):
            params = [
                SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n, **extra)
                for n in work.output_lens
            ]
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            llm.generate(work.prompts, params, use_tqdm=False)
            rates[name].append(sum(work.output_lens) / (time.perf_counter() - t0))
            print(f"run {run + 1} {name:<17} {rates[name][-1]:8.0f} output tok/s", flush=True)
    for name, r in rates.items():
        print(
            f"{args.model_config} {name:<17} median {statistics.median(r):.0f} tok/s (runs {min(r):.0f}..{max(r):.0f})"
        )
    llm.close()


if __name__ == "__main__":
    main()
