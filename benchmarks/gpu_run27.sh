#!/usr/bin/env bash
# GPU call 27 (nvidia-h100-x1, ~5 min): is the SmolLM2 gap between `bench throughput` and the
# plain API (gpu_run25.sh: 33,152 vs 45,540 tok/s, text on) systematic or variance? The two
# alternate in one call, the bench also at the plain API's max_model_len 4096; then the CUDA
# tests of the decode kernels (the (kv head, seq, split) grid).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T="--tokenizer-path ${TOKENIZER:-.tpa/smol_tok}"
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3 --model-config smollm2-135m $T"
timeout 60 $B 2>&1 | grep -A1 "^vllm-lite" | tail -1 | tee -a $OUT/gap.txt
timeout 60 python3 -m benchmarks.plain_api --model-config smollm2-135m $T --runs 2 2>&1 | grep -E "^(run|smollm2)" | tee -a $OUT/gap.txt
timeout 60 $B --max-model-len 4096 2>&1 | grep -A1 "^vllm-lite" | tail -1 | tee -a $OUT/gap.txt
timeout 60 $B 2>&1 | grep -A1 "^vllm-lite" | tail -1 | tee -a $OUT/gap.txt
timeout 90 python3 -m pytest -q tests/test_triton_kernels.py -k "shared or test_paged_decode" 2>&1 | tail -1 | tee $OUT/tests.txt
