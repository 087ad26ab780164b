"""The wire protocol codec (TorchServe's frames), against byte strings built by hand.

Run from python/: python3 -m unittest discover -s tests -t .
"""

import socket
import struct
import unittest

from oxserve_runtime import protocol


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


if __name__ == "__main__":
    unittest.main()
