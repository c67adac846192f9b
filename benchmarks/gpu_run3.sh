#!/usr/bin/env bash
# GPU session 3: one decode step dissected (graph and eager), then the throughput run.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m benchmarks.profile_decode 2>&1 | grep -v "it/s" | tee $OUT/profile_graph.log | tail -32
timeout 150 python3 -m benchmarks.profile_decode --enforce-eager 2>&1 | grep -v "it/s" | tee $OUT/profile_eager.log | tail -26
timeout 200 python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --json $OUT/qwen3.json 2>&1 | grep -v "it/s" | tail -7
