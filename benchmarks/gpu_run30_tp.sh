#!/usr/bin/env bash
# GPU call 30 (nvidia-h100-x2, ~6 min): tensor parallelism with the CUDA graphs of prefill steps
# (all-reduces captured inside them) after the symmetric-memory all-reduce was reverted: greedy
# parity vs transformers at tp 2 on the tiny models, then a clean exit (normal, Ctrl-C, killed worker).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c; date -u
timeout 330 python3 -m benchmarks.gpu_tp_check parity --tp 2 2>&1 | grep -E "tp=|HANG|CRASH|Error" | cut -c1-600 | tee $OUT/parity.txt
timeout 150 python3 -m benchmarks.gpu_tp_check exit --tp 2 2>&1 | tail -8 | cut -c1-400 | tee $OUT/exit.txt
nvidia-smi --query-compute-apps=pid,name --format=csv
