#!/usr/bin/env bash
# GPU call 39 (nvidia-h100-x1, ~8 min): the fused q/k-norm test on the GPU again (it failed at fp16
# in gpu_run38: the bound changed), prefill attention FlashAttention vs paged Triton per prompt
# mix, then issue 9's table in one call as gpu_run32 (a discarded process first, then gpu_run25.sh:
# plain API and bench per shape). TOKENIZER: a folder with SmolLM2's tokenizer files.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 100 python3 -m pytest -q tests/test_fused_ops.py -k "qk_norm or dispatch" > $OUT/test_qk.txt 2>&1
tail -1 $OUT/test_qk.txt; grep -E "^E " $OUT/test_qk.txt | head -8
timeout 100 python3 -m benchmarks.bench_prefill_attention 2>&1 | grep -v Warn | tee $OUT/prefill_attention.txt
bash "$(dirname "$0")/gpu_run32.sh"
