"""What the scripts that drive a Python worker with no server share (bench/llm_worker.py,
bench/ts_worker_ceiling.py): the messages they send in TorchServe's worker wire format, waiting
for a started worker's socket, and a process's CPU time. Standard library only."""

import os
import socket
import struct
import sys
import time

END = struct.pack("!i", -1)


def s(v):
    """A string of the wire format: int32 length, then the bytes."""
    v = v.encode() if isinstance(v, str) else v
    return struct.pack("!i", len(v)) + v


def load_msg(name, path, handler):
    """A load message: batch size 1, no GPU, no envelope."""
    return (b"L" + s(name) + s(path) + struct.pack("!i", 1) + s(handler) + END + s("")
            + b"\x01")


def predict_msg(rid, body):
    """An inference message of one chat completion request (the `url_path` TorchServe passes)."""
    return (b"I" + s(rid) + s("url_path") + s("v1/chat/completions") + END
            + s("body") + s("application/json") + s(body) + END + END)


def connect(sock_name, proc, seconds=30):
    """A connection to the unix socket a just-started worker process listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + seconds
    while True:
        try:
            sock.connect(sock_name)
            return sock
        except OSError:
            if proc.poll() is not None:
                sys.exit("the worker exited with %s before listening" % proc.returncode)
            if time.monotonic() > deadline:
                sys.exit("the worker did not listen on %s in %d s" % (sock_name, seconds))
            time.sleep(0.05)


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
