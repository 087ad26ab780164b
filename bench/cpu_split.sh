#!/usr/bin/env bash
# User and system CPU per request of oxserve's inference path and of the bare axum server, from
# /proc/PID/stat around a wrk run (the same load as bench/load.sh), plus context switches.
#
#   bench/cpu_split.sh                       # builds the release binaries
#   OXSERVE_BIN=/tmp/oxserve-other bench/cpu_split.sh
#   RUNS=3 DURATION=5s ACCESS_LOG=true bench/cpu_split.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
RUNS=${RUNS:-2}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve --example hello_server
BIN=${OXSERVE_BIN:-target/release/oxserve}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IP=$(free_port); HP=$(free_port)
cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$IP
management_address=http://127.0.0.1:$(free_port)
metrics_address=http://127.0.0.1:$(free_port)
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
default_workers_per_model=${WORKERS:-2}
enable_access_log=${ACCESS_LOG:-false}
CFG
LOG_LOCATION="$work/logs" METRICS_LOCATION="$work/logs" RUST_LOG=warn "$BIN" start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1 &
ox=$!; pids+=($ox)
target/release/examples/hello_server "127.0.0.1:$HP" >/dev/null 2>&1 &
hello=$!; pids+=($hello)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$IP/ping" >/dev/null && curl -s -o /dev/null "http://127.0.0.1:$HP/" && break
  sleep 0.1
done
switches() { awk '/ctxt_switches/ {s+=$2} END {print s}' /proc/"$1"/task/*/status; }
measure() { # name pid url
  read -r u0 s0 < <(awk '{print $14, $15}' /proc/"$2"/stat); c0=$(switches "$2")
  n=$(wrk -t2 -c32 -d"$DURATION" -s bench/post.lua "$3" | awk '/requests in/ {print $1}')
  read -r u1 s1 < <(awk '{print $14, $15}' /proc/"$2"/stat); c1=$(switches "$2")
  tick=$(getconf CLK_TCK)
  awk -v name="$1" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v c=$((c1 - c0)) -v t="$tick" \
    'BEGIN { printf "%-8s %9d requests  user %5.2f us  system %5.2f us  context switches %.3f  per request\n", name, n, u*1e6/t/n, s*1e6/t/n, c/n }'
}
for _ in $(seq "$RUNS"); do
  measure bare "$hello" "http://127.0.0.1:$HP/predictions/demo"
  measure oxserve "$ox" "http://127.0.0.1:$IP/predictions/demo"
done
