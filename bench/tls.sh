#!/usr/bin/env bash
# HTTPS against HTTP on the inference path: the same oxserve build and config (built-in demo model,
# 2 workers) started once with an http:// and once with an https:// inference address (a fresh
# P-256 certificate from the openssl CLI), each loaded by the same wrk command, alternating.
# Two loads: keep-alive (the TLS handshake amortised, as behind a load balancer) and a new
# connection per request (`Connection: close`: one handshake per request, the worst case).
#
#   bench/tls.sh                 # needs wrk and openssl
#   ROUNDS=3 DURATION=10s bench/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-2}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve
BIN=${OXSERVE_BIN:-target/release/oxserve}
work=$(mktemp -d)
ox_pid=""
cleanup() { [ -n "$ox_pid" ] && kill "$ox_pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start() { # scheme -> starts oxserve, sets URL
  local IP MP XP; IP=$(free_port); MP=$(free_port); XP=$(free_port)
  cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=$1://127.0.0.1:$IP
management_address=http://127.0.0.1:$MP
metrics_address=http://127.0.0.1:$XP
private_key_file=$work/key.pem
certificate_file=$work/cert.pem
default_workers_per_model=${WORKERS:-2}
enable_access_log=false
CFG
  LOG_LOCATION="$work/logs" METRICS_LOCATION="$work/logs" RUST_LOG=warn "$BIN" start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1 &
  ox_pid=$!
  URL="$1://127.0.0.1:$IP/predictions/demo"
  for _ in $(seq 300); do curl -skf "$1://127.0.0.1:$IP/ping" >/dev/null && return; sleep 0.1; done
  echo "oxserve did not start: $(cat "$work/ox.log")" >&2; exit 1
}
stop() { kill "$ox_pid"; wait "$ox_pid" 2>/dev/null || true; ox_pid=""; }
to_ms() { awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'; }
run_wrk() { # url [extra wrk args] -> "rps p50 p99"
  wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s bench/post.lua "$@" >"$work/wrk.txt"
  awk '/Requests\/sec/ {rps=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2} END {print rps, p50, p99}' "$work/wrk.txt"
}

echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency -s bench/post.lua (22-byte JSON POST), $ROUNDS rounds"
printf '%-6s %-10s %-6s %10s %10s %10s\n' round conn scheme req/s p50_ms p99_ms
for r in $(seq "$ROUNDS"); do
  for scheme in http https; do
    start "$scheme"
    read -r rps p50 p99 < <(run_wrk "$URL")
    printf '%-6s %-10s %-6s %10s %10s %10s\n' "$r" keep-alive "$scheme" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")"
    read -r rps p50 p99 < <(run_wrk "$URL" -H "Connection: close")
    printf '%-6s %-10s %-6s %10s %10s %10s\n' "$r" close "$scheme" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")"
    stop
  done
done
