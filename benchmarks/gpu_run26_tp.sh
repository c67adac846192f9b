#!/usr/bin/env bash
# GPU call 26 (nvidia-h100-x4, ~7 min): issue 9's tensor-parallel scaling on the Qwen2.5-7B
# shape, tp 1, 2 and 4 in one call (default workload, 3 runs each), then the all-reduce share of
# one decode step at tp 2 and 4 (profile_decode, rank 0's kernels).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c; date -u
for tp in 1 2 4; do
  timeout 150 python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-7b --tensor-parallel-size $tp --runs 3 \
    2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
for tp in 2 4; do
  timeout 100 python3 -m benchmarks.profile_decode --model-config qwen2.5-7b --tensor-parallel-size $tp 2>&1 \
    | grep -E "^decode step|  host:|  GPU:|  wall|NCCL|nccl" | cut -c1-200 | tee -a $OUT/profile.txt
done
nvidia-smi --query-compute-apps=pid,name --format=csv  # nothing of ours may be left
