#!/usr/bin/env bash
# A/B comparison of oxserve builds on the load benchmark: runs bench/load.sh for each build in
# turn, RUNS rounds (builds alternate, so slow drifts of a shared machine hit all of them), and
# prints every run and then each build's medians. Run-to-run noise on the 2-core development
# machine is 10-25 % for one run; the medians of alternating runs are what docs/benchmarks.md
# compares.
#
#   bench/ab.sh /tmp/oxserve-before target/release/oxserve        # RUNS=4 DURATION=5s ACCESS_LOG=false
#   RUNS=6 ACCESS_LOG=true bench/ab.sh A B C
#   bench/ab.sh target/release/oxserve:"A=1 B=2"                   # BUILD:VAR=VALUE ... sets variables for that build
#                                                                  # (for both servers: TOKIO_WORKER_THREADS reaches bare axum too)
#
# Needs wrk and a release build of examples/hello_server (cargo build --release --example hello_server).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
RUNS=${RUNS:-4}
export DURATION=${DURATION:-5s} ACCESS_LOG=${ACCESS_LOG:-false} SCRAPE=false
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for run in $(seq "$RUNS"); do
  for spec in "$@"; do
    bin=${spec%%:*}
    vars=()
    [ "$spec" = "$bin" ] || read -ra vars <<<"${spec#*:}"
    line=$(env "${vars[@]}" OXSERVE_BIN="$bin" bench/load.sh 2>&1 | awk -v spec="${spec// /,}" -v run="$run" -v load="$(cut -d' ' -f1 /proc/loadavg)" '
      /^ratio/ { ratio=$4 }
      /^oxserve CPU/ { cpu=$5; user=$8; sys=$10 }
      /^bare axum CPU/ { bcpu=$6 }
      END { gsub(/[,;]/, "", user); gsub(/[,;]/, "", sys); print spec, run, ratio, cpu, user, sys, bcpu, load }')
    echo "$line" | tee -a "$out" | awk '{ printf "run %s  %-40s ratio %s  oxserve %s us/req (user %s, system %s)  bare %s us/req  load %s\n", $2, $1, $3, $4, $5, $6, $7, $8 }'
  done
done
echo "medians over $RUNS runs:"
for spec in "$@"; do
  awk -v spec="${spec// /,}" '$1 == spec' "$out" | python3 -c '
import sys, statistics as st
rows = [l.split() for l in sys.stdin if l.strip()]
col = lambda i: st.median(float(r[i]) for r in rows)
print(f"  {sys.argv[1]:<40} ratio {col(2):.2f}  oxserve {col(3):.1f} us/req (user {col(4):.1f}, system {col(5):.1f})  bare {col(6):.1f} us/req")
' "${spec// /,}"
done
