#!/usr/bin/env bash
# GPU session 6 (final): Qwen3-0.6B throughput twice (spread), bf16 agreement with
# transformers' own bf16 as a yardstick, Qwen2.5-1.5B with the HF peer in the same call.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
for i in 1 2; do
  timeout 100 python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --json $OUT/qwen3_$i.json 2>&1 | grep -v "it/s" | tail -5
done
timeout 120 python3 -m benchmarks.bf16_agreement 2>&1 | grep -v "it/s" | grep . | tee $OUT/bf16.log | tail -30
timeout 330 python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-1.5b --peer hf --json $OUT/qwen25_hf.json 2>&1 | grep -v "it/s\|request/s" | tail -7
