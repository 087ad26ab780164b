"""The async worker's buffered reader and coalescing writer, over real socket pairs.

Run from python/: python3 -m unittest discover -s tests -t .
"""

import asyncio
import socket
import struct
import threading
import unittest

from oxserve_runtime import protocol
from oxserve_runtime.service import CoalescingWriter


def frame_str(value):
    value = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!i", len(value)) + value


END = struct.pack("!i", -1)


def predict(rid, body):
    return (b"I" + frame_str(rid) + frame_str("h") + frame_str("v") + END
            + frame_str("body") + frame_str("text/plain") + frame_str(body) + END + END)


def read_all(sock):
    out = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


class Buffered(unittest.TestCase):
    def test_many_messages_in_one_read_then_eof(self):
        a, b = socket.socketpair()
        blocks = []
        try:
            a.sendall(b"".join(predict("r%d" % i, "x" * i) for i in range(50)))
            a.shutdown(socket.SHUT_WR)
            conn = protocol.BufferedConn(b, size=1 << 16, on_block=lambda: blocks.append(1))
            ids = [protocol.read_message(conn)[1][0]["request_id"] for i in range(50)]
            self.assertEqual(ids, ["r%d" % i for i in range(50)])
            with self.assertRaises(protocol.Disconnected):
                protocol.read_message(conn)
            # One read for the 50 messages (one hand-over before it), one more that saw EOF.
            self.assertEqual(len(blocks), 2)
        finally:
            a.close()
            b.close()

    def test_message_split_across_tiny_reads(self):
        a, b = socket.socketpair()
        try:
            data = predict("split", "hello world")
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            conn = protocol.BufferedConn(b, size=3)
            cmd, batch = protocol.read_message(conn)
            self.assertEqual(cmd, protocol.PREDICT)
            self.assertEqual(batch[0]["params"], [("body", "text/plain", "hello world")])
        finally:
            a.close()
            b.close()

    def test_truncated_message_is_a_disconnect(self):
        a, b = socket.socketpair()
        try:
            a.sendall(predict("cut", "abcdef")[:-7])
            a.shutdown(socket.SHUT_WR)
            with self.assertRaises(protocol.Disconnected):
                protocol.read_message(protocol.BufferedConn(b))
        finally:
            a.close()
            b.close()


    def test_one_pass_and_field_by_field_parses_agree(self):
        data = (b"I" + frame_str("r1") + frame_str("h1") + frame_str("v1") + frame_str("h2")
                + frame_str("\u00e9") + END
                + frame_str("body") + frame_str("application/json") + frame_str('{"a": [1]}')
                + frame_str("b") + frame_str("application/octet-stream") + frame_str(b"\xff\x00")
                + END
                + frame_str("r2") + END + END + END)
        parsed = []
        for size in (1 << 16, 1):  # the whole message buffered, then one byte per read
            a, b = socket.socketpair()
            try:
                a.sendall(data)
                a.shutdown(socket.SHUT_WR)
                parsed.append(protocol.read_message(protocol.BufferedConn(b, size=size)))
            finally:
                a.close()
                b.close()
        self.assertEqual(parsed[0], parsed[1])
        cmd, batch = parsed[0]
        self.assertEqual(cmd, protocol.PREDICT)
        self.assertEqual([r["request_id"] for r in batch], ["r1", "r2"])
        self.assertEqual(batch[0]["headers"], [("h1", "v1"), ("h2", "\u00e9")])
        self.assertEqual(batch[0]["params"], [("body", "application/json", {"a": [1]}),
                                              ("b", "application/octet-stream", b"\xff\x00")])

    def test_negative_length_is_refused_by_the_one_pass_parse(self):
        a, b = socket.socketpair()
        try:
            a.sendall(b"I" + frame_str("r") + struct.pack("!i", -7) + b"rest" * 8)
            a.shutdown(socket.SHUT_WR)
            with self.assertRaises(ValueError):
                protocol.read_message(protocol.BufferedConn(b))
        finally:
            a.close()
            b.close()


class Coalescing(unittest.TestCase):
    def test_frames_of_one_iteration_share_writes_and_keep_order(self):
        a, b = socket.socketpair()
        loop = asyncio.new_event_loop()
        try:
            writer = CoalescingWriter(a, loop)
            n = CoalescingWriter.MAX_FRAMES * 2 + 3
            sent = []

            async def one(i):
                await asyncio.sleep(0)
                frame = b"<%d>" % i
                sent.append(frame)
                writer.write(frame)

            async def main():
                await asyncio.gather(*(one(i) for i in range(n)))
                # The leftover frames go out at the start of the next iteration.
                await asyncio.sleep(0)

            loop.run_until_complete(main())
            a.shutdown(socket.SHUT_WR)
            self.assertEqual(read_all(b), b"".join(sent))
        finally:
            loop.close()
            a.close()
            b.close()

    def test_an_iterations_first_frame_leaves_at_once_then_batches_grow(self):
        # The first frame written in a loop iteration is sent at once (a step's first chunk
        # must not wait for the others to be built), then batches of 4, then MAX_FRAMES; what
        # is left goes out at the start of the next iteration. `now=True` sends at once.
        a, b = socket.socketpair()
        b.setblocking(False)
        loop = asyncio.new_event_loop()

        def available():
            try:
                return b.recv(1 << 16)
            except BlockingIOError:
                return b""

        try:
            writer = CoalescingWriter(a, loop)
            seen = []

            async def main():
                for i in range(6):
                    writer.write(b"<%d>" % i)
                    seen.append(available())
                writer.write(b"<now>", now=True)
                seen.append(available())
                writer.write(b"<last>")
                seen.append(available())
                await asyncio.sleep(0)
                seen.append(available())

            loop.run_until_complete(main())
            self.assertEqual(seen, [b"<0>", b"", b"", b"", b"<1><2><3><4>", b"", b"<5><now>",
                                    b"", b"<last>"])
        finally:
            loop.close()
            a.close()
            b.close()

    def test_write_from_another_thread_is_sent_at_once_after_buffered_frames(self):
        a, b = socket.socketpair()
        loop = asyncio.new_event_loop()
        try:
            writer = CoalescingWriter(a, loop)
            writer.write(b"first")  # on the loop's thread, loop not running: buffered
            t = threading.Thread(target=writer.write, args=(b"second",))
            t.start()
            t.join()
            a.shutdown(socket.SHUT_WR)
            self.assertEqual(read_all(b), b"firstsecond")
        finally:
            loop.close()
            a.close()
            b.close()


if __name__ == "__main__":
    unittest.main()
