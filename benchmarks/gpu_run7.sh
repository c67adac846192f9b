#!/usr/bin/env bash
# GPU session 7: Qwen3-0.6B throughput on a fresh machine (empty Triton cache) with the
# full-budget warm-up, then once more warm.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for i in 1 2; do
  timeout 120 python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --json $OUT/qwen3_$i.json 2>&1 | grep -v "it/s" | tail -5
done
