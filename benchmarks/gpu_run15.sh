#!/usr/bin/env bash
# GPU call 15 (nvidia-h100-x1, ~4 min): the sampling extras' cost once penalties work on the
# rows' token lists (gather/scatter of [P, longest]) instead of dense [P, vocab] passes (issue 10).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3 --model-config qwen3-0.6b"
for sampling in default extras; do
  timeout 120 $B --sampling $sampling --json $OUT/qwen3_$sampling.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
for sampling in default extras; do
  timeout 90 python3 -m benchmarks.profile_decode --sampling $sampling 2>&1 | grep -E "^  GPU:" | tee -a $OUT/profile.txt
done
