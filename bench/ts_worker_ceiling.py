"""TorchServe's own Python worker alone, with no frontend: the most chunks per second any frontend
could get out of it for the stand-in-vLLM archive of bench/llm_vs_torchserve.sh.

Starts `ts/model_service_worker.py --async` (from a TorchServe venv) in the model folder, loads the
archive (TorchServe's vllm_handler, examples/llm/vllm_standin on PYTHONPATH), then runs rounds of
STREAMS chat completion streams of MAX_TOKENS tokens started together, as the frontends do: one
`I` message per request over the worker's unix socket. The reader does the least a frontend can:
it counts frames by their message ("Result" for a stream chunk, "Prediction success" for the last
one) in the bytes as they arrive, without parsing them, so nearly all of this machine's CPU is left
to the worker. What it prints is the worker's own ceiling here: a frontend that parses frames and
writes HTTP chunks can only come below it.

    python3 bench/ts_worker_ceiling.py --venv /work/ts-venv [--step-ms 0] [--streams 64]
        [--max-tokens 64] [--rounds 6] [--read-pause 0.0005] [--json FILE] [--model-dir DIR]

Without --model-dir it packages the archive itself as bench/llm_vs_torchserve.sh does (the venv's
torch-model-archiver, no-archive format, examples/llm/vllm_standin/model-config.yaml with the
engine step set to --step-ms); `CEILING=1 bench/llm_vs_torchserve.sh` runs this script on that
script's own archive after each pair of runs, so that all three alternate.
Standard library only.
"""

import argparse
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from worker_wire import connect, cpu_seconds, load_msg, predict_msg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
class Counter:
    """Counts occurrences of one byte string in a stream that arrives in pieces (an occurrence
    may straddle two pieces)."""

    def __init__(self, needle):
        self.needle, self.tail, self.n = needle, b"", 0

    def feed(self, data):
        joined = self.tail + data
        self.n += joined.count(self.needle) - self.tail.count(self.needle)
        self.tail = joined[-(len(self.needle) - 1):]


def package(venv, work, step_ms):
    """The stand-in-vLLM archive, as bench/llm_vs_torchserve.sh packages it; returns its folder."""
    with open(os.path.join(ROOT, "examples", "llm", "vllm_standin", "model-config.yaml")) as f:
        config = re.sub(r"standin_step_ms: *[0-9.]+", "standin_step_ms: %g" % step_ms, f.read())
    with open(os.path.join(work, "model-config.yaml"), "w") as f:
        f.write(config)
    store = os.path.join(work, "store")
    os.makedirs(store)
    subprocess.run([os.path.join(venv, "bin", "torch-model-archiver"), "--model-name", "vllm",
                    "--version", "1.0", "--handler", "vllm_handler", "--config-file",
                    os.path.join(work, "model-config.yaml"), "--archive-format", "no-archive",
                    "--export-path", store], check=True)
    return os.path.join(store, "vllm")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", required=True, help="a venv with torchserve 0.12.0")
    ap.add_argument("--model-dir", default=None, help="a no-archive model folder (default: made)")
    ap.add_argument("--step-ms", type=float, default=0.0, help="engine step of the made archive")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--read-pause", type=float, default=0.0005,
                    help="seconds to wait before each read: fewer, larger reads, so that the "
                         "worker's writes seldom have a sleeping reader to wake (0: read at once)")
    ap.add_argument("--label", default="worker-alone")
    ap.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    a = ap.parse_args()
    python = os.path.join(a.venv, "bin", "python")
    ts = glob.glob(os.path.join(a.venv, "lib", "python3*", "site-packages", "ts"))
    if not ts:
        sys.exit("no ts package in %s" % a.venv)
    work = tempfile.mkdtemp(prefix="ts_worker_ceiling.")
    if a.model_dir is None:
        a.model_dir = package(a.venv, work, a.step_ms)
    sock_name = os.path.join(work, ".ts.sock.9000")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "examples", "llm", "vllm_standin"), a.model_dir]))
    proc = subprocess.Popen(
        [python, os.path.join(ts[0], "model_service_worker.py"), "--sock-type", "unix",
         "--sock-name", sock_name, "--metrics-config",
         os.path.join(ts[0], "configs", "metrics.yaml"), "--async"],
        cwd=a.model_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = connect(sock_name, proc)
        sock.sendall(load_msg("vllm", a.model_dir, "vllm_handler"))
        reply = sock.recv(1 << 16)
        code = struct.unpack("!i", reply[:4])[0]
        if code != 200:
            sys.exit("load failed: %r" % reply)
        body = json.dumps({"model": "standin", "max_tokens": a.max_tokens, "stream": True,
                           "messages": [{"role": "user", "content": "tell me a story"}]}).encode()

        def round_(r, n):
            chunks, finals = Counter(b"\x00\x00\x00\x06Result"), Counter(b"Prediction success")
            for i in range(n):
                sock.sendall(predict_msg("r%d-%d" % (r, i), body))
            while finals.n < n:
                time.sleep(a.read_pause)
                data = sock.recv(1 << 20)
                if not data:
                    sys.exit("the worker closed its socket")
                chunks.feed(data)
                finals.feed(data)
            return chunks.n + finals.n

        round_(-1, a.streams)  # warm-up, not counted
        c0, t0, total = cpu_seconds(proc.pid), time.monotonic(), 0
        for r in range(a.rounds):
            total += round_(r, a.streams)
        wall, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - c0
        out = {"label": a.label, "streams": a.streams, "max_tokens": a.max_tokens,
               "rounds": a.rounds, "read_pause_s": a.read_pause, "chunks": total,
               "chunks_per_s": total / wall, "cpu_us_per_chunk_worker": cpu / total * 1e6,
               "load_avg": os.getloadavg()[0]}
        print(" ".join("%s=%s" % (k, (("%.4g" if abs(v) < 1 else "%.1f") % v) if isinstance(v, float) else v)
                       for k, v in out.items()))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(out) + "\n")
        sock.close()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
