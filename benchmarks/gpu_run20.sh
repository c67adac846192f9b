#!/usr/bin/env bash
# GPU call 20 (nvidia-h100-x1, ~5 min): cascade attention with the merge folded into the decode
# kernel (no reduce kernel, no partial writes of the rows' own keys; issue 12): the CUDA tests of
# the kernels, prefix caching and cold start; shared prefix on vs off; the decode step's profile;
# the plain workload with caching on.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 150 python3 -m pytest -q tests/test_prefix_caching.py tests/test_cold_start.py tests/test_model_runner.py 2>&1 | tail -2 | tee $OUT/tests.txt
timeout 60 python3 -m pytest -q tests/test_triton_kernels.py -k "shared or test_paged_decode" 2>&1 | tail -2 | tee -a $OUT/tests.txt
B="python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --runs 3"
for caching in --enable-prefix-caching --no-enable-prefix-caching; do
  timeout 100 $B --dataset shared-prefix $caching 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/prefix.txt
done
timeout 90 python3 -m benchmarks.profile_decode --model-config qwen3-0.6b --shared-prefix 1024 2>&1 | grep -E "wall|_kernel|GPU time|CUDA time total" | tee $OUT/profile.txt
timeout 120 $B --dataset nano-vllm 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/prefix.txt
