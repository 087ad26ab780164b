"""The Python worker alone: the time to first token it adds over the engine's own, with no HTTP
server in the way. Drives oxserve's worker (python/oxserve_worker.py --async) with examples/llm
over its unix socket exactly as the frontend does (TorchServe's wire protocol: one `I` message per
request, each in its own write), N requests at once, and reads every reply frame.

    python3 bench/llm_worker.py [--worker python/oxserve_worker.py] [--streams 64] [--rounds 5]
        [--max-tokens 16] [--step-ms 10]

Per request: "sent" is the moment its `I` message was written, "first" the moment its first
reply frame was read back. Reported (p50 / p99 over all rounds):
- worker_ttft: first - sent;
- engine: the handler's own stamps on the first part (x-engine-first-token - x-handler-start);
- added: worker_ttft - engine: the worker runtime's share (decoding and dispatch of the request,
  the event loop starting the handler, building and writing the first frame, the socket both
  ways), split into to_handler (sent -> x-handler-start) and to_read (x-engine-first-token ->
  first frame read here);
- the worker's CPU time per reply frame.
Standard library only. Used for issue 10 (docs/benchmarks.md, LLM section).
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

from worker_wire import connect, cpu_seconds, load_msg, predict_msg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, bytearray()
        self.t = 0.0  # when the last piece of data arrived: a frame's arrival, not its parse


    def exact(self, n):
        while len(self.buf) < n:
            d = self.sock.recv(1 << 16)
            self.t = time.time()
            if not d:
                raise EOFError
            self.buf += d
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def int(self):
        return struct.unpack("!i", self.exact(4))[0]

    def str(self):
        return self.exact(self.int())

    def frame(self):
        """(code, message, [(rid, headers, body)]); self.t is then the frame's arrival time."""
        code, message, items = self.int(), self.str(), []
        while True:
            n = self.int()
            if n == -1:
                return code, message, items
            rid = self.exact(n).decode()
            self.str()  # content type
            self.int()  # status
            self.str()  # phrase
            headers = {}
            for _ in range(self.int()):
                k = self.str().decode()
                headers[k] = self.str().decode()
            items.append((rid, headers, self.str()))


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=os.path.join(ROOT, "python", "oxserve_worker.py"))
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--step-ms", type=float, default=10)
    ap.add_argument("--label", default="")
    ap.add_argument("--profile", default=None, help="cProfile the worker into this file")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="llm_worker.")
    proc = None
    try:
        model = os.path.join(work, "llm")
        os.makedirs(os.path.join(model, "MAR-INF"))
        for f in ("engine.py", "llm_handler.py"):
            shutil.copy(os.path.join(ROOT, "examples", "llm", f), model)
        sock_name = os.path.join(work, ".oxs.sock.9000")
        env = dict(os.environ, OXSERVE_MODEL_YAML_CONFIG=json.dumps(
            {"handler": {"max_num_seqs": a.streams, "step_ms": a.step_ms}}))
        prof = ["-m", "cProfile", "-o", os.path.abspath(a.profile)] if a.profile else []
        argv = [os.path.abspath(a.worker), "--sock-type", "unix", "--sock-name", sock_name, "--async"]
        proc = subprocess.Popen([sys.executable] + prof + argv, cwd=model, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock = connect(sock_name, proc)
        sock.sendall(load_msg("llm", model, "llm_handler.py"))
        rd = Reader(sock)
        code = rd.int()
        msg = rd.str()
        rd.int()
        assert code == 200, msg
        body = json.dumps({"messages": [{"role": "user", "content": "tell me a story"}],
                           "max_tokens": a.max_tokens, "stream": True}).encode()
        # `frames` counts reply parts (one per streamed chunk): a frame carried one part each
        # until examples/llm began sending a whole engine step in one frame.
        added, ttft, engine, frames = [], [], [], 0
        to_handler, to_read = [], []
        cpu = 0.0
        for r in range(a.rounds):
            sent, first, stamps = {}, {}, {}

            def read_round(first, stamps):
                nonlocal frames
                finished = 0
                while finished < a.streams:
                    _, _, items = rd.frame()
                    now = rd.t
                    for rid, headers, _ in items:
                        frames += 1
                        if rid not in first:
                            first[rid] = now
                            stamps[rid] = (float(headers["x-handler-start"]),
                                           float(headers["x-engine-first-token"]))
                        if headers.get("ts_stream_next") != "true":
                            finished += 1

            t = threading.Thread(target=read_round, args=(first, stamps))
            t.start()
            c0 = cpu_seconds(proc.pid)
            for i in range(a.streams):
                rid = "r%d-%d" % (r, i)
                m = predict_msg(rid, body)
                sent[rid] = time.time()
                sock.sendall(m)
            t.join()
            cpu += cpu_seconds(proc.pid) - c0
            for rid, t0 in sent.items():
                hs, ef = stamps[rid]
                ttft.append((first[rid] - t0) * 1000)
                engine.append((ef - hs) * 1000)
                added.append(ttft[-1] - engine[-1])
                to_handler.append((hs - t0) * 1000)
                to_read.append((first[rid] - ef) * 1000)
        out = {"label": a.label, "streams": a.streams, "rounds": a.rounds,
               "worker_ttft_p50_ms": pct(ttft, 50), "worker_ttft_p99_ms": pct(ttft, 99),
               "engine_p50_ms": pct(engine, 50), "added_p50_ms": pct(added, 50),
               "added_p99_ms": pct(added, 99), "to_handler_p50_ms": pct(to_handler, 50),
               "to_read_p50_ms": pct(to_read, 50), "worker_cpu_us_per_frame": cpu / frames * 1e6,
               "load_avg": os.getloadavg()[0]}
        print(" ".join("%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v)
                       for k, v in out.items()))
        # Closing the connection ends the worker (and writes its profile).
        sock.close()
        proc.wait(timeout=60)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
