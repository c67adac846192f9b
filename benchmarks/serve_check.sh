#!/usr/bin/env bash
# The server against the offline engine on one workload: `bench throughput` (LLM.generate), then
# `vllm-lite serve` loaded by `bench serve` (all at once, then at a Poisson rate), then the
# server's /metrics and a SIGTERM drain. MODEL: a folder with config.json and a tokenizer; its
# weights are random (load_format dummy), so only the shape and the tokenizer matter.
#   bash benchmarks/serve_check.sh /path/to/SmolLM2-135M-Instruct [num_prompts] [out_dir]
set -u
MODEL=${1:?model folder (config.json + tokenizer)}
N=${2:-256}
OUT_DIR=${3:-/tmp/serve_check}
PORT=${PORT:-8123}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
LENS=(--input-len 100 512 --output-len 100 512)

echo "== offline: bench throughput =="
$PY -m vllm_lite.entrypoints.cli bench throughput --model-config "$MODEL/config.json" --tokenizer-path "$MODEL" \
    --num-prompts "$N" "${LENS[@]}" --runs 2 --json "$OUT_DIR/offline.json" 2>&1 | grep -v "^Generating\|it/s" | tail -4

echo "== server: vllm-lite serve + bench serve =="
$PY -m vllm_lite.entrypoints.cli serve "$MODEL" --load-format dummy --port "$PORT" --max-model-len 1024 --log-level warning \
    > "$OUT_DIR/serve.log" 2>&1 &
SERVER=$!
$PY - "$PORT" <<'EOF' || { cat "$OUT_DIR/serve.log"; kill $SERVER; exit 1; }
import sys, time, httpx
for _ in range(600):
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/health").status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit("server did not come up")
EOF
$PY -m vllm_lite.entrypoints.cli bench serve --port "$PORT" --num-prompts "$N" "${LENS[@]}" --json "$OUT_DIR/serve_all.json"
$PY -m vllm_lite.entrypoints.cli bench serve --port "$PORT" --num-prompts "$((N / 2))" "${LENS[@]}" --request-rate 16 \
    --json "$OUT_DIR/serve_rate16.json"
$PY -c "import httpx,sys; print('\n'.join(l for l in httpx.get('http://127.0.0.1:$PORT/metrics').text.splitlines()
        if l.startswith(('vllm:num_pre', 'vllm:generation_tokens_total', 'vllm:prompt_tokens_total',
                         'vllm:time_to_first_token_seconds_count', 'vllm:request_success_total'))))"
kill -TERM $SERVER
wait $SERVER
echo "server exit status after SIGTERM: $?"
tail -3 "$OUT_DIR/serve.log"
