#!/usr/bin/env bash
# GPU call 13 (nvidia-h100-x2, ~9 min): tensor parallelism on two H100s after 102beec. Issue 8:
# the exit after a run, after Ctrl-C and after a killed worker; greedy parity tp 1 = tp 2 for
# 1, 2 and 4 KV heads. Issue 9: the Qwen2.5-7B shape's throughput at tp 1 and tp 2 (default
# workload, as the 10,705 vs 12,236) and the all-reduce share of a tp-2 decode step.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | tr '\n' ' '; date -u
left() { echo "GPU processes left: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"; }
timeout 200 python3 -m benchmarks.gpu_tp_check exit --tp 2 > $OUT/exit.txt 2>&1; echo "exit rc=$?"
grep -E "^(normal|ctrl-c|kill-worker|   stderr)" $OUT/exit.txt | cut -c1-400; left
timeout 200 python3 -m benchmarks.gpu_tp_check parity --tp 1 2 > $OUT/parity.txt 2>&1; echo "parity rc=$?"
grep -E "tp=|HANG|CRASH" $OUT/parity.txt | cut -c1-300; left
for tp in 1 2; do
  timeout 100 python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-7b --tensor-parallel-size $tp \
    --json $OUT/qwen7b_tp$tp.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
timeout 80 python3 -m benchmarks.profile_decode --model-config qwen2.5-7b --tensor-parallel-size 2 2>&1 \
  | grep -E "^decode step|  host:|  GPU:|  wall|NCCL|nccl" | cut -c1-200 | tee $OUT/profile_tp2.txt; left
