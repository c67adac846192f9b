#!/usr/bin/env bash
# One benchmark suite (or several) on the GPU machine, in one call:
#   bash benchmarks/run.sh SUITE [SUITE ...] [--only ROW ...] [--shapes SHAPE ...]
# Wheels carried in .whl/ (any depth: the server's, accelerate for the peers, ...) are installed
# into /tmp/site first (the GPU image reaches no registry); logs and tables go to $OUT when set.
# COMMIT=<hash> names the commit in the tables (the GPU machine has no git history); TOKENIZER=
# <folder of SmolLM2's tokenizer files> turns text on for the smollm2-135m throughput row.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -n "$(find .whl -type f -name '*.whl' 2>/dev/null | head -1)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(find .whl -type f -name '*.whl') 2>&1 | grep -v "as the 'root' user" | tail -3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__)"
exec python3 -m benchmarks "$@"
