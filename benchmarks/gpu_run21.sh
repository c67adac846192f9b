#!/usr/bin/env bash
# GPU call 21 (nvidia-h100-x1, ~6 min): where a shared-prefix run's time goes (issue 12: every
# step's wall time by kind, then the top kernels of the whole run), and the server at 4, 16 and
# 64 requests/s and all at once on the Qwen3-0.6B shape (issue 11; server wheels carried).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 150 python3 -m benchmarks.profile_run --shared-prefix 1024 2>&1 | grep -v "^\[" | tee $OUT/profile_run.txt
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai 2>&1 | grep -v "as the 'root' user" | tail -4
timeout 300 python3 -m benchmarks.serve_overhead --model-config qwen3-0.6b --num-prompts 256 --input-len 100 1024 \
  --output-len 100 1024 --runs 2 --rate 4 16 64 --rate-prompts 128 --json $OUT/serve_qwen3.json 2>&1 \
  | grep -E "^(offline|served|  run)" | tee $OUT/serve.txt
python3 -c "import transformers.cli.serving.server" && transformers serve --help | head -3
