#!/usr/bin/env bash
# GPU call 38 (nvidia-h100-x1, ~5 min): Qwen3's q/k norm inside the rotary kernel and FlashAttention
# for the fresh prompts of mixed eager steps: their CUDA tests, HF parity on the GPU, cold start;
# then the prefill phase of the nano-vllm run (GPU kernel time; gpu_run37: 398 ms on Qwen3-0.6B,
# 732 ms on Qwen2.5-1.5B) and one Qwen3-0.6B decode step's kernels.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 120 python3 -m pytest -q tests/test_fused_ops.py tests/test_triton_kernels.py \
  -k "qk_norm or dispatch or mixed_batch or flash_suffix or rotary" 2>&1 | tail -2
timeout 240 python3 -m pytest -q tests/test_parity_hf.py tests/test_model_runner.py tests/test_cold_start.py 2>&1 \
  | tee $OUT/tests.txt | tail -4
for shape in qwen3-0.6b qwen2.5-1.5b; do
  timeout 100 python3 -m benchmarks.profile_run --model-config $shape --dataset nano-vllm --prefill-phase \
    > $OUT/prefill_$shape.txt 2>&1
  echo "== $shape"; grep -v Warn $OUT/prefill_$shape.txt | grep -E "prefill phase|_kernel|nvjet|flash|Self CUDA" | cut -c1-60,150-250
done
timeout 90 python3 -m benchmarks.profile_decode --model-config qwen3-0.6b > $OUT/decode_qwen3.txt 2>&1
grep -E "^decode step|  host:|  GPU:|_kernel|nvjet" $OUT/decode_qwen3.txt | cut -c1-60,150-250
