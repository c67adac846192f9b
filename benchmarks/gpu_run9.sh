#!/usr/bin/env bash
# GPU call 9 (nvidia-h100-x1, ~8 min): prefix caching (issue 12) and the engine tests on CUDA.
# Qwen3-0.6B shape: 256 requests sharing a 1,024-token system prompt + 128 own tokens, 128 out,
# caching on vs off; the plain throughput workload (nothing shared) on vs off; then the CUDA
# tests of the engine paths that prefix caching, the host-time work and the warm-up touched, and
# the cold start (LLM(...) to the first token; Triton binaries compiled after LLM(...): expect 0).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
B="python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --runs 3"
for caching in --enable-prefix-caching --no-enable-prefix-caching; do
  timeout 100 $B --dataset shared-prefix $caching --json $OUT/shared$caching.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/prefix.txt
  timeout 120 $B --dataset nano-vllm $caching --json $OUT/nano$caching.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/prefix.txt
done
TRITON_CACHE_DIR=$(mktemp -d) timeout 90 python3 -m benchmarks.cold_start --model-config qwen3-0.6b 2>&1 | tail -12 | tee $OUT/cold.txt
timeout 200 python3 -m pytest -q -x tests/test_cold_start.py tests/test_prefix_caching.py tests/test_model_runner.py \
  tests/test_api.py tests/test_sampling_vllm.py 2>&1 | tail -3 | tee $OUT/tests.txt
