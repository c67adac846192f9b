#!/usr/bin/env bash
# GPU call 31 (nvidia-h100-x1, ~6 min): the CUDA tests of the prefill-step graphs (kernels with a
# work list, the graph layout, cold start, HF parity), then issue 11's saturation and 64 req/s with
# them (as gpu_run21: offline vs served all at once, 256 requests U(100,1024) in and out).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 60 python3 -m pytest -q -x tests/test_triton_kernels.py -k "work_list or graph_layout or mixed_batch" 2>&1 \
  | tail -3 | tee $OUT/tests.txt
timeout 180 python3 -m pytest -q -x tests/test_model_runner.py tests/test_cold_start.py tests/test_parity_hf.py 2>&1 \
  | tail -4 | tee -a $OUT/tests.txt
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai 2>&1 | grep -v "as the 'root' user" | tail -4
timeout 170 python3 -m benchmarks.serve_overhead --model-config qwen3-0.6b --num-prompts 256 --input-len 100 1024 \
  --output-len 100 1024 --runs 1 --rate 64 --rate-prompts 128 --json $OUT/serve_qwen3.json 2>&1 \
  | grep -E "^(offline|served|  run)" | tee $OUT/serve.txt
