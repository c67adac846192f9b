#!/usr/bin/env bash
# GPU call 24 (nvidia-h100-x1, ~4 min): issue 11's time to first token at 4 req/s, inside the
# server (engine front end to the token leaving the engine, from /metrics) next to the client's;
# a warm rerun; outputs U(100, 512) (serve_peer's call 23) and U(100, 1024) (gpu_run21's).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai 2>&1 | grep -v "as the 'root' user" | tail -4
P="python3 -m benchmarks.serve_peer --model-config qwen3-0.6b --servers vllm-lite --timeout 90"
timeout 200 $P --rates 4 4 16 2>&1 | grep -E "^(qwen3|vllm-lite |  )" | tee $OUT/ttft.txt
timeout 200 $P --output-len 100 1024 --rates 4 4 2>&1 | grep -E "^(qwen3|vllm-lite |  )" | tee -a $OUT/ttft.txt
