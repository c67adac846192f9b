#!/usr/bin/env bash
# GPU call 35 (nvidia-h100-x1, ~5 min): where the nano-vllm run's time goes on Qwen2.5-1.5B and
# Qwen3-0.6B (decode steps by batch size, prefill phase, kernels), one decode step at 256 and 64
# sequences, the decode kernel's split counts per layout, and the prefill kernel's work-list
# launch over the shape grid (not run on a GPU before).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
timeout 150 python3 -m pytest -q -x tests/test_triton_kernels.py -k shape_grid 2>&1 | tail -3
for shape in qwen2.5-1.5b qwen3-0.6b; do
  echo "== profile_run $shape"
  timeout 150 python3 -m benchmarks.profile_run --model-config $shape --dataset nano-vllm 2>&1 | grep -v Warning | head -45
done
for n in 256 64; do
  echo "== profile_decode qwen2.5-1.5b $n"
  timeout 100 python3 -m benchmarks.profile_decode --model-config qwen2.5-1.5b --num-seqs $n 2>&1 | grep -v Warning | head -30
done
timeout 100 python3 -m benchmarks.bench_decode_splits 2>&1 | tail -25
