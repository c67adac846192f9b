#!/usr/bin/env bash
# GPU call 12 (nvidia-h100-x1, ~8 min): the sampling extras' cost after 102beec (issue 10),
# where a decode step's time goes with extras and with a shared 1,024-token prefix (issues 10,
# 12), the Llama-3.2-1B shape (issue 9), and the sampling/API tests on CUDA (the SmolLM2 ones
# need the GGUF, which this call does not carry).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3"
for sampling in default extras; do
  timeout 120 $B --model-config qwen3-0.6b --sampling $sampling --json $OUT/qwen3_$sampling.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
timeout 120 $B --model-config llama-3.2-1b --json $OUT/llama1b.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
for args in "" "--sampling extras" "--shared-prefix 1024"; do
  echo "== profile_decode $args" | tee -a $OUT/profile.txt
  timeout 90 python3 -m benchmarks.profile_decode --model-config qwen3-0.6b $args 2>&1 | grep -v Warning | tail -28 | tee -a $OUT/profile.txt
done
timeout 180 python3 -m pytest -q tests/test_sampling_vllm.py tests/test_api.py -k "not smollm2" 2>&1 | tail -3 | tee $OUT/tests.txt
