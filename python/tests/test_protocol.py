"""The wire protocol codec (TorchServe's frames), against byte strings built by hand.

Run from python/: python3 -m unittest discover -s tests -t .
"""

import socket
import struct
import unittest

from oxserve_runtime import protocol, service
from oxserve_runtime.context import Context, RequestProcessor


def frame_str(value):
    value = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!i", len(value)) + value


def read(data):
    """read_message over a real socket pair holding `data`."""
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return protocol.read_message(b)
    finally:
        a.close()
        b.close()


END = struct.pack("!i", -1)


class ReadMessage(unittest.TestCase):
    def test_load(self):
        data = (b"L" + frame_str("m") + frame_str("/models/m") + struct.pack("!i", 4)
                + frame_str("h.py") + struct.pack("!i", -1) + frame_str("") + b"\x01")
        cmd, msg = read(data)
        self.assertEqual(cmd, protocol.LOAD)
        self.assertEqual(msg["model_name"], "m")
        self.assertEqual(msg["batch_size"], 4)
        self.assertIsNone(msg["gpu_id"])
        self.assertTrue(msg["limit_max_image_pixels"])

    def test_predict_decodes_json_and_text(self):
        data = (b"I" + frame_str("r1") + frame_str("h") + frame_str("v") + END
                + frame_str("body") + frame_str("application/json") + frame_str('{"a": 1}')
                + frame_str("t") + frame_str("text/plain") + frame_str("hi")
                + frame_str("b") + frame_str("application/octet-stream") + frame_str(b"\xff")
                + END + END)
        cmd, batch = read(data)
        self.assertEqual(cmd, protocol.PREDICT)
        self.assertEqual(len(batch), 1)
        self.assertEqual(batch[0]["request_id"], "r1")
        self.assertEqual(batch[0]["headers"], [("h", "v")])
        self.assertEqual(batch[0]["params"], [("body", "application/json", {"a": 1}),
                                              ("t", "text/plain", "hi"),
                                              ("b", "application/octet-stream", b"\xff")])

    def test_truncated_and_hostile_frames(self):
        with self.assertRaises(protocol.Disconnected):
            read(b"L" + struct.pack("!i", 10) + b"abc")
        with self.assertRaises(ValueError):
            read(b"L" + struct.pack("!i", -5))
        with self.assertRaises(ValueError):
            read(b"?")


class Encode(unittest.TestCase):
    def test_bodies(self):
        self.assertEqual(protocol.encode_body(b"x"), (b"x", None))
        self.assertEqual(protocol.encode_body("é"), ("é".encode("utf-8"), None))
        body, ctype = protocol.encode_body({"a": 1})
        self.assertEqual((body, ctype), (b'{\n  "a": 1\n}', "application/json"))

    def test_load_reply(self):
        self.assertEqual(protocol.encode_load_reply(200, "ok"),
                         struct.pack("!i", 200) + frame_str("ok") + END)


def parse_reply(frame):
    """A reply frame as (code, message, [(request id, content type, status, headers, body)])."""
    pos = 0

    def num():
        nonlocal pos
        (v,) = struct.unpack_from("!i", frame, pos)
        pos += 4
        return v

    def text():
        nonlocal pos
        n = num()
        pos += n
        return frame[pos - n:pos]

    code, message, items = num(), text().decode(), []
    while True:
        n = num()
        if n == -1:
            break
        pos -= 4
        rid, ctype, status, _phrase = text().decode(), text().decode(), num(), text()
        headers = {text().decode(): text().decode() for _ in range(num())}
        items.append((rid, ctype, status, headers, text()))
    assert pos == len(frame), "trailing bytes"
    return code, message, items


class PredictReply(unittest.TestCase):
    def stream_context(self):
        ctx = Context("m", "/models/m", None, 1, None, "test")
        ctx.request_ids = {0: "r1"}
        ctx.request_processor = [RequestProcessor({})]
        ctx.set_response_content_type(0, "text/event-stream")
        ctx.set_response_header(0, "x-first", "1")
        return ctx

    def test_headers_go_with_the_first_streamed_part_only(self):
        ctx = self.stream_context()
        frames = [protocol.create_predict_response({0: "data: %d\n\n" % i}, {0: "r1"},
                                                   "Intermediate Prediction success", 200, ctx,
                                                   ts_stream_next=True) for i in range(2)]
        frames.append(protocol.create_predict_response(["data: [DONE]\n\n"], {0: "r1"},
                                                       "Prediction success", 200, ctx))
        parts = [parse_reply(f)[2][0] for f in frames]
        self.assertEqual(parts[0], ("r1", "text/event-stream", 200,
                                    {"content-type": "text/event-stream", "x-first": "1",
                                     "ts_stream_next": "true"}, b"data: 0\n\n"))
        # Later parts: the content type field and status still, of the headers only the mark.
        self.assertEqual(parts[1], ("r1", "text/event-stream", 200, {"ts_stream_next": "true"},
                                    b"data: 1\n\n"))
        self.assertEqual(parts[2], ("r1", "text/event-stream", 200, {"ts_stream_next": "false"},
                                    b"data: [DONE]\n\n"))
        # The handler's own view of its headers is unchanged by what was left off the wire.
        self.assertEqual(ctx.get_response_headers(0)["x-first"], "1")

    def test_a_reply_that_does_not_stream_carries_every_header(self):
        ctx = self.stream_context()
        code, message, items = parse_reply(protocol.create_predict_response(
            [{"a": 1}], {0: "r1"}, "Prediction success", 200, ctx))
        self.assertEqual((code, message), (200, "Prediction success"))
        self.assertEqual(items, [("r1", "text/event-stream", 200,
                                  {"content-type": "text/event-stream", "x-first": "1"},
                                  b'{\n  "a": 1\n}')])

    def test_each_request_of_a_batch_keeps_its_own_headers(self):
        ctx = self.stream_context()
        ctx.request_ids = {0: "r1", 1: "r2"}
        ctx.request_processor.append(RequestProcessor({}))
        ctx.set_response_header(1, "x-second", "2")
        first = parse_reply(protocol.create_predict_response(
            {0: "a", 1: "b"}, ctx.request_ids, "m", 200, ctx, ts_stream_next=True))[2]
        second = parse_reply(protocol.create_predict_response(
            {0: "c", 1: "d"}, ctx.request_ids, "m", 200, ctx, ts_stream_next=True))[2]
        self.assertEqual([i[3] for i in first],
                         [{"content-type": "text/event-stream", "x-first": "1",
                           "ts_stream_next": "true"},
                          {"x-second": "2", "ts_stream_next": "true"}])
        self.assertEqual([i[3] for i in second], [{"ts_stream_next": "true"}] * 2)

    def test_one_frame_carries_parts_of_many_requests_each_from_its_own_context(self):
        # send_intermediate_parts: an engine step's chunks for every stream in one frame. Each
        # request (async mode: a context each, index 0) keeps its own headers, and the first
        # part of each carries them, later ones only the stream mark.
        a, b = socket.socketpair()
        try:
            contexts = []
            for rid in ("r1", "r2"):
                ctx = self.stream_context()
                ctx.request_ids = {0: rid}
                ctx.set_response_header(0, "x-id", rid)
                ctx.cl_socket = a
                contexts.append(ctx)
            frames = []
            for step in range(2):
                service.send_intermediate_parts(
                    [(ctx, 0, "data: %s-%d\n\n" % (ctx.request_ids[0], step))
                     for ctx in contexts])
                frames.append(b.recv(1 << 16))  # a small frame: one write, one read
        finally:
            a.close()
            b.close()
        code, message, items = parse_reply(frames[0])
        self.assertEqual((code, message), (200, "Intermediate Prediction success"))
        self.assertEqual([(i[0], i[3].get("x-id"), i[3]["ts_stream_next"], i[4]) for i in items],
                         [("r1", "r1", "true", b"data: r1-0\n\n"),
                          ("r2", "r2", "true", b"data: r2-0\n\n")])
        later = parse_reply(frames[1])[2]
        self.assertEqual([(i[0], i[3], i[4]) for i in later],
                         [("r1", {"ts_stream_next": "true"}, b"data: r1-1\n\n"),
                          ("r2", {"ts_stream_next": "true"}, b"data: r2-1\n\n")])

    def test_encoding_matches_the_wire_format(self):
        frame = protocol.encode_predict_reply(200, "ok", [("r", "t/x", 201, "", {"k": "v"},
                                                           b"body")])
        self.assertEqual(frame, struct.pack("!i", 200) + frame_str("ok") + frame_str("r")
                         + frame_str("t/x") + struct.pack("!i", 201) + frame_str("")
                         + struct.pack("!i", 1) + frame_str("k") + frame_str("v")
                         + frame_str("body") + END)


if __name__ == "__main__":
    unittest.main()
