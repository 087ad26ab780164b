#!/usr/bin/env bash
# Side by side: TorchServe 0.12.0 and oxserve serve the same stand-in-vLLM archive (TorchServe's own
# vllm_handler, examples/llm/vllm_standin on PYTHONPATH, packaged by the real torch-model-archiver),
# both with TorchServe's own worker (oxserve: worker_runtime=torchserve), one worker, under the same
# load: STREAMS concurrent chat completion streams of MAX_TOKENS tokens, ROUNDS rounds per run.
# Both servers stay up; runs alternate TorchServe / oxserve RUNS times, so the load of the shared
# machine hits both alike. Prints each run and the medians: chunks/s, client TTFT p50/p99, CPU per
# chunk of the server and of the worker.
#
#   TS_VENV=/work/ts-venv bench/llm_vs_torchserve.sh            # release build of oxserve
#   OXSERVE_BIN=... STREAMS=64 MAX_TOKENS=64 ROUNDS=2 RUNS=3 STEP_MS=10 bench/llm_vs_torchserve.sh
#   CLIENT=python ...                    # the Python load client instead of the Rust one
#   CEILING=1 ...                        # also TorchServe's worker alone, no frontend, after each
#                                        # pair (bench/ts_worker_ceiling.py): the most any frontend gets
#
# Needs: a venv with torchserve 0.12.0, torch-model-archiver and torch (TS_VENV), Java 17.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${TS_VENV:-/work/ts-venv}
[ -x "$venv/bin/torchserve" ] || { echo "no torchserve in $venv (set TS_VENV)" >&2; exit 1; }
command -v java >/dev/null || { echo "TorchServe needs Java 17" >&2; exit 1; }
BIN=${OXSERVE_BIN:-target/release/oxserve}
[ -n "${OXSERVE_BIN:-}" ] || cargo build --release --quiet --bin oxserve
BIN=$(realpath "$BIN")
. bench/stream_client.sh
STREAMS=${STREAMS:-64}; MAX_TOKENS=${MAX_TOKENS:-64}; ROUNDS=${ROUNDS:-2}; RUNS=${RUNS:-3}

work=$(mktemp -d)
mkdir -p "$work/tmp" "$work/ts" "$work/ox" "$work/store"
pids=()
cleanup() {
  for p in "${pids[@]}"; do pkill -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The archive: TorchServe's vLLM recipe, the stand-in engine's step from STEP_MS.
sed "s/standin_step_ms: *[0-9.]*/standin_step_ms: ${STEP_MS:-10}/" examples/llm/vllm_standin/model-config.yaml \
  >"$work/model-config.yaml"
"$venv/bin/torch-model-archiver" --model-name vllm --version 1.0 --handler vllm_handler \
  --config-file "$work/model-config.yaml" --archive-format no-archive --export-path "$work/store"
export PYTHONPATH="$root/examples/llm/vllm_standin"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ready() { # url: waits until the vllm model answers a chat completion
  for _ in $(seq 1200); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' \
      -d '{"model": "standin", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}' \
      "$1/predictions/vllm/1.0/v1/chat/completions" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.25
  done
  echo "never ready: $1" >&2; return 1
}

# TorchServe: its own pid file lives in TMPDIR, so a private TMPDIR keeps it apart from any other
# TorchServe on the machine (and `torchserve --stop` is never needed).
TS_IP=$(free_port)
cat >"$work/ts/config.properties" <<CFG
inference_address=http://127.0.0.1:$TS_IP
management_address=http://127.0.0.1:$(free_port)
metrics_address=http://127.0.0.1:$(free_port)
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
disable_token_authorization=true
model_store=$work/store
load_models=vllm
CFG
(cd "$work/ts" && TMPDIR="$work/tmp" PATH="$venv/bin:$PATH" exec "$venv/bin/torchserve" --start --foreground --ncs \
   --ts-config "$work/ts/config.properties" --disable-token-auth >"$work/ts/out.log" 2>&1) &
pids+=($!)
OX_IP=$(free_port)
cat >"$work/ox/config.properties" <<CFG
inference_address=http://127.0.0.1:$OX_IP
management_address=http://127.0.0.1:$(free_port)
metrics_address=http://127.0.0.1:$(free_port)
grpc_inference_port=$(free_port)
grpc_management_port=$(free_port)
model_store=$work/store
load_models=vllm
disable_token_authorization=true
worker_runtime=torchserve
python_executable=$venv/bin/python
CFG
(cd "$work/ox" && RUST_LOG=warn exec "$BIN" start --foreground --ts-config "$work/ox/config.properties" >"$work/ox/out.log" 2>&1) &
pids+=($!)
ready "http://127.0.0.1:$TS_IP" || { tail -50 "$work/ts/out.log"; exit 1; }
ready "http://127.0.0.1:$OX_IP" || { tail -50 "$work/ox/out.log"; exit 1; }
java=$(pgrep -f 'org.pytorch.serve.ModelServer' -P "${pids[0]}" | head -1)
ts_worker=$(pgrep -f model_service_worker -P "$java" | head -1)
ox_worker=$(pgrep -f model_service_worker -P "${pids[1]}" | head -1)
[ -n "$java" ] && [ -n "$ts_worker" ] && [ -n "$ox_worker" ] || { echo "process ids not found" >&2; exit 1; }

out=${JSON:-$work/results.jsonl}
bench() { # label ip server-pid worker-pid
  "${CLIENT_CMD[@]}" --url "http://127.0.0.1:$2" --path /predictions/vllm/1.0/v1/chat/completions \
    --model standin --streams "$STREAMS" --max-tokens "$MAX_TOKENS" --rounds "$ROUNDS" \
    --cpu "server=$3" --cpu "worker=$4" --label "$1" --json "$out"
}
# One warm-up round each (JIT, first-use allocations), not recorded.
"${CLIENT_CMD[@]}" --url "http://127.0.0.1:$TS_IP" --path /predictions/vllm/1.0/v1/chat/completions \
  --model standin --streams "$STREAMS" --max-tokens 8 --rounds 1 >/dev/null
"${CLIENT_CMD[@]}" --url "http://127.0.0.1:$OX_IP" --path /predictions/vllm/1.0/v1/chat/completions \
  --model standin --streams "$STREAMS" --max-tokens 8 --rounds 1 >/dev/null
for run in $(seq "$RUNS"); do
  bench torchserve "$TS_IP" "$java" "$ts_worker"
  bench oxserve "$OX_IP" "${pids[1]}" "$ox_worker"
  if [ -n "${CEILING:-}" ]; then
    python3 bench/ts_worker_ceiling.py --venv "$venv" --model-dir "$work/store/vllm" \
      --streams "$STREAMS" --max-tokens "$MAX_TOKENS" --rounds $((ROUNDS * 3)) --json "$out"
  fi
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for label in ("torchserve", "oxserve", "worker-alone"):
    rs = [r for r in rows if r["label"] == label]
    if not rs:
        continue
    med[label] = {k: statistics.median(r.get(k, float("nan")) for r in rs) for k in
                  ("chunks_per_s", "ttft_p50_ms", "ttft_p99_ms", "cpu_us_per_chunk_server",
                   "cpu_us_per_chunk_worker", "load_avg")}
    med[label]["runs"] = len(rs)
print("medians over runs (%s streams x %s tokens)" % (rows[0]["streams"], rows[0]["max_tokens"]))
print("%-11s %5s %10s %10s %10s %14s %14s %8s" % ("server", "runs", "chunks/s", "ttft_p50", "ttft_p99",
                                                 "server_us/chk", "worker_us/chk", "load"))
for label, m in med.items():
    print("%-11s %5d %10.0f %10.1f %10.1f %14.1f %14.1f %8.1f" % (
        label, m["runs"], m["chunks_per_s"], m["ttft_p50_ms"], m["ttft_p99_ms"],
        m["cpu_us_per_chunk_server"], m["cpu_us_per_chunk_worker"], m["load_avg"]))
t, o = med["torchserve"], med["oxserve"]
print("oxserve / torchserve: chunks/s x%.2f, TTFT p50 x%.2f, TTFT p99 x%.2f" % (
    o["chunks_per_s"] / t["chunks_per_s"], o["ttft_p50_ms"] / t["ttft_p50_ms"],
    o["ttft_p99_ms"] / t["ttft_p99_ms"]))
if "worker-alone" in med:
    w = med["worker-alone"]
    print("TorchServe's worker alone (no frontend): %.0f chunks/s = x%.2f TorchServe's, "
          "oxserve reaches %.0f%% of it" % (w["chunks_per_s"], w["chunks_per_s"] / t["chunks_per_s"],
                                           100 * o["chunks_per_s"] / w["chunks_per_s"]))
PY
