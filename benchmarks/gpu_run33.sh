#!/usr/bin/env bash
# GPU call 33 (nvidia-h100-x1, ~4 min): SmolLM2 text on (its tokenizer), nano-vllm workload:
# `bench throughput` and the plain API alternated, bench / plain / bench, to tell a systematic
# gap from run order (gpu_run32: plain 42,562, then bench 36,205).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TOK=${TOKENIZER:?a folder with SmolLM2s tokenizer files}
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3 --model-config smollm2-135m --tokenizer-path $TOK"
timeout 80 $B 2>&1 | grep -A1 "^vllm-lite" | tail -1
timeout 80 python3 -m benchmarks.plain_api --model-config smollm2-135m --tokenizer-path $TOK 2>&1 | grep -E "^(run|smollm2)"
timeout 80 $B 2>&1 | grep -A1 "^vllm-lite" | tail -1
