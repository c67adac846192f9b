#!/usr/bin/env bash
# GPU call 28 (nvidia-h100-x1, ~8 min): CUDA graphs for steps with prefill tokens (issue 11's
# time to first token, issue 9's prefill phase). The GPU tests of the kernels, the runner and HF
# parity first; one request's prefill with the graphs on / off / on; the server's TTFT at 4 and
# 16 req/s (as gpu_run24); the nano-vllm throughput workload on two shapes.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 200 python3 -m pytest -q -x tests/test_triton_kernels.py tests/test_model_runner.py tests/test_parity_hf.py \
  tests/test_prefix_caching.py 2>&1 | tail -5 | tee $OUT/tests.txt
timeout 150 python3 -m benchmarks.cold_shapes 2>&1 | grep -E "^(mixed|GEMM)" | tee $OUT/cold_shapes.txt
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai 2>&1 | grep -v "as the 'root' user" | tail -4
P="python3 -m benchmarks.serve_peer --model-config qwen3-0.6b --servers vllm-lite --timeout 90"
timeout 150 $P --rates 4 4 16 2>&1 | grep -E "^(qwen3|vllm-lite |  )" | tee $OUT/ttft.txt
timeout 120 $P --output-len 100 1024 --rates 4 2>&1 | grep -E "^(qwen3|vllm-lite |  )" | tee -a $OUT/ttft.txt
B="python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 3"
for shape in qwen3-0.6b qwen2.5-1.5b; do
  timeout 100 $B --model-config $shape 2>&1 | grep -A1 "^vllm-lite" | tee -a $OUT/bench.txt
done
