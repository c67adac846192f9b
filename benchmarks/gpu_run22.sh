#!/usr/bin/env bash
# GPU call 22 (nvidia-h100-x1, ~5 min): the decode kernel's grid with a sequence's KV heads as
# neighbouring programs (kv head, seq, split), A/B against the (seq, kv head, split) grid of
# 46feb13 (benchmarks/_old_triton_ops.py, a copy of that commit's file, carried untracked); then
# issue 12's shared-prefix on/off and the plain workload (prompt checks at C speed).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q tests/test_triton_kernels.py -k "shared or test_paged_decode" 2>&1 | tail -1 | tee $OUT/tests.txt
timeout 200 python3 -m benchmarks.ab_decode_kernels --old benchmarks/_old_triton_ops.py 2>&1 | grep -v "^\[" | tee $OUT/ab.txt
B="python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --runs 3"
for caching in --enable-prefix-caching --no-enable-prefix-caching; do
  timeout 100 $B --dataset shared-prefix $caching 2>&1 | grep -A6 "^vllm-lite" | tee -a $OUT/prefix.txt
done
timeout 120 $B --dataset nano-vllm 2>&1 | grep -A6 "^vllm-lite" | tee -a $OUT/prefix.txt
