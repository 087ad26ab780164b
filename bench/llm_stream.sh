#!/usr/bin/env bash
# 64 concurrent streams on one worker of examples/llm (docs/llm.md): oxserve's CPU time per
# streamed chunk and the time to first token it adds over the engine's own.
#
#   bench/llm_stream.sh                  # builds the release binary and the archives
#   OXSERVE_BIN=/path/to/oxserve STREAMS=64 MAX_TOKENS=64 bench/llm_stream.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${OXSERVE_BIN:-target/release/oxserve}
[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve
BIN=$(realpath "$BIN")

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# examples/llm as an unpacked model folder (the layout of llm.mar; no archiver needed).
mkdir -p "$work/store/llm/MAR-INF"
cp examples/llm/engine.py examples/llm/llm_handler.py examples/llm/model-config.yaml "$work/store/llm/"
echo '{"runtime": "python", "model": {"modelName": "llm", "modelVersion": "1.0", "handler": "llm_handler.py", "configFile": "model-config.yaml"}}' \
  >"$work/store/llm/MAR-INF/MANIFEST.json"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IP=$(free_port); MP=$(free_port); XP=$(free_port)
cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$IP
management_address=http://127.0.0.1:$MP
metrics_address=http://127.0.0.1:$XP
model_store=$work/store
load_models=llm
CFG
# Run from the scratch folder: the server writes its logs/ folder into its working directory.
(cd "$work" && exec "$BIN" start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1) &
pids+=($!)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$IP/ping" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$IP/ping" >/dev/null || { cat "$work/ox.log"; exit 1; }
python3 bench/llm_stream.py --url "http://127.0.0.1:$IP" --pid "${pids[0]}" \
  --streams "${STREAMS:-64}" --max-tokens "${MAX_TOKENS:-64}"
