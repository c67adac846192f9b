#!/usr/bin/env bash
# GPU call 32 (nvidia-h100-x1, ~6 min), after the prefill-step graphs: issue 9's table re-measured
# in one call: one discarded benchmark process first (gpu_run27 saw the first one on a fresh
# machine run ~15% slow), then gpu_run25.sh's commands (plain API and `bench throughput --dataset
# nano-vllm` per shape; bench now times 3 runs with its step spies in a 4th, untimed run, and uses
# nano-vllm's max_model_len 4096). (The call ran these same commands written out here.)
# TOKENIZER: a folder with SmolLM2's tokenizer files (text on for the smollm2-135m shape).
set -u
timeout 60 python3 -m vllm_lite.cli bench throughput --dataset nano-vllm --runs 1 --model-config smollm2-135m \
  2>&1 | grep -A1 "^vllm-lite" | sed 's/^/(discarded) /'
bash "$(dirname "$0")/gpu_run25.sh"
