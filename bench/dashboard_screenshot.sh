#!/usr/bin/env bash
# Produces docs/dashboard.png: the demo model under 3 minutes of varied traffic, then a headless
# Chromium screenshot of the dashboard and one `oxserve top --once` frame.
# Usage: cargo build && bench/dashboard_screenshot.sh   (needs chromium and curl)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/debug/oxserve
WORK=$(mktemp -d)
cd "$WORK"
printf 'inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\nmetric_time_interval=1\ndefault_workers_per_model=2\njob_queue_size=6\ndisable_token_authorization=true\n' > config.properties
$BIN start --foreground --ts-config config.properties > out.txt 2> err.txt &
SP=$!
sleep 3
M=$(grep -o 'metrics=[0-9.:]*' out.txt | cut -d= -f2); I=$(grep -o 'inference=[0-9.:]*' out.txt | cut -d= -f2)
end=$((SECONDS+200))
load() { # $1 = sleep_ms, $2 = pause between requests
  while [ $SECONDS -lt $end ]; do
    curl -s -o /dev/null -X POST http://$I/predictions/demo -H 'content-type: application/json' -d "{\"text\":\"good\",\"sleep_ms\":$1}"
    sleep $2
  done
}
load 0 0.02 & A=$!
load 5 0.05 & B=$!
( while [ $SECONDS -lt $end ]; do
    # every 20 s a burst that overflows the queue (503s), and a few bad requests (400s)
    sleep 20
    for i in $(seq 1 14); do curl -s -o /dev/null -X POST http://$I/predictions/demo -H 'content-type: application/json' -d '{"text":"x","sleep_ms":300}' & done
    for i in $(seq 1 5); do curl -s -o /dev/null -X POST http://$I/predictions/demo -H 'content-type: application/json' -d '{"nope":1}'; done
    wait
  done ) & C=$!
sleep 170
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update --disable-sync --no-first-run --user-data-dir=$WORK/profile --virtual-time-budget=4000 --window-size=1400,1250 --hide-scrollbars --screenshot=$ROOT/docs/dashboard.png "http://$M/dashboard#model=demo" 2>/dev/null
$BIN top --once --url http://$M 
kill $A $B $C 2>/dev/null
kill $SP
wait
rm -rf "$WORK"
echo "wrote $ROOT/docs/dashboard.png"
