#!/usr/bin/env bash
# GPU call 11 (nvidia-h100-x4, ~9.5 min): what issue 8 still lacks on NCCL after the teardown fix
# (a08699f): the killed-worker exit, parity tp 1 = 2 = 4 for the 4-KV-head model, and the
# SmolLM2 shape at tp 3. Each check bounds its own children and kills them on SIGTERM.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | head -4 | tr '\n' ' '; date -u
left() { echo "GPU processes left: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"; }
timeout 220 python3 -m benchmarks.gpu_tp_check exit --tp 2 > $OUT/exit.txt 2>&1; echo "exit rc=$?"
grep -E "^(normal|ctrl-c|kill-worker|   stderr)" $OUT/exit.txt | cut -c1-400; left
timeout 240 python3 -m benchmarks.gpu_tp_check parity --tp 1 2 4 > $OUT/parity.txt 2>&1; echo "parity rc=$?"
grep -E "tp=|HANG|CRASH" $OUT/parity.txt | cut -c1-300; left
timeout 100 python3 -m benchmarks.gpu_tp_check smollm2 --tp 1 3 > $OUT/smollm2.txt 2>&1; echo "smollm2 rc=$?"
grep -E "tp=|HANG|CRASH|unavailable" $OUT/smollm2.txt | cut -c1-300; left
