"""The async worker's buffered reader and coalescing writer, over real socket pairs.

Run from python/: python3 -m unittest discover -s tests -t .
"""

import asyncio
import socket
import struct
import threading
import unittest
from unittest import mock

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
        try:
            a.sendall(b"".join(predict("r%d" % i, "x" * i) for i in range(50)))
            a.shutdown(socket.SHUT_WR)
            conn = protocol.BufferedConn(b, size=1 << 16)
            ids = [protocol.read_message(conn)[1][0]["request_id"] for i in range(50)]
            self.assertEqual(ids, ["r%d" % i for i in range(50)])
            with self.assertRaises(protocol.Disconnected):
                protocol.read_message(conn)
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


def cancel_msg(rid):
    return b"C" + frame_str(rid)


def batches_of(messages):
    """The batches of a list of (command, payload) messages, which must all be inference ones."""
    assert all(cmd == protocol.PREDICT for cmd, _ in messages), messages
    return [batch for _, batch in messages]


class Messages(unittest.TestCase):
    """protocol.MessageBuffer: what the async worker's event loop decodes as bytes arrive."""

    def test_messages_fed_a_byte_at_a_time_come_out_whole_and_in_order(self):
        data = b"".join(predict("r%d" % i, "body %d" % i) for i in range(3))
        inbox = protocol.MessageBuffer()
        batches = []
        for i in range(len(data)):
            batches.extend(batches_of(inbox.feed(data[i:i + 1])))
        self.assertEqual([b[0]["request_id"] for b in batches], ["r0", "r1", "r2"])
        self.assertEqual([b[0]["params"] for b in batches],
                         [[("body", "text/plain", "body %d" % i)] for i in range(3)])
        self.assertEqual([b[0]["headers"] for b in batches], [[("h", "v")]] * 3)

    def test_one_read_with_many_messages_and_a_partial_one(self):
        data = b"".join(predict("r%d" % i, "x" * i) for i in range(10))
        extra = predict("late", "y" * 100)
        inbox = protocol.MessageBuffer()
        got = batches_of(inbox.feed(data + extra[:50]))
        self.assertEqual([b[0]["request_id"] for b in got], ["r%d" % i for i in range(10)])
        got = batches_of(inbox.feed(extra[50:]))
        self.assertEqual([b[0]["request_id"] for b in got], ["late"])
        self.assertEqual(inbox.feed(b""), [])

    def test_cancel_messages_come_out_in_order_with_inference_ones(self):
        data = (predict("a", "x") + cancel_msg("a") + predict("b", "y") + cancel_msg("\u00e9")
                + cancel_msg(""))
        for piece in (len(data), 1, 3):
            inbox = protocol.MessageBuffer()
            got = []
            for i in range(0, len(data), piece):
                got.extend(inbox.feed(data[i:i + piece]))
            self.assertEqual([(cmd, p if cmd == protocol.CANCEL else p[0]["request_id"])
                              for cmd, p in got],
                             [(protocol.PREDICT, "a"), (protocol.CANCEL, "a"),
                              (protocol.PREDICT, "b"), (protocol.CANCEL, "\u00e9"),
                              (protocol.CANCEL, "")], piece)

    def test_a_large_message_in_small_pieces_is_parsed_a_few_times_not_once_per_piece(self):
        body = "z" * (1 << 20)
        data = predict("big", body)
        inbox = protocol.MessageBuffer()
        calls = []
        real = protocol._parse_predict  # pylint: disable=protected-access

        def counting(buf, pos):
            calls.append(len(buf))
            return real(buf, pos)

        got = []
        with mock.patch.object(protocol, "_parse_predict", counting):
            for i in range(0, len(data), 1024):
                got.extend(batches_of(inbox.feed(data[i:i + 1024])))
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0][0]["params"], [("body", "text/plain", body)])
        # About 1,000 pieces: parsed when the request id, the header, the parameter's name and
        # type and then the whole body can be there, not on every piece.
        self.assertLessEqual(len(calls), 8, calls)

    def test_anything_but_an_inference_or_cancel_message_is_refused(self):
        with self.assertRaises(ValueError):
            protocol.MessageBuffer().feed(b"L" + frame_str("model"))
        with self.assertRaises(ValueError):
            protocol.MessageBuffer().feed(predict("ok", "x") + b"Q")
        with self.assertRaises(ValueError):  # a negative string length
            protocol.MessageBuffer().feed(b"I" + frame_str("r") + struct.pack("!i", -7) + b"x" * 40)
        with self.assertRaises(ValueError):  # a cancel with a negative id length
            protocol.MessageBuffer().feed(b"C" + struct.pack("!i", -1))


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

    def test_a_full_socket_never_blocks_a_write_and_the_loop_sends_the_rest_in_order(self):
        # The event loop also reads the frontend's requests: a write that waited for a full
        # socket would stop that, and the frontend waits to write a request before it reads
        # replies. Writes keep what the socket does not take; the loop sends it when it can.
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        loop = asyncio.new_event_loop()
        received = bytearray()
        try:
            writer = CoalescingWriter(a, loop)
            frames = [(b"<%d>" % i) * 2000 for i in range(100)]
            expected = b"".join(frames[:50]) + b"thread" + b"".join(frames[50:])

            def reader():
                while len(received) < len(expected):
                    chunk = b.recv(1 << 16)
                    if not chunk:
                        return
                    received.extend(chunk)

            async def main():
                for f in frames[:50]:
                    writer.write(f, now=True)
                # Nobody reads yet: the socket is full and most of it waits in the writer.
                self.assertGreater(writer.pending(), sum(len(f) for f in frames[:50]) // 2)
                t = threading.Thread(target=writer.write, args=(b"thread",))
                t.start()
                t.join()  # returns at once: queued behind the bytes already waiting
                for f in frames[50:]:
                    writer.write(f)
                r = threading.Thread(target=reader)
                r.start()
                for _ in range(10000):
                    if writer.pending() == 0:
                        break
                    await asyncio.sleep(0.001)
                r.join(10)

            loop.run_until_complete(main())
            self.assertEqual(writer.pending(), 0)
            self.assertEqual(bytes(received), expected)
        finally:
            loop.close()
            a.close()
            b.close()


if __name__ == "__main__":
    unittest.main()
