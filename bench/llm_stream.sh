#!/usr/bin/env bash
# 64 concurrent streams on one worker of examples/llm (docs/llm.md): oxserve's CPU time per
# streamed chunk, the time to first token it adds over the engine's own, and where that time goes
# (bench/llm_stream.py prints the split; oxserve's own view comes from its JSON access log).
#
#   bench/llm_stream.sh                  # builds the release binary
#   OXSERVE_BIN=/path/to/oxserve STREAMS=64 MAX_TOKENS=64 ROUNDS=3 STEP_MS=10 bench/llm_stream.sh
#   JSON=results.jsonl LABEL=x bench/llm_stream.sh   # also append the summary as a JSON line
#   DUMP=streams.jsonl bench/llm_stream.sh     # Rust client: also every stream's times, a line each
#   CLIENT=python bench/llm_stream.sh    # the Python client (bench/llm_stream.py) instead of the
#                                        # Rust one (examples/stream_load.rs, the default)
#   LLM_EXAMPLE=/tmp/old/examples/llm bench/llm_stream.sh   # another tree's examples/llm
#   FRONTEND_THREADS=1 bench/llm_stream.sh   # oxserve on one runtime thread (number_of_netty_threads)
#   DURATION=20 bench/llm_stream.sh      # closed loop instead of rounds (Rust client): STREAMS
#                                        # streams kept running for 20 s, lengths varied (SPREAD=0.5),
#                                        # the first WARMUP=3 s left out of the latency figures
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${OXSERVE_BIN:-target/release/oxserve}
[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve
BIN=$(realpath "$BIN")
. bench/stream_client.sh
PYTHON=${PYTHON:-python3}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# examples/llm as an unpacked model folder (the layout of llm.mar; no archiver needed).
# LLM_EXAMPLE=dir: another copy of examples/llm (e.g. another commit's, to compare handlers).
example=${LLM_EXAMPLE:-examples/llm}
mkdir -p "$work/store/llm/MAR-INF"
cp "$example/engine.py" "$example/llm_handler.py" "$work/store/llm/"
sed "s/step_ms: *[0-9.]*/step_ms: ${STEP_MS:-10}/" "$example/model-config.yaml" >"$work/store/llm/model-config.yaml"
echo '{"runtime": "python", "model": {"modelName": "llm", "modelVersion": "1.0", "handler": "llm_handler.py", "configFile": "model-config.yaml"}}' \
  >"$work/store/llm/MAR-INF/MANIFEST.json"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IP=$(free_port); MP=$(free_port); XP=$(free_port)
cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$IP
management_address=http://127.0.0.1:$MP
metrics_address=http://127.0.0.1:$XP
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
model_store=$work/store
load_models=llm
log_format=json
${ACCESS_LOG:+enable_access_log=$ACCESS_LOG}
python_executable=$PYTHON
CFG
# FRONTEND_THREADS=n: oxserve's runtime threads (number_of_netty_threads; default one per CPU).
[ -z "${FRONTEND_THREADS:-}" ] || echo "number_of_netty_threads=$FRONTEND_THREADS" >>"$work/config.properties"
# Run from the scratch folder: the server writes its logs/ folder into its working directory.
(cd "$work" && RUST_LOG=warn exec "$BIN" start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1) &
pids+=($!)
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$IP/ping" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$IP/ping" >/dev/null || { cat "$work/ox.log"; exit 1; }
worker=$(pgrep -P "${pids[0]}" -f oxserve_worker | head -1)
# PERF=report.txt: also sample oxserve with perf (flat profile by symbol) while the client runs.
if [ -n "${PERF:-}" ]; then
  perf record -q -F 2000 -p "${pids[0]}" -o "$work/perf.data" >/dev/null 2>&1 &
  perf_pid=$!
fi
"${CLIENT_CMD[@]}" --url "http://127.0.0.1:$IP" --path /predictions/llm/1.0/v1/chat/completions \
  --cpu "server=${pids[0]}" --cpu "worker=$worker" --access-log "$work/logs/access_log.log" \
  --streams "${STREAMS:-64}" --max-tokens "${MAX_TOKENS:-64}" --rounds "${ROUNDS:-3}" \
  --label "${LABEL:-oxserve}" ${JSON:+--json "$JSON"} ${DUMP:+--dump "$DUMP"} \
  ${DURATION:+--duration "$DURATION"} ${WARMUP:+--warmup "$WARMUP"} ${SPREAD:+--spread "$SPREAD"}
if [ -n "${PERF:-}" ]; then
  kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
  perf report -i "$work/perf.data" --no-children --sort symbol --percent-limit 0.7 --stdio 2>/dev/null \
    | grep -v '^#' | grep -v '^$' >"$PERF"
fi
