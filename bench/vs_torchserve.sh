#!/usr/bin/env bash
# Side by side: TorchServe 0.12 and oxserve serve the same echo archive (examples/echo, packaged by
# the real torch-model-archiver) with 1 and with 2 workers, loaded by the same wrk command.
# Prints req/s, p50, p99 and the ratios, start-up to first answered prediction, and resident memory
# of each server and of one worker.
#
#   bench/vs_torchserve.sh                  # installs TorchServe into target/ts-venv the first time
#   TS_VENV=/path/to/venv bench/vs_torchserve.sh
#
# Needs: wrk (apt-get install wrk), Java 17 for TorchServe, PyPI for the first install (~5 GB: torch).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
DURATION=${DURATION:-10s}
venv=${TS_VENV:-$root/target/ts-venv}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
command -v java >/dev/null || { echo "TorchServe needs Java 17" >&2; exit 1; }

if [ ! -x "$venv/bin/torchserve" ]; then
  echo "installing TorchServe 0.12.0 into $venv (torch is large: a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    torchserve==0.12.0 torch-model-archiver==0.12.0 torch numpy pyyaml
fi

cargo build --release --quiet --bin oxserve
work=$(mktemp -d)
store="$work/store"
examples/make_archives.sh "$store" >/dev/null
printf '{"text": "I love it!"}' >"$work/body.json"   # 22 bytes
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"text": "I love it!"}'
wrk.headers["Content-Type"] = "application/json"
LUA

server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  "$venv/bin/torchserve" --stop >/dev/null 2>&1 || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
to_ms() { awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.2f", n }'; }

# Waits until a prediction is answered 200; prints seconds since $1 (a start time from date +%s.%N).
wait_first_prediction() {
  local since=$1 url=$2
  for _ in $(seq 1200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' --data-binary @"$work/body.json" "$url" || true)
    if [ "$code" = 200 ]; then
      awk -v a="$since" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b-a }'
      return 0
    fi
    sleep 0.05
  done
  echo "never answered" >&2; return 1
}

load() { # url -> "rps p50 p99"
  wrk -t2 -c10 -d"$DURATION" --latency -s "$work/post.lua" "$1" >"$work/wrk.txt"
  awk '/Requests\/sec/ {rps=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2} END {print rps, p50, p99}' "$work/wrk.txt"
}

declare -A RPS P50 P99 START SRV_MB WRK_MB
for workers in 1 2; do
  # TorchServe
  ip=$(free_port); mp=$(free_port); xp=$(free_port)
  cat >"$work/ts.properties" <<CFG
inference_address=http://127.0.0.1:$ip
management_address=http://127.0.0.1:$mp
metrics_address=http://127.0.0.1:$xp
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
default_workers_per_model=$workers
disable_token_authorization=true
CFG
  t0=$(date +%s.%N)
  (cd "$work" && PATH="$venv/bin:$PATH" "$venv/bin/torchserve" --start --ncs --model-store "$store" \
      --models echo=echo.mar --ts-config "$work/ts.properties" --disable-token-auth >"$work/ts.log" 2>&1)
  START[ts,$workers]=$(wait_first_prediction "$t0" "http://127.0.0.1:$ip/predictions/echo")
  sleep 2  # let every worker finish loading
  read -r r p50 p99 < <(load "http://127.0.0.1:$ip/predictions/echo")
  RPS[ts,$workers]=$r; P50[ts,$workers]=$(to_ms "$p50"); P99[ts,$workers]=$(to_ms "$p99")
  java_pid=$(pgrep -f 'org.pytorch.serve.ModelServer' | head -1)
  SRV_MB[ts,$workers]=$(rss_mb "$java_pid")
  WRK_MB[ts,$workers]=$(rss_mb "$(pgrep -f 'model_service_worker.py' | head -1)")
  "$venv/bin/torchserve" --stop >/dev/null 2>&1 || true
  while pgrep -f 'org.pytorch.serve.ModelServer' >/dev/null; do sleep 0.2; done

  # oxserve, same archive, same worker count, its own Python runtime
  ip=$(free_port); mp=$(free_port); xp=$(free_port)
  cat >"$work/ox.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$ip
management_address=http://127.0.0.1:$mp
metrics_address=http://127.0.0.1:$xp
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
default_workers_per_model=$workers
CFG
  t0=$(date +%s.%N)
  RUST_LOG=warn target/release/oxserve start --foreground --model-store "$store" --models echo=echo.mar \
      --ts-config "$work/ox.properties" >"$work/ox.log" 2>&1 &
  server_pid=$!
  START[ox,$workers]=$(wait_first_prediction "$t0" "http://127.0.0.1:$ip/predictions/echo")
  sleep 1
  read -r r p50 p99 < <(load "http://127.0.0.1:$ip/predictions/echo")
  RPS[ox,$workers]=$r; P50[ox,$workers]=$(to_ms "$p50"); P99[ox,$workers]=$(to_ms "$p99")
  SRV_MB[ox,$workers]=$(rss_mb "$server_pid")
  WRK_MB[ox,$workers]=$(rss_mb "$(pgrep -f 'oxserve_worker.py' | head -1)")
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
done

echo "wrk -t2 -c10 -d$DURATION --latency, 22-byte JSON POST to /predictions/echo (examples/echo)"
printf '%-9s %-8s %10s %8s %8s %9s %10s %10s\n' workers server req/s p50_ms p99_ms start_s server_MB worker_MB
for workers in 1 2; do
  for s in ts ox; do
    name=$([ $s = ts ] && echo TorchServe || echo oxserve)
    printf '%-9s %-8s %10s %8s %8s %9s %10s %10s\n' "$workers" "${name:0:10}" "${RPS[$s,$workers]}" \
      "${P50[$s,$workers]}" "${P99[$s,$workers]}" "${START[$s,$workers]}" "${SRV_MB[$s,$workers]}" "${WRK_MB[$s,$workers]}"
  done
  awk -v o="${RPS[ox,$workers]}" -v t="${RPS[ts,$workers]}" -v op="${P50[ox,$workers]}" -v tp="${P50[ts,$workers]}" -v w="$workers" \
    'BEGIN { printf "%s worker(s): oxserve/TorchServe req/s %.2fx, p50 %.2f of TorchServe'"'"'s\n", w, o/t, op/tp }'
done
