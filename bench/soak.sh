#!/usr/bin/env bash
# Soak test: a release oxserve on loopback for a bounded time under a mix of everything at once,
# then checks that nothing was lost or leaked.
#
#   bench/soak.sh                  # 5 minutes
#   DURATION=120 bench/soak.sh     # seconds
#
# Load, all concurrently:
# - CLIENTS threads sending predictions round robin to 3 models: demo (built-in backend, packaged
#   as demo.mar), echo and batching (Python handlers from examples/make_archives.sh);
# - scaling echo and batching up and down (1..3 workers) every 4 s;
# - registering and unregistering custom_metrics.mar every 3 s;
# - kill -9 of a random Python worker every 6 s;
# - a /metrics scrape every second.
# Checks at the end (exit code 1 if any fails):
# - every request got an HTTP answer (any status; a worker killed mid-request answers 5xx);
# - ts_inference_requests_total of each model equals the requests sent to it;
# - every scrape answered 200;
# - server RSS grew by less than 20 % from the end of warm-up to the end;
# - after SIGTERM: no process left from the run (workers included), nothing left in TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-300}
CLIENTS=${CLIENTS:-4}

cargo build --release --quiet --bin oxserve
work=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then kill -9 "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/store" "$work/tmp"
examples/make_archives.sh "$work/store" >/dev/null
python3 - "$work/store/demo.mar" <<'PY'
import json, sys, zipfile
manifest = {"createdOn": "28/11/2026 12:00:00", "runtime": "python",
            "model": {"modelName": "demo", "modelVersion": "1.0", "handler": "builtin"},
            "archiverVersion": "0.12.0"}
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
PY

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IP=$(free_port); MP=$(free_port); XP=$(free_port)
cat >"$work/config.properties" <<CFG
disable_token_authorization=true
inference_address=http://127.0.0.1:$IP
grpc_inference_port=0
grpc_management_port=0
management_address=http://127.0.0.1:$MP
metrics_address=http://127.0.0.1:$XP
model_store=$work/store
load_models=demo.mar,echo.mar,batching.mar
default_workers_per_model=1
enable_model_api=true
metric_time_interval=5
CFG
bin="$PWD/target/release/oxserve"
(cd "$work" && TMPDIR="$work/tmp" RUST_LOG=warn exec "$bin" start --foreground \
  --ts-config "$work/config.properties" >"$work/oxserve.log" 2>&1) &
server=$!

python3 - "$IP" "$MP" "$XP" "$server" "$DURATION" "$CLIENTS" "$work" <<'PY'
import json, os, random, re, signal, sys, threading, time, urllib.request, urllib.error

ip, mp, xp, pid, duration, clients, work = sys.argv[1:8]
pid, duration, clients = int(pid), int(duration), int(clients)
INF, MGMT, MET = (f"http://127.0.0.1:{p}" for p in (ip, mp, xp))
MODELS = {"demo": b'{"text": "I love this"}', "echo": b'{"x": 1}', "batching": b'{"x": 2}'}

def call(method, url, body=None, timeout=120):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"content-type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

deadline = time.time() + 120
while True:
    try:
        if call("GET", f"{INF}/ping", timeout=5)[0] == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("the server never became healthy")
    time.sleep(0.2)

stop = threading.Event()
lock = threading.Lock()
sent = {m: 0 for m in MODELS}
answered = {}
unanswered = []
worker_pids = set()
scrapes = {"ok": 0, "bad": 0}
events = {"scale": 0, "register": 0, "unregister": 0, "kill": 0}

def client(i):
    names = list(MODELS)
    n = i
    while not stop.is_set():
        m = names[n % len(names)]
        n += 1
        with lock:
            sent[m] += 1
        try:
            status, _ = call("POST", f"{INF}/predictions/{m}", MODELS[m])
            with lock:
                answered[status] = answered.get(status, 0) + 1
        except Exception as e:  # no HTTP answer at all
            with lock:
                unanswered.append(f"{m}: {e!r}")

def workers_of(model):
    try:
        status, body = call("GET", f"{MGMT}/models/{model}", timeout=30)
        if status == 200:
            return [w["pid"] for w in json.loads(body)[0].get("workers", []) if w.get("pid")]
    except Exception:
        pass
    return []

def every(seconds, fn):
    def loop():
        while not stop.wait(seconds):
            try:
                fn()
            except Exception as e:
                print(f"soak: {fn.__name__}: {e!r}", file=sys.stderr)
    return loop

def scale():
    for m in ("echo", "batching"):
        k = random.randint(1, 3)
        call("PUT", f"{MGMT}/models/{m}?min_worker={k}&max_worker={k}&synchronous=true")
        events["scale"] += 1

registered = [False]
def churn():
    if registered[0]:
        call("DELETE", f"{MGMT}/models/custom_metrics")
        events["unregister"] += 1
    else:
        call("POST", f"{MGMT}/models?url=custom_metrics.mar&initial_workers=1&synchronous=true")
        events["register"] += 1
        for p in workers_of("custom_metrics"):
            worker_pids.add(p)
    registered[0] = not registered[0]

def kill():
    pids = [p for p in workers_of(random.choice(["echo", "batching"])) if p != pid]
    worker_pids.update(pids)
    if pids:
        try:
            os.kill(random.choice(pids), signal.SIGKILL)
            events["kill"] += 1
        except ProcessLookupError:
            pass

def scrape():
    try:
        status, _ = call("GET", f"{MET}/metrics", timeout=30)
    except Exception:
        status = 0
    scrapes["ok" if status == 200 else "bad"] += 1

threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
threads += [threading.Thread(target=every(s, f)) for s, f in ((4, scale), (3, churn), (6, kill), (1, scrape))]
for t in threads:
    t.start()
time.sleep(min(30, duration / 5))
rss_start = rss_kib()
time.sleep(max(0, duration - min(30, duration / 5)))
stop.set()
for t in threads:
    t.join()
rss_end = rss_kib()
for m in ("demo", "echo", "batching"):
    worker_pids.update(workers_of(m))

_, text = call("GET", f"{MET}/metrics")
text = text.decode()
counted = {m: 0.0 for m in MODELS}
for line in text.splitlines():
    if line.startswith("ts_inference_requests_total{"):
        name = re.search(r'model_name="([^"]+)"', line).group(1)
        if name in counted:
            counted[name] += float(line.rsplit(" ", 1)[1])

def alive(p):
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

os.kill(pid, signal.SIGTERM)
deadline = time.time() + 60
while alive(pid) and time.time() < deadline:
    time.sleep(0.1)
if alive(pid):
    sys.exit("the server did not stop within 60 s of SIGTERM")
# Workers get a moment to notice their server is gone.
time.sleep(1)
orphans = [p for p in worker_pids if alive(p)]
# Any process still running with the run's folder on its command line is an orphan too.
for d in os.listdir("/proc"):
    if d.isdigit() and int(d) != os.getpid():
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if work.encode() in f.read() and alive(d):
                    orphans.append(int(d))
        except OSError:
            pass
left = os.listdir(os.path.join(work, "tmp"))

total = sum(sent.values())
growth = (rss_end - rss_start) / rss_start * 100
print(f"duration {duration} s, {clients} clients: {total} predictions sent "
      f"({total / duration:.0f}/s), answers by status {dict(sorted(answered.items()))}")
print(f"events: {events}, scrapes {scrapes}")
print(f"ts_inference_requests_total {counted} vs sent {sent}")
print(f"server RSS {rss_start} KiB after warm-up -> {rss_end} KiB at the end ({growth:+.1f} %)")
print(f"after SIGTERM: {len(set(orphans))} orphan processes, {len(left)} entries left in TMPDIR")
failures = []
if unanswered:
    failures.append(f"{len(unanswered)} requests got no answer, e.g. {unanswered[:3]}")
if any(counted[m] != sent[m] for m in MODELS):
    failures.append("ts_inference_requests_total differs from what was sent")
if scrapes["bad"]:
    failures.append(f"{scrapes['bad']} scrapes failed")
if growth >= 20:
    failures.append(f"RSS grew {growth:.1f} %")
if orphans:
    failures.append(f"orphan processes {sorted(set(orphans))}")
if left:
    failures.append(f"left in TMPDIR: {left[:5]}")
if failures:
    print("FAILED: " + "; ".join(failures))
    sys.exit(1)
print("OK")
PY
server=""
