#!/usr/bin/env bash
# GPU call 40 (nvidia-h100-x4, ~8 min): issue 9's tensor-parallel scaling re-measured in one call
# (Qwen2.5-7B shape, bench throughput default workload, median of 2, NCCL all-reduce), then one
# decode step's kernels on rank 0 at tp 2 and tp 1 (where tp 2 loses against 2x).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c; date -u
B="python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-7b --runs 2"
for tp in 1 2 4; do
  timeout 130 $B --tensor-parallel-size $tp > $OUT/bench_tp$tp.txt 2>&1
  echo "tp $tp: $(grep -A1 '^vllm-lite' $OUT/bench_tp$tp.txt | tail -1)"; grep "pure decode" $OUT/bench_tp$tp.txt
done
for tp in 2 1; do
  echo "== profile_decode tp $tp"
  timeout 90 python3 -m benchmarks.profile_decode --model-config qwen2.5-7b --tensor-parallel-size $tp \
    > $OUT/profile_tp$tp.txt 2>&1
  grep -E "^decode step|  host:|  GPU:|_kernel|nvjet|nccl|NCCL" $OUT/profile_tp$tp.txt | cut -c1-60,150-250 | head -16
done
nvidia-smi --query-compute-apps=pid,name --format=csv  # nothing of ours may be left
