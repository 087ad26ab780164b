#!/usr/bin/env bash
# Load benchmark: oxserve's inference path (built-in demo model) against a bare axum server, both
# loaded by the same wrk command, plus /metrics latency while the inference API is saturated.
#
#   bench/load.sh            # needs wrk (apt-get install wrk)
#   DURATION=30s bench/load.sh
#   OXSERVE_BIN=/tmp/oxserve-other bench/load.sh   # another build of oxserve (hello_server must be built)
#   ACCESS_LOG=false bench/load.sh   # without access_log.log lines (enable_access_log=false)
#   LOG_FORMAT=json bench/load.sh    # JSON log lines
#   SCRAPE=false bench/load.sh       # skip the /metrics-under-load part
#   FRONTEND_THREADS=1 bench/load.sh # both servers on one runtime thread (oxserve: number_of_netty_threads)
#   PIN=1 bench/load.sh              # servers on CPU 1, wrk (one thread) on CPU 0: the load generator
#                                    # no longer preempts the server; each server then runs one
#                                    # runtime thread (its default for one CPU), and is the bottleneck
#   bench/ab.sh BUILD_A BUILD_B      # alternates builds over several runs of this script, medians
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve --example hello_server
BIN=${OXSERVE_BIN:-target/release/oxserve}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IP=$(free_port); MP=$(free_port); XP=$(free_port); HP=$(free_port)
cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$IP
management_address=http://127.0.0.1:$MP
metrics_address=http://127.0.0.1:$XP
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
default_workers_per_model=${WORKERS:-2}
enable_access_log=${ACCESS_LOG:-true}
log_format=${LOG_FORMAT:-text}
CFG
if [ -n "${FRONTEND_THREADS:-}" ]; then
  echo "number_of_netty_threads=$FRONTEND_THREADS" >>"$work/config.properties"
  export TOKIO_WORKER_THREADS=$FRONTEND_THREADS # the bare server's #[tokio::main] reads it
fi
server_cpu=(); wrk_cpu=()
if [ "${PIN:-}" = 1 ]; then
  server_cpu=(taskset -c 1); wrk_cpu=(taskset -c 0); THREADS=1
fi
LOG_LOCATION="$work/logs" METRICS_LOCATION="$work/logs" RUST_LOG=warn "${server_cpu[@]}" "$BIN" start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1 &
ox_pid=$!
pids+=($ox_pid)
"${server_cpu[@]}" target/release/examples/hello_server "127.0.0.1:$HP" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$IP/ping" >/dev/null && curl -s -o /dev/null "http://127.0.0.1:$HP/" && break
  sleep 0.1
done

run_wrk() { # url -> "rps p50 p99"
  "${wrk_cpu[@]}" wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s bench/post.lua "$1" >"$work/wrk.txt"
  awk '/Requests\/sec/ {rps=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2} END {print rps, p50, p99}' "$work/wrk.txt"
}
to_ms() { # wrk latency (123.45us, 1.23ms, 1.2s) -> ms
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}

echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency -s bench/post.lua (22-byte JSON POST)"
hello_pid=${pids[1]}
# A process's user and system CPU ticks and its context switches (all threads), from /proc.
cpu() { echo "$(awk '{print $14, $15}' "/proc/$1/stat") $(awk '/ctxt_switches/ {s+=$2} END {print s}' /proc/"$1"/task/*/status)"; }
read -r hu0 hs0 hc0 < <(cpu "$hello_pid")
read -r h_rps h_p50 h_p99 < <(run_wrk "http://127.0.0.1:$HP/predictions/demo")
read -r hu1 hs1 hc1 < <(cpu "$hello_pid")
h_reqs=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
read -r ou0 os0 oc0 < <(cpu "$ox_pid")
read -r o_rps o_p50 o_p99 < <(run_wrk "http://127.0.0.1:$IP/predictions/demo")
read -r ou1 os1 oc1 < <(cpu "$ox_pid")
o_reqs=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
printf '%-28s %12s %10s %10s\n' server req/s p50_ms p99_ms
printf '%-28s %12s %10s %10s\n' "bare axum (hello_server)" "$h_rps" "$(to_ms "$h_p50")" "$(to_ms "$h_p99")"
printf '%-28s %12s %10s %10s\n' "oxserve demo model" "$o_rps" "$(to_ms "$o_p50")" "$(to_ms "$o_p99")"
awk -v o="$o_rps" -v h="$h_rps" -v op="$(to_ms "$o_p50")" -v hp="$(to_ms "$h_p50")" \
  'BEGIN { printf "ratio req/s oxserve/bare: %.2f   p50 difference: %+.3f ms\n", o/h, op-hp }'
# Server CPU per request: less sensitive than req/s to other load on a shared machine. The split
# shows where a difference is: system time is the kernel's read and write, alike for both servers.
per_request() { # name user_ticks system_ticks switches requests
  awk -v name="$1" -v u="$2" -v s="$3" -v c="$4" -v n="$5" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%s CPU per request: %.1f us (user %.1f, system %.1f; %.2f context switches; %d requests)\n", name, (u + s) / hz * 1e6 / n, u / hz * 1e6 / n, s / hz * 1e6 / n, c / n, n }'
}
per_request oxserve "$((ou1 - ou0))" "$((os1 - os0))" "$((oc1 - oc0))" "$o_reqs"
per_request "bare axum" "$((hu1 - hu0))" "$((hs1 - hs0))" "$((hc1 - hc0))" "$h_reqs"

# /metrics while the inference API is saturated: one scraping connection, measured by wrk.
if [ "${SCRAPE:-true}" = true ]; then
wrk -t1 -c"$CONNS" -d"$DURATION" -s bench/post.lua "http://127.0.0.1:$IP/predictions/demo" >/dev/null &
load=$!
sleep 1
wrk -t1 -c1 -d5s --latency "http://127.0.0.1:$XP/metrics" >"$work/scrape.txt"
wait $load
awk '$1=="50%" {p50=$2} $1=="99%" {p99=$2} /Requests\/sec/ {rps=$2} END {printf "/metrics under inference saturation: p50 %s p99 %s (%s scrapes/s)\n", p50, p99, rps}' "$work/scrape.txt"
fi

# What the access log took: every request of the runs above is a line (rolled files included),
# unless the writer fell behind and dropped some, which the log then says.
if [ "${ACCESS_LOG:-true}" = true ]; then
  all() { zcat -f "$work"/logs/access_log.* 2>/dev/null; }
  lines=$(all | wc -l)
  dropped=$(all | { grep -o '[0-9]* access log lines were dropped\|"dropped":[0-9]*' || true; } \
    | { grep -o '[0-9]*' || true; } | awk '{s+=$1} END {print s+0}')
  echo "access_log ($(du -ch "$work"/logs/access_log.* | tail -1 | cut -f1)): $lines lines, $dropped dropped"
fi
