#!/usr/bin/env bash
# GPU session 2: engine parity on CUDA (fp32) and a profiled Qwen3-0.6B throughput run.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
timeout 200 python3 -m pytest tests/test_parity_hf.py tests/test_sampling.py tests/test_api.py -q -x -k "not smollm2" 2>&1 | tail -4 | tee $OUT/parity.log
timeout 250 python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --json $OUT/qwen3.json --profile $OUT/qwen3.prof 2>&1 | grep -v "it/s" | tail -8
head -60 $OUT/qwen3.prof | tail -45
