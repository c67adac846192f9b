#!/usr/bin/env bash
# GPU call 10 (nvidia-h100-x1, ~8 min): issue 11, what serving costs over the offline engine.
# Per shape, benchmarks/serve_overhead.py: LLM.generate on 256 requests (lengths U(100,1024),
# ignore_eos, temperature 1), then `vllm-lite serve` (engine in its own process) loaded by
# `bench serve`'s client with all 256 at once, 3 runs each; then 32 requests at 4/s for TTFT.
# Targets: served >= 90% of offline, TTFT p50 < 30 ms at 4 req/s. Then the server tests on CUDA.
# TOKENIZER: a folder with SmolLM2's tokenizer files (text on for the smollm2-135m shape).
# WHEELS: a folder of the server's cp312 wheels (the GPU image has none of them).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
TOK=${TOKENIZER:-}
python3 -m pip install -q --no-index --find-links ${WHEELS:-.whl/server} fastapi uvicorn httptools uvloop aiohttp \
  pydantic prometheus_client httpx openai 2>&1 | grep -v "as the 'root' user" | tail -4
python3 -c "import openai, aiohttp, fastapi, uvicorn, uvloop, httptools, prometheus_client" || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader; date -u; git log -1 --format=%h 2>/dev/null
pip list 2>/dev/null | grep -i -E "^(uvicorn|uvloop|httptools|fastapi) " | tee $OUT/server_packages.txt
S="python3 -m benchmarks.serve_overhead --num-prompts 256 --input-len 100 1024 --output-len 100 1024 --runs 3"
timeout 240 $S --model-config smollm2-135m ${TOK:+--tokenizer-path $TOK} --json $OUT/serve_smollm2.json 2>&1 \
  | grep -E "^(offline|served|  run)" | tee -a $OUT/serve.txt
timeout 240 $S --model-config qwen3-0.6b --json $OUT/serve_qwen3.json 2>&1 \
  | grep -E "^(offline|served|  run)" | tee -a $OUT/serve.txt
timeout 150 python3 -m pytest -q -x tests/test_server.py 2>&1 | tail -3 | tee $OUT/tests.txt
