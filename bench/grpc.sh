#!/usr/bin/env bash
# gRPC against HTTP: oxserve's gRPC Predictions and its HTTP POST /predictions under the same
# closed-loop load from the same client process (examples/grpc_load.rs, tonic and reqwest).
#
#   bench/grpc.sh                      # 32 clients, 10 s per run, built-in demo model, 2 workers
#   CLIENTS=64 DURATION_S=30 bench/grpc.sh
#   GRPC_TLS=1 bench/grpc.sh           # gRPC over TLS (enable_grpc_ssl, a fresh P-256 certificate)
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-32}
SECONDS_PER_RUN=${DURATION_S:-10}

cargo build --release --quiet --bin oxserve --example grpc_load
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:0
management_address=http://127.0.0.1:0
metrics_address=http://127.0.0.1:0
grpc_inference_port=0
grpc_management_port=0
default_workers_per_model=${WORKERS:-2}
CFG
ca=()
if [ "${GRPC_TLS:-0}" = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
  printf 'enable_grpc_ssl=true\nprivate_key_file=%s\ncertificate_file=%s\n' "$work/key.pem" "$work/cert.pem" \
    >>"$work/config.properties"
  ca=("$work/cert.pem")
fi
LOG_LOCATION="$work/logs" RUST_LOG=warn target/release/oxserve start --foreground --ts-config "$work/config.properties" >"$work/ox.log" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "oxserve listening" "$work/ox.log" && break; sleep 0.1; done
line=$(grep -m1 "oxserve listening" "$work/ox.log")
field() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
http=$(field inference); grpc=$(field grpc_inference)
for _ in $(seq 100); do curl -sf "http://$http/ping" >/dev/null && break; sleep 0.1; done
target/release/examples/grpc_load "$grpc" "$http" demo "$CLIENTS" "$SECONDS_PER_RUN" "${ca[@]}"
