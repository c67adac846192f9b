#!/usr/bin/env bash
# GPU call 34 (nvidia-h100-x1, ~4 min): issue 11's peer in the same call as ours, with the
# prefill-step graphs: `serve_peer` (vllm-lite serve vs transformers serve --continuous-batching,
# Qwen3-0.6B shape, text on) at 4 req/s and all at once; 32 requests (64 in gpu_run23) to fit
# the session's last device minutes.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai accelerate 2>&1 | grep -v "as the 'root' user" | tail -4
timeout 330 python3 -m benchmarks.serve_peer --model-config qwen3-0.6b --num-prompts 32 --rates 4 inf --timeout 90 2>&1 \
  | grep -E "^(qwen3|vllm-lite |transformers |  )"
