#!/usr/bin/env bash
# GPU call 14 (nvidia-h100-x1, ~9 min): the sampling extras' cost after the penalties work on
# whole rows in place (issue 10: target < 10% slower than default sampling), a decode step with
# extras, then the Triton kernel grid on CUDA (issue 8) for what time is left (SIGINT at the
# bound: pytest then prints how many passed).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3 --model-config qwen3-0.6b"
for sampling in default extras; do
  timeout 120 $B --sampling $sampling --json $OUT/qwen3_$sampling.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
timeout 90 python3 -m benchmarks.profile_decode --sampling extras 2>&1 | grep -v Warning \
  | grep -E "^decode step|  host:|  GPU:|  wall|^ *(_|void|nvjet)" | cut -c1-60,160-200 | head -24 | tee $OUT/profile.txt
timeout -s INT 300 python3 -m pytest -q tests/test_triton_kernels.py -k grid 2>&1 | tail -3 | tee $OUT/grid.txt
