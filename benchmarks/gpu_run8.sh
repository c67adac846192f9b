#!/usr/bin/env bash
# GPU call 8 (nvidia-h100-x1, ~8 min): the user path (issue 9) and the sampling extras' cost
# (issue 10). Per shape: the plain API (nano-vllm's bench.py, default SamplingParams then
# detokenize=False, 3 runs each, first runs included) and `bench throughput --dataset nano-vllm`
# (3 runs), then the same with penalties + logprobs=5 on every request. TOKENIZER: a folder with
# SmolLM2's tokenizer files (for the smollm2-135m shape; the GGUF need not travel).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
TOK=${TOKENIZER:-}
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3"
for shape in qwen3-0.6b qwen2.5-1.5b; do
  timeout 150 python3 -m benchmarks.plain_api --model-config $shape 2>&1 | grep -E "^(LLM|run|$shape)" | tee -a $OUT/plain.txt
  timeout 120 $B --model-config $shape --json $OUT/bench_$shape.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
timeout 120 $B --model-config qwen3-0.6b --sampling extras --json $OUT/extras.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
if [ -n "$TOK" ]; then
  timeout 90 python3 -m benchmarks.plain_api --model-config smollm2-135m --tokenizer-path $TOK 2>&1 | grep -E "^(LLM|run|smollm2)" | tee -a $OUT/plain.txt
  timeout 90 $B --model-config smollm2-135m --tokenizer-path $TOK 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
fi
