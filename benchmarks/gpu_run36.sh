#!/usr/bin/env bash
# GPU call 36 (nvidia-h100-x1, ~7 min): the balanced decode kernel. Its tests and the decode
# tests on the GPU; the kernel against the split kernel per layout and batch shape; then the
# nano-vllm workload (bench throughput, 3 runs) on Qwen2.5-1.5B and Qwen3-0.6B with the split
# kernel and the balanced one alternating; then where a 1.5B run goes with the balanced kernel.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
timeout 200 python3 -m pytest -q -x tests/test_triton_kernels.py -k "decode or graph_layout or shape_grid" 2>&1 | tail -2
timeout 200 python3 -m benchmarks.bench_decode_balanced 2>&1 | tee $OUT/kernels.txt | grep -v Warn
bench() {  # $1: split|balanced, $2: shape
  timeout 150 python3 -c "import sys; from vllm_lite.attention.triton_ops import TritonBackend as T; \
T.balanced_decode = sys.argv[1] == 'balanced'; from vllm_lite.cli import main; \
sys.exit(main(['bench', 'throughput', '--dataset', 'nano-vllm', '--runs', '3', '--model-config', sys.argv[2]]))" \
  "$1" "$2" > $OUT/bench_$1_$2.txt 2>&1
  echo "$1 $2: $(grep -A1 '^vllm-lite' $OUT/bench_$1_$2.txt | tail -1)"
  grep "pure decode" $OUT/bench_$1_$2.txt
}
for shape in qwen2.5-1.5b qwen3-0.6b; do
  bench split $shape; bench balanced $shape; bench split $shape
done
timeout 120 python3 -m benchmarks.profile_run --model-config qwen2.5-1.5b --dataset nano-vllm > $OUT/profile_run.txt 2>&1
grep -v Warn $OUT/profile_run.txt | head -16
