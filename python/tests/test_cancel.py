"""Async mode's cancel message: the real serve_async loop and Service over a socket pair, with a
handler module written to a temporary model folder.

Run from python/: python3 -m unittest discover -s tests -t .
"""

import os
import socket
import struct
import sys
import tempfile
import threading
import unittest

import oxserve_worker
from oxserve_runtime import protocol, service

from .test_async_io import END, frame_str, predict

HANDLER = '''
import asyncio

seen = []

async def handle(data, context):
    if data is None:
        return None
    body = data[0]["body"]
    if body == "wait":
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(("cancelled", context.request_ids[0]))
            raise
    seen.append(("answered", context.request_ids[0]))
    return ["ok " + body]
'''


def cancel(rid):
    return b"C" + frame_str(rid)


class Frames:
    """Reads reply frames: (code, message, [(request id, status, body)])."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def exact(self, n):
        while len(self.buf) < n:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def int(self):
        return struct.unpack("!i", self.exact(4))[0]

    def str(self):
        return self.exact(self.int())

    def load_reply(self):
        code, message = self.int(), self.str()
        self.int()
        return code, message

    def frame(self):
        code, message, items = self.int(), self.str().decode(), []
        while True:
            n = self.int()
            if n == -1:
                return code, message, items
            rid = self.exact(n).decode()
            self.str()  # content type
            status = self.int()
            self.str()  # reason phrase
            for _ in range(self.int()):
                self.str()
                self.str()
            items.append((rid, status, self.str()))


class Cancel(unittest.TestCase):
    def test_cancelled_requests_get_499_and_the_others_their_answers(self):
        model_dir = tempfile.mkdtemp(prefix="oxs-cancel-")
        with open(os.path.join(model_dir, "cancel_probe.py"), "w", encoding="utf-8") as f:
            f.write(HANDLER)
        a, b = socket.socketpair()
        done = threading.Event()

        def worker():
            try:
                oxserve_worker.serve_async(b, protocol, service, None)
            finally:
                done.set()

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            a.settimeout(30)
            a.sendall(b"L" + frame_str("probe") + frame_str(model_dir) + struct.pack("!i", 1)
                      + frame_str("cancel_probe.py") + END + frame_str("") + b"\x01")
            frames = Frames(a)
            self.assertEqual(frames.load_reply()[0], 200)
            # Cancelled in the same read as its request: its task never starts.
            a.sendall(predict("early", "wait") + cancel("early"))
            self.assertEqual(frames.frame(), (499, "cancelled: the client closed the request",
                                              [("early", 499, b"error")]))
            # Cancelled while its handler waits; an unknown id is ignored; the others answer.
            a.sendall(predict("late", "wait") + predict("now", "x"))
            code, _, items = frames.frame()
            self.assertEqual((code, items), (200, [("now", 200, b"ok x")]))
            a.sendall(cancel("nobody") + cancel("late") + predict("after", "y"))
            got = {}
            for _ in range(2):
                code, message, items = frames.frame()
                for rid, status, body in items:
                    got[rid] = (code, status, body)
            self.assertEqual(got, {"late": (499, 499, b"error"), "after": (200, 200, b"ok y")})
            probe = sys.modules["cancel_probe"]
            self.assertEqual(probe.seen, [("answered", "now"), ("cancelled", "late"),
                                          ("answered", "after")])
        finally:
            a.close()
            self.assertTrue(done.wait(10), "serve_async did not end when the frontend left")
            b.close()


if __name__ == "__main__":
    unittest.main()
