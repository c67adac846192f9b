#!/usr/bin/env bash
# Ran at fcafe3f (the symmetric-memory all-reduce and --disable-custom-all-reduce), reverted in
# 4ac6f0e: no gain over NCCL (one-shot 27.5 us per all-reduce at tp 4) and a crash at tp 2 in parity.
# GPU call 29 (nvidia-h100-x4, ~9 min): issue 9's tensor-parallel scaling with the symmetric-memory
# all-reduce (one-shot over NVLink) and CUDA graphs of prefill steps: greedy parity at tp 2 and 4
# first (fp32: the symmetric path), then the Qwen2.5-7B shape at tp 1, 2, 4, and tp 2, 4 with
# --disable-custom-all-reduce (NCCL only) in the same call; then one decode step's kernels at tp 4.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c; date -u
timeout 170 python3 -m benchmarks.gpu_tp_check parity --tp 2 4 2>&1 | tail -12 | tee $OUT/parity.txt
B="python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-7b --runs 2"
for args in "--tensor-parallel-size 1" "--tensor-parallel-size 2" "--tensor-parallel-size 2 --disable-custom-all-reduce" \
            "--tensor-parallel-size 4" "--tensor-parallel-size 4 --disable-custom-all-reduce"; do
  echo "== $args"
  timeout 110 $B $args 2>&1 | grep -E -A1 "^vllm-lite|Error|error" | head -6 | tee -a $OUT/bench.txt
done
timeout 90 python3 -m benchmarks.profile_decode --model-config qwen2.5-7b --tensor-parallel-size 4 2>&1 \
  | grep -E "^decode step|  host:|  GPU:|  wall|NCCL|nccl|all_reduce" | cut -c1-200 | tee -a $OUT/profile.txt
nvidia-smi --query-compute-apps=pid,name --format=csv  # nothing of ours may be left
