#!/usr/bin/env bash
# For the multi-GPU issue (needs a kind with >= 4 GPUs; NCCL_NVLS_ENABLE=0 etc. stay as the
# machine sets them): tp 1/2/4 parity on the tiny models, then the throughput workload on the
# Qwen2.5-7B shape at tp 1, 2, 4 with the all-reduce share of one decode step. Not yet run.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 -m pytest tests/test_tensor_parallel.py -q -x 2>&1 | tail -3
for tp in 1 2 4; do
  timeout 150 python3 -m vllm_lite.entrypoints.cli bench throughput --model-config qwen2.5-7b --tensor-parallel-size $tp \
    --json $OUT/qwen7b_tp$tp.json 2>&1 | grep -v "it/s" | tail -5
  timeout 120 python3 -m benchmarks.profile_decode --model-config qwen2.5-7b --tensor-parallel-size $tp 2>&1 \
    | grep -A3 "^decode step\|NCCL" | tee $OUT/profile_tp$tp.log
done
nvidia-smi --query-compute-apps=pid,name --format=csv  # nothing of ours may be left
