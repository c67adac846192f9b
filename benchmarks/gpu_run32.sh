#!/usr/bin/env bash
# GPU call 32 (nvidia-h100-x1, ~8 min), after the prefill-step graphs: issue 9's table re-measured in one call: per shape the
# plain API (nano-vllm's bench.py, default SamplingParams and detokenize=False alternating, 3
# runs each, first runs included) and `bench throughput --dataset nano-vllm` (3 runs timed, its
# step spies in a 4th, untimed run; max_model_len 4096 as nano-vllm's bench.py).
# TOKENIZER: a folder with SmolLM2's tokenizer files (text on for the smollm2-135m shape).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
TOK=${TOKENIZER:-}
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
# a first, discarded process: gpu_run27 saw the first benchmark on a fresh machine run ~15% slow
timeout 60 python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 1 --model-config smollm2-135m \
  2>&1 | grep -A1 "^vllm-lite" | sed 's/^/(discarded) /'
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3"
for shape in qwen3-0.6b qwen2.5-1.5b smollm2-135m; do
  T=""; [ $shape = smollm2-135m ] && [ -n "$TOK" ] && T="--tokenizer-path $TOK"
  timeout 150 python3 -m benchmarks.plain_api --model-config $shape $T 2>&1 | grep -E "^(LLM|run|$shape)" | tee -a $OUT/plain.txt
  timeout 120 $B --model-config $shape $T 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
timeout 120 $B --model-config llama-3.2-1b 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
