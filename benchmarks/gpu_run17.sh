#!/usr/bin/env bash
# GPU call 17 (nvidia-h100-x1, ~7 min): sampling in one fused Gumbel-max pass (issues 9, 10):
# the kernel/cold-start/sampling/API tests on CUDA, the sampler's kernels timed alone, the decode
# kernel's split counts at 256 sequences, and the user-path benchmark on three shapes
# (Qwen3-0.6B default + extras, Qwen2.5-1.5B, Llama-3.2-1B; median of 3 each).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 200 python3 -m pytest -q tests/test_fused_ops.py tests/test_cold_start.py tests/test_sampling.py \
  tests/test_sampling_vllm.py tests/test_api.py -k "not smollm2" 2>&1 | tail -4 | tee $OUT/tests.txt
timeout 60 python3 -m benchmarks.bench_sampler 2>&1 | tee $OUT/sampler.txt
timeout 90 python3 -m benchmarks.bench_decode_splits 2>&1 | tee $OUT/splits.txt
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3"
for args in "--model-config qwen3-0.6b --sampling default" "--model-config qwen3-0.6b --sampling extras" \
            "--model-config qwen2.5-1.5b" "--model-config llama-3.2-1b"; do
  timeout 120 $B $args 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
