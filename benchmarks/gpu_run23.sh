#!/usr/bin/env bash
# GPU call 23 (nvidia-h100-x1, ~8 min): issue 12's "nothing shared" check (nano-vllm workload,
# caching on vs off, same call), then issue 11's peer: vllm-lite serve vs transformers serve
# --continuous-batching on the Qwen3-0.6B shape, same weights, same requests, text on for both
# (benchmarks/serve_peer.py; server wheels + accelerate carried in .whl/server).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
B="python3 -m vllm_lite.cli bench throughput --model-config qwen3-0.6b --runs 3"
for caching in --enable-prefix-caching --no-enable-prefix-caching; do
  timeout 120 $B --dataset nano-vllm $caching 2>&1 | grep -A2 "^vllm-lite" | tee -a $OUT/nothing_shared.txt
done
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai accelerate 2>&1 | grep -v "as the 'root' user" | tail -4
python3 -c "import transformers; print('transformers', transformers.__version__)"
timeout 420 python3 -m benchmarks.serve_peer --model-config qwen3-0.6b --rates 4 16 inf --timeout 90 2>&1 \
  | grep -E "^(qwen3|vllm-lite |transformers )" | tee $OUT/serve_peer.txt
