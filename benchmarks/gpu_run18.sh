#!/usr/bin/env bash
# GPU calls 18 and 19 (nvidia-h100-x1, ~8 min each): cascade attention for shared prefixes (issue 12).
# The kernel and engine tests on CUDA; Qwen3-0.6B shape: 256 requests sharing a 1,024-token
# system prompt + 128 own tokens, 128 out, caching on vs off; the plain nano-vllm workload on vs
# off (nothing shared: cascade never runs); where a shared-prefix decode step goes now; the cold
# start (a second set of CUDA graphs is captured).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 240 python3 -m pytest -q tests/test_triton_kernels.py tests/test_prefix_caching.py tests/test_cold_start.py \
  tests/test_model_runner.py tests/test_fused_ops.py -k "not grid" 2>&1 | tail -4 | tee $OUT/tests.txt
B="python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --runs 3"
for caching in --enable-prefix-caching --no-enable-prefix-caching; do
  timeout 100 $B --dataset shared-prefix $caching --json $OUT/shared$caching.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/prefix.txt
  timeout 120 $B --dataset nano-vllm $caching --json $OUT/nano$caching.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/prefix.txt
done
timeout 90 python3 -m benchmarks.profile_decode --model-config qwen3-0.6b --shared-prefix 1024 2>&1 | grep -v Warning | tail -24 | tee $OUT/profile.txt
TRITON_CACHE_DIR=$(mktemp -d) timeout 90 python3 -m benchmarks.cold_start --model-config qwen3-0.6b 2>&1 | tail -12 | tee $OUT/cold.txt
