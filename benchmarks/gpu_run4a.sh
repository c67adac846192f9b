#!/usr/bin/env bash
# GPU session 4a: stash the first half of the SmolLM2 GGUF in /tmp (the second half comes with
# 4b), then Qwen2.5-1.5B shape throughput with HF transformers' continuous batching as the peer.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
cp .gg1/ggpart_aa /tmp/ggpart_aa
git log --oneline | head -1
timeout 560 python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-1.5b --peer hf --json $OUT/qwen25.json 2>&1 | grep -v "it/s\|request/s" | tail -12
