#!/usr/bin/env bash
# GPU session 1: kernel tests (bf16 + fp32 on CUDA), kernel timings, engine parity on CUDA,
# and a first throughput run. Logs land in $OUT.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
git log --oneline | head -1
timeout 200 python3 -m pytest tests/test_triton_kernels.py -q -x 2>&1 | tail -15 | tee $OUT/kernel_tests.log
timeout 120 python3 -m benchmarks.bench_kernels 2>&1 | tee $OUT/bench_kernels.log | tail -30
timeout 150 python3 -m pytest tests/test_parity_hf.py tests/test_sampling.py tests/test_api.py -q -x -k "not smollm2" 2>&1 | tail -15 | tee $OUT/parity.log
timeout 200 python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --json $OUT/qwen3.json 2>&1 | grep -v "it/s" | tail -12
