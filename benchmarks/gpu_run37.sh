#!/usr/bin/env bash
# GPU call 37 (nvidia-h100-x1, ~7 min): the prefill phase of the nano-vllm run (its ~18 steps of
# 8,192 tokens ran eagerly): wall time vs GPU kernel time, then bench throughput with mixed-step
# graphs up to 2,048 tokens (default) and up to 8,192; SM clock and power sampled every 100 ms
# throughout (the prefill-step jitter: clocks?).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader,nounits -lms 100 > $OUT/clocks.csv 2>&1 &
SMI=$!
for shape in qwen3-0.6b qwen2.5-1.5b; do
  timeout 120 python3 -m benchmarks.profile_run --model-config $shape --dataset nano-vllm --prefill-phase \
    > $OUT/prefill_$shape.txt 2>&1
  echo "== $shape"; grep -v Warn $OUT/prefill_$shape.txt | grep -E "prefill phase|_kernel|nvjet|Self CUDA" | cut -c1-60,150-250
done
bench() {  # $1: mixed_graph_max_tokens, $2: shape
  date -u +%T.%N > $OUT/bench_$1_$2.txt
  timeout 150 python3 -c "import sys; from vllm_lite.model_runner import ModelRunner as R; \
R.mixed_graph_max_tokens = int(sys.argv[1]); from vllm_lite.cli import main; \
sys.exit(main(['bench', 'throughput', '--dataset', 'nano-vllm', '--runs', '3', '--model-config', sys.argv[2]]))" \
  "$1" "$2" >> $OUT/bench_$1_$2.txt 2>&1
  date -u +%T.%N >> $OUT/bench_$1_$2.txt
  echo "graphs <= $1 $2: $(grep -A1 '^vllm-lite' $OUT/bench_$1_$2.txt | tail -1)"
  grep "pure decode" $OUT/bench_$1_$2.txt
}
for shape in qwen3-0.6b qwen2.5-1.5b; do
  bench 2048 $shape; bench 8192 $shape
done
kill $SMI
python3 - "$OUT/clocks.csv" <<'PY'
import statistics, sys
rows = [r.split(", ") for r in open(sys.argv[1]) if r.count(",") >= 5]
sm, pw = [float(r[1]) for r in rows], [float(r[3]) for r in rows]
busy = [i for i, p in enumerate(pw) if p > 200]
print(f"{len(rows)} samples; under load (power > 200 W, {len(busy)} samples): SM clock min {min(sm[i] for i in busy):.0f} "
      f"median {statistics.median(sm[i] for i in busy):.0f} max {max(sm[i] for i in busy):.0f} MHz; power median "
      f"{statistics.median(pw[i] for i in busy):.0f} max {max(pw):.0f} W; throttle reasons seen: "
      f"{sorted(set(r[5].strip() for r in rows))}")
PY
