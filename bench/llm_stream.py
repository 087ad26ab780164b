"""64 concurrent streams on one worker of examples/llm: what oxserve adds per streamed chunk.

    python3 bench/llm_stream.py --url http://127.0.0.1:8080 --pid <oxserve pid> [--streams 64]

Starts all streams at once (chat completions, `"stream": true`), reads every SSE event, and
reports:
- the server process's CPU time (user + system, from /proc; the Python worker is another process
  and not counted) divided by the chunks delivered: the frontend cost per streamed chunk;
- time to first token as the client sees it minus the engine's own (`x-engine-ttft-ms`, from the
  request entering the handler to its first word): the TTFT oxserve and its worker transport
  add, p50 / p90 / max. It includes this client's own overhead, so it is an upper bound.
Standard library only.
"""

import argparse
import http.client
import json
import os
import statistics
import threading
import time
import urllib.parse


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(url, body, barrier, out, i):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    barrier.wait()
    start = time.perf_counter()
    conn.request("POST", "/predictions/llm/1.0/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    engine_ttft = float(resp.getheader("x-engine-ttft-ms") or "nan")
    first = None
    events = 0
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            if first is None:
                first = time.perf_counter()
            events += 1
    out[i] = ((first - start) * 1000, engine_ttft, events, resp.status)
    conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    body = json.dumps({"messages": [{"role": "user", "content": "tell me a story"}],
                       "max_tokens": a.max_tokens, "stream": True})
    added, chunks, cpu = [], 0, 0.0
    for _ in range(a.rounds):
        out = [None] * a.streams
        barrier = threading.Barrier(a.streams)
        threads = [threading.Thread(target=one, args=(a.url, body, barrier, out, i))
                   for i in range(a.streams)]
        c0 = cpu_seconds(a.pid)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu += cpu_seconds(a.pid) - c0
        for ttft, engine, events, status in out:
            assert status == 200, status
            assert events == a.max_tokens + 1, events
            added.append(ttft - engine)
            chunks += events
    added.sort()
    print("streams %d x %d rounds, %d tokens each: %d chunks" % (a.streams, a.rounds,
                                                                   a.max_tokens, chunks))
    print("oxserve CPU per streamed chunk: %.1f us (%.3f s CPU)" % (cpu / chunks * 1e6, cpu))
    print("TTFT added over the engine's own: p50 %.2f ms, p90 %.2f ms, max %.2f ms"
          % (statistics.median(added), added[int(len(added) * 0.9)], added[-1]))


if __name__ == "__main__":
    main()
