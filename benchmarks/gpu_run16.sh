#!/usr/bin/env bash
# GPU call 16 (nvidia-h100-x1, ~8 min): logprobs in one fused Triton pass (issue 10): the kernel,
# cold-start and sampling tests on CUDA, the extras' cost next to the default run, the sampler's
# GPU time per decode step; and where a Qwen2.5-1.5B decode step goes (issue 9: host or GPU).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 200 python3 -m pytest -q tests/test_fused_ops.py tests/test_cold_start.py tests/test_sampling.py \
  tests/test_sampling_vllm.py -k "not smollm2" 2>&1 | tail -4 | tee $OUT/tests.txt
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3 --model-config qwen3-0.6b"
for sampling in default extras; do
  timeout 120 $B --sampling $sampling --json $OUT/qwen3_$sampling.json 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
for args in "--model-config qwen3-0.6b --sampling default" "--model-config qwen3-0.6b --sampling extras" \
            "--model-config qwen2.5-1.5b"; do
  echo "== profile_decode $args" | tee -a $OUT/profile.txt
  timeout 90 python3 -m benchmarks.profile_decode $args 2>&1 | grep -v Warning | tail -28 | tee -a $OUT/profile.txt
done
