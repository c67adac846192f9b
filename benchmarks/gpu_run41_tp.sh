#!/usr/bin/env bash
# GPU call 41 (nvidia-h100-x4, ~6 min): gpu_run40 found NCCL's decode-step all-reduce (256 x 3,584
# bf16 = 1.8 MB) running the RING_LL protocol at 31 us (21.7% of a tp 2 decode step). Same call:
# tp 2 with NCCL's choice, tp 2 and tp 4 with NCCL_PROTO=LL128, then a tp 2 decode step with LL128.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c; date -u
B="python3 -m vllm_lite.cli bench throughput --model-config qwen2.5-7b --runs 2"
bench() {  # $1: label, $2: tp, then env assignments
  local label=$1 tp=$2; shift 2
  env "$@" timeout 110 $B --tensor-parallel-size $tp > $OUT/bench_${label}_tp$tp.txt 2>&1
  echo "$label tp $tp: $(grep -A1 '^vllm-lite' $OUT/bench_${label}_tp$tp.txt | tail -1 | cut -c1-90)"
}
bench nccl-default 2
bench LL128 2 NCCL_PROTO=LL128
bench LL128 4 NCCL_PROTO=LL128
NCCL_PROTO=LL128 timeout 75 python3 -m benchmarks.profile_decode --model-config qwen2.5-7b --tensor-parallel-size 2 \
  > $OUT/profile_LL128_tp2.txt 2>&1
grep -E "^decode step|  GPU:|nccl|Nccl" $OUT/profile_LL128_tp2.txt | cut -c1-60,150-250 | head -8
nvidia-smi --query-compute-apps=pid,name --format=csv
