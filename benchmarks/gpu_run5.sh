#!/usr/bin/env bash
# GPU session 5: overlapped steps. Kernel + engine tests on CUDA, the decode step dissected,
# Qwen3-0.6B and Qwen2.5-1.5B throughput.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 150 python3 -m pytest tests/test_parity_hf.py tests/test_sampling.py tests/test_api.py tests/test_errors.py -q -x -k "not smollm2" 2>&1 | tail -3
timeout 120 python3 -m benchmarks.profile_decode 2>&1 | grep -A4 "^decode step" | tee $OUT/profile.log
timeout 150 python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --json $OUT/qwen3.json 2>&1 | grep -v "it/s" | tail -6
timeout 150 python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-1.5b --json $OUT/qwen25.json 2>&1 | grep -v "it/s" | tail -6
