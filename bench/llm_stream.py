"""Many concurrent token streams against one model: throughput, time to first token, and where
the time goes. Standard library only; used by bench/llm_stream.sh and bench/llm_vs_torchserve.sh.

    python3 bench/llm_stream.py --url http://127.0.0.1:8080 --path /predictions/llm/1.0/v1/chat/completions \
        [--model NAME] [--streams 64] [--max-tokens 64] [--rounds 3] [--cpu server=PID --cpu worker=PID] \
        [--access-log logs/access_log.log] [--json out.json]

Each round opens every stream at the same moment (chat completions, `"stream": true`) and reads
every chunk. The client is one asyncio loop on raw sockets (HTTP/1.1, chunked), so its own cost per
chunk is small and the same for every server. Reported:
- chunks/s: HTTP chunks (SSE events) delivered per second of the rounds' wall time;
- TTFT as the client sees it (request written to first chunk read), p50 / p99;
- with examples/llm (which sets `x-handler-start` and `x-engine-first-token`, wall-clock epoch
  seconds, on its first part): the TTFT split into client -> handler (server in, queue, worker
  transport, the worker's event loop), the engine's own TTFT (handler entry to first token), and
  first token -> client (the handler's send, worker transport, server out, client read); "added"
  is the client's TTFT minus the engine's own;
- with --access-log (oxserve with log_format=json): oxserve's own view per request, joined by
  x-request-id: queue_ms and duration_ms (arrival to the response head = the first chunk's arrival
  from the worker, for a stream). Then added = queue + worker side + outside: queue_ms; the
  worker side (duration_ms - queue_ms - the engine's TTFT: unix socket both ways, the worker's
  reader thread and event loop, the handler's send); outside oxserve (the client's TTFT -
  duration_ms: the client, the kernel's TCP, oxserve's HTTP parse and routing before `arrival`,
  and its write of the first chunk);
- CPU seconds of each --cpu process (user + system, from /proc) per delivered chunk, and this
  client's own.
"""

import argparse
import asyncio
import json
import os
import time
import urllib.parse


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def one(host, port, path, body, start, rid):
    reader, writer = await asyncio.open_connection(host, port)
    head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\nx-request-id: %s\r\n\r\n" % (path, host, port, len(body), rid))
    req = head.encode() + body
    await start.wait()
    t0 = time.time()
    writer.write(req)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    first = None
    chunks = 0
    events = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if first is None:
                first = time.time()
            chunks += 1
            events += data.count(b"data: ")
    else:
        n = int(headers.get("content-length", "0"))
        await reader.readexactly(n)
        first = time.time()
        chunks = 1
    writer.close()
    return {"rid": rid, "status": status, "t0": t0, "first": first, "chunks": chunks,
            "events": events,
            "handler_start": float(headers.get("x-handler-start", "nan")),
            "engine_first": float(headers.get("x-engine-first-token", "nan"))}


def read_access_log(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    v = json.loads(line)
                except ValueError:
                    continue
                if "request_id" in v and "duration_ms" in v:
                    out[v["request_id"]] = v
    except OSError:
        pass
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--path", default="/predictions/llm/1.0/v1/chat/completions")
    ap.add_argument("--model", default=None, help="the body's model field (vLLM needs one)")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu", action="append", default=[], help="name=pid, repeatable")
    ap.add_argument("--access-log", default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None, help="append the summary as one JSON line")
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    req = {"messages": [{"role": "user", "content": "tell me a story"}],
           "max_tokens": a.max_tokens, "stream": True}
    if a.model:
        req["model"] = a.model
    body = json.dumps(req).encode()
    procs = {k: int(v) for k, v in (c.split("=", 1) for c in a.cpu)}
    results, wall = [], 0.0
    cpu = {k: 0.0 for k in procs}
    client_cpu = 0.0
    for r in range(a.rounds):
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(one(u.hostname, u.port, a.path, body, start,
                                           "bench-%d-%d-%d" % (os.getpid(), r, i)))
                 for i in range(a.streams)]
        await asyncio.sleep(0.2)  # every connection open before the round starts
        c0 = {k: cpu_seconds(p) for k, p in procs.items()}
        client0 = time.process_time()
        t0 = time.time()
        start.set()
        out = await asyncio.gather(*tasks)
        wall += time.time() - t0
        client_cpu += time.process_time() - client0
        for k, p in procs.items():
            cpu[k] += cpu_seconds(p) - c0[k]
        for o in out:
            assert o["status"] == 200, o
        results += out
    chunks = sum(o["chunks"] for o in results)
    ttft = [(o["first"] - o["t0"]) * 1000 for o in results]
    s = {"label": a.label, "streams": a.streams, "rounds": a.rounds, "max_tokens": a.max_tokens,
         "chunks": chunks, "chunks_per_s": chunks / wall,
         "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
         "load_avg": os.getloadavg()[0]}
    for k in procs:
        s["cpu_us_per_chunk_" + k] = cpu[k] / chunks * 1e6
    # This client's own CPU: at 64 streams it is one Python thread doing every stream's reads in
    # series, part of every TTFT measured here (in "outside" and "to client").
    s["cpu_us_per_chunk_client"] = client_cpu / chunks * 1e6
    timed = [o for o in results if o["handler_start"] == o["handler_start"]]
    if timed:
        to_handler = [(o["handler_start"] - o["t0"]) * 1000 for o in timed]
        engine = [(o["engine_first"] - o["handler_start"]) * 1000 for o in timed]
        to_client = [(o["first"] - o["engine_first"]) * 1000 for o in timed]
        added = [(o["first"] - o["t0"]) * 1000 - e for o, e in zip(timed, engine)]
        for name, v in (("to_handler", to_handler), ("engine", engine),
                        ("to_client", to_client), ("added", added)):
            s[name + "_p50_ms"] = pct(v, 50)
            s[name + "_p99_ms"] = pct(v, 99)
    if a.access_log:
        log = read_access_log(a.access_log)
        joined = [(o, log[o["rid"]]) for o in results if o["rid"] in log]
        if joined:
            s["ox_queue_p50_ms"] = pct([l.get("queue_ms", 0.0) for _, l in joined], 50)
            s["ox_first_part_p50_ms"] = pct([l["duration_ms"] for _, l in joined], 50)
            s["ox_first_part_p99_ms"] = pct([l["duration_ms"] for _, l in joined], 99)
            # Client TTFT minus oxserve's arrival-to-first-part: the client, the kernel's
            # sockets and oxserve's accept, parse and write of the chunk.
            outside = [(o["first"] - o["t0"]) * 1000 - l["duration_ms"] for o, l in joined]
            s["outside_ox_p50_ms"] = pct(outside, 50)
            s["outside_ox_p99_ms"] = pct(outside, 99)
            both = [(o, l) for o, l in joined if o["handler_start"] == o["handler_start"]]
            if both:
                # oxserve's arrival-to-first-part minus its queue and the engine's own TTFT: the
                # way to the worker and back (unix socket, the worker's reader and event loop,
                # the handler's send), i.e. the worker's side.
                side = [l["duration_ms"] - l.get("queue_ms", 0.0)
                        - (o["engine_first"] - o["handler_start"]) * 1000 for o, l in both]
                s["worker_side_p50_ms"] = pct(side, 50)
                s["worker_side_p99_ms"] = pct(side, 99)
    print(" ".join("%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v)
                   for k, v in s.items()))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
