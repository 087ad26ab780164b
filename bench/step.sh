#!/usr/bin/env bash
# Step load against an autoscaling model: 1 client, then 50 at once, on a model allowed 1..4
# workers (built-in demo model, each request holding its worker SLEEP_MS). Reports p99 before and
# after the step, when each extra worker started serving, and the scale events on /metrics.
#
#   bench/step.sh                       # needs wrk; builds the release binary
#   OXSERVE_BIN=/path/to/oxserve bench/step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SLEEP_MS=${SLEEP_MS:-20}
CLIENTS=${CLIENTS:-50}
export SLEEP_MS
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
BIN=${OXSERVE_BIN:-target/release/oxserve}
[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IP=$(free_port); MP=$(free_port); XP=$(free_port)
mkdir -p "$work/store/step/MAR-INF"
echo '{"runtime": "python", "model": {"modelName": "step", "modelVersion": "1.0", "handler": "builtin"}}' \
  >"$work/store/step/MAR-INF/MANIFEST.json"
cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$IP
grpc_inference_port=0
grpc_management_port=0
management_address=http://127.0.0.1:$MP
metrics_address=http://127.0.0.1:$XP
model_store=$work/store
job_queue_size=1000
models={"step": {"1.0": {"marName": "step", "minWorkers": 1, "maxWorkers": 4}}}
CFG
RUST_LOG=info "$BIN" start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$IP/ping" >/dev/null && break; sleep 0.1; done

p99() { awk '$1=="99%" {print $2}' "$1"; }
rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
URL="http://127.0.0.1:$IP/predictions/step"

echo "model step: minWorkers 1, maxWorkers 4, each request sleeps ${SLEEP_MS} ms; autoscaling defaults"
wrk -t1 -c1 -d5s --latency -s bench/step.lua "$URL" >"$work/before.txt"
echo "before: 1 client              p99 $(p99 "$work/before.txt")  $(rps "$work/before.txt") req/s"

# The step: CLIENTS at once. A poller records when describe first shows 2, 3 and 4 READY workers.
python3 - "$MP" >"$work/poll.txt" <<'PY' &
import json, sys, time, urllib.request
port = sys.argv[1]
t0 = time.monotonic(); seen = {1}
while time.monotonic() - t0 < 30 and len(seen) < 4:
    d = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/models/step"))
    ready = sum(w["status"] == "READY" for w in d[0]["workers"])
    for n in range(2, ready + 1):
        if n not in seen:
            seen.add(n); print(f"{n} workers READY after {time.monotonic() - t0:.2f} s", flush=True)
    time.sleep(0.02)
PY
poller=$!
wrk -t2 -c"$CLIENTS" -d3s --latency -s bench/step.lua "$URL" >"$work/step.txt"
echo "step: $CLIENTS clients, first 3 s  p99 $(p99 "$work/step.txt")  $(rps "$work/step.txt") req/s"
wrk -t2 -c"$CLIENTS" -d10s --latency -s bench/step.lua "$URL" >"$work/after.txt"
echo "after: $CLIENTS clients, next 10 s  p99 $(p99 "$work/after.txt")  $(rps "$work/after.txt") req/s"
wait "$poller" || true
cat "$work/poll.txt"
curl -s "http://127.0.0.1:$XP/metrics" | grep -E '^oxserve_worker_scale_events_total\{model_name="step"|^oxserve_workers\{model_name="step"' | grep -v ' 0\(\.0\)\?$' || true
