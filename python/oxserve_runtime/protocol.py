"""TorchServe's worker wire protocol: frame decoding and encoding.

Everything is big-endian. A string is an int32 length followed by that many bytes; a list ends
with an int32 -1. The frontend sends load (b"L") and inference (b"I") messages; the worker answers
each with one reply frame (inference replies may be preceded by streamed intermediate frames).

oxserve adds one message, sent only to this runtime (never to TorchServe's worker, which would
refuse it) and only in async mode: cancel (b"C", then the request id as a string), when the
client of a request in flight has gone away. The worker cancels that request's handler, if it is
still running, and answers it with a 499 error frame; a cancel for a request already answered
is ignored.
"""

import json
import os
import struct

LOAD = b"L"
PREDICT = b"I"
CANCEL = b"C"
END = -1


class Disconnected(Exception):
    """The frontend closed the connection."""


class BufferedConn:
    """A socket's receiving side with a buffer: `recv` hands out buffered bytes first and reads
    the socket in large pieces. read_message asks for every int and string separately; on a raw
    socket that is one recv syscall (and one GIL release) per field, about twenty per request."""

    def __init__(self, sock, size=1 << 16):
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0

    def recv(self, n):
        if self._pos >= len(self._buf):
            self._buf = self._sock.recv(self._size)
            self._pos = 0
            if not self._buf:
                return b""
        out = self._buf[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def fill(self):
        """Makes sure something is buffered (a read that may block); Disconnected at EOF."""
        if self._pos >= len(self._buf):
            self._buf = self._sock.recv(self._size)
            self._pos = 0
            if not self._buf:
                raise Disconnected()

    def take_predict(self):
        """The next message if it is an inference message wholly in the buffer (the common case:
        the frontend writes each message at once), parsed in one pass; None otherwise, with
        nothing consumed, and read_message's field-by-field path takes over."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf) or buf[pos] != PREDICT[0]:
            return None
        try:
            batch, end = _parse_predict(buf, pos + 1)
        except (_Short, struct.error):
            return None
        self._pos = end
        return batch


class _Short(Exception):
    """The buffer ends inside the message; `need`: the buffer length the field that did not fit
    needs (0: unknown, try again with any more bytes)."""

    def __init__(self, need=0):
        super().__init__(need)
        self.need = need


class MessageBuffer:
    """Async mode's messages, decoded from the bytes as they arrive (the event loop reads the
    socket without waiting): `feed(data)` returns every message now complete, in order, as
    (PREDICT, batch) or (CANCEL, request id); the start of an incomplete message stays buffered.
    A large message arriving in many reads is parsed again only once enough bytes are there for
    the field that did not fit, so its cost stays linear in its size. Raises ValueError on any
    other command."""

    def __init__(self):
        self._pending = bytearray()
        self._need = 0

    def feed(self, data):
        if self._pending:
            self._pending += data
            if len(self._pending) < self._need:
                return []
            buf = bytes(self._pending)
            self._pending = bytearray()
        else:
            buf = data
        size, pos, messages = len(buf), 0, []
        self._need = 0
        while pos < size:
            cmd = buf[pos]
            try:
                if cmd == PREDICT[0]:
                    batch, end = _parse_predict(buf, pos + 1)
                    messages.append((PREDICT, batch))
                elif cmd == CANCEL[0]:
                    (length,) = _INT_FROM(buf, pos + 1)
                    if length < 0:
                        raise ValueError("negative request id length %d in cancel" % length)
                    end = pos + 5 + length
                    if end > size:
                        raise _Short(end)
                    messages.append((CANCEL, buf[pos + 5:end].decode("utf-8", "replace")))
                else:
                    raise ValueError("unexpected command %r in async mode" % buf[pos:pos + 1])
            except _Short as e:
                self._need = e.need - pos
                break
            except struct.error:  # an int cut off at the end of what has arrived
                break
            pos = end
        if pos < size:
            self._pending = bytearray(buf[pos:])
        return messages


_INT_FROM = struct.Struct("!i").unpack_from


def _parse_predict(buf, pos):
    """An inference message's body from buf at pos: (batch, position after it). The same format
    as read_message's PREDICT branch, read with offsets instead of a call per field."""
    size = len(buf)

    def take(pos):
        (length,) = _INT_FROM(buf, pos)
        pos += 4
        if length < 0:
            raise ValueError("negative string length %d in frame" % length)
        end = pos + length
        if end > size:
            raise _Short(end)
        return buf[pos:end], end

    batch = []
    while True:
        (length,) = _INT_FROM(buf, pos)
        if length == END:
            return batch, pos + 4
        rid, pos = take(pos)
        request = {"request_id": rid.decode("utf-8"), "headers": [], "params": []}
        while True:
            (length,) = _INT_FROM(buf, pos)
            if length == END:
                pos += 4
                break
            name, pos = take(pos)
            value, pos = take(pos)
            request["headers"].append((name.decode("utf-8", "replace"),
                                       value.decode("utf-8", "replace")))
        while True:
            (length,) = _INT_FROM(buf, pos)
            if length == END:
                pos += 4
                break
            name, pos = take(pos)
            content_type, pos = take(pos)
            raw, pos = take(pos)
            content_type = content_type.decode("utf-8", "replace")
            request["params"].append((name.decode("utf-8", "replace"), content_type,
                                      decode_value(content_type, raw)))
        batch.append(request)


def _read_exact(conn, n):
    chunk = conn.recv(n) if n else b""
    if len(chunk) == n:
        return chunk  # the common case with BufferedConn: no copy into a bytearray
    if not chunk:
        raise Disconnected()
    buf = bytearray(chunk)
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise Disconnected()
        buf += chunk
    return bytes(buf)


def _read_int(conn):
    return struct.unpack("!i", _read_exact(conn, 4))[0]


def _read_bytes(conn, length=None):
    if length is None:
        length = _read_int(conn)
    if length < 0:
        raise ValueError("negative string length %d in frame" % length)
    return _read_exact(conn, length)


def decode_value(content_type, raw):
    """Decodes a parameter value the way TorchServe does: JSON to objects, text/* to str."""
    if os.environ.get("TS_DECODE_INPUT_REQUEST", "true") != "true":
        return raw
    media = content_type.split(";", 1)[0].strip().lower()
    try:
        if media == "application/json":
            return json.loads(raw.decode("utf-8"))
        if media.startswith("text"):
            return raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        pass  # TorchServe forwards undecodable payloads as bytes
    return raw


def read_message(conn):
    """Reads one message; returns (command, payload). Raises Disconnected at EOF."""
    if isinstance(conn, BufferedConn):
        conn.fill()
        batch = conn.take_predict()
        if batch is not None:
            return PREDICT, batch
    cmd = _read_exact(conn, 1)
    if cmd == LOAD:
        msg = {
            "model_name": _read_bytes(conn).decode("utf-8"),
            "model_path": _read_bytes(conn).decode("utf-8"),
            "batch_size": _read_int(conn),
            "handler": _read_bytes(conn).decode("utf-8"),
        }
        gpu = _read_int(conn)
        msg["gpu_id"] = gpu if gpu >= 0 else None
        msg["envelope"] = _read_bytes(conn).decode("utf-8")
        msg["limit_max_image_pixels"] = _read_exact(conn, 1) != b"\x00"
        return cmd, msg
    if cmd == PREDICT:
        batch = []
        while True:
            length = _read_int(conn)
            if length == END:
                return cmd, batch
            request = {"request_id": _read_bytes(conn, length).decode("utf-8"),
                       "headers": [], "params": []}
            while True:
                length = _read_int(conn)
                if length == END:
                    break
                name = _read_bytes(conn, length).decode("utf-8", "replace")
                value = _read_bytes(conn).decode("utf-8", "replace")
                request["headers"].append((name, value))
            while True:
                length = _read_int(conn)
                if length == END:
                    break
                name = _read_bytes(conn, length).decode("utf-8", "replace")
                content_type = _read_bytes(conn).decode("utf-8", "replace")
                raw = _read_bytes(conn)
                request["params"].append((name, content_type, decode_value(content_type, raw)))
            batch.append(request)
    raise ValueError("unknown command %r" % cmd)


def _put_str(out, value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    out += struct.pack("!i", len(value))
    out += value


def encode_load_reply(code, message):
    out = bytearray(struct.pack("!i", code))
    _put_str(out, message)
    out += struct.pack("!i", END)
    return bytes(out)


def encode_body(value):
    """(body bytes, content type implied by the value or None). Raises TypeError if unencodable."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return value.encode("utf-8"), None
    return json.dumps(value, indent=2).encode("utf-8"), "application/json"


_PACK_INT = struct.Struct("!i").pack
_END_BYTES = _PACK_INT(END)


def encode_predict_reply(code, message, items):
    """items: list of (request_id, content_type, status, phrase, headers dict, body bytes).

    Built as a list of pieces joined once: this runs for every streamed chunk, and a _put_str
    call (a function call, a pack and two bytearray appends) per string was the largest Python
    cost per chunk in a profile of 64 streams (bench/llm_worker.py --profile)."""
    pack = _PACK_INT
    message = message.encode("utf-8")
    out = [pack(code), pack(len(message)), message]
    add = out.extend
    for request_id, content_type, status, phrase, headers, body in items:
        request_id = request_id.encode("utf-8")
        content_type = (content_type or "").encode("utf-8")
        phrase = (phrase or "").encode("utf-8")
        add((pack(len(request_id)), request_id, pack(len(content_type)), content_type,
             pack(status), pack(len(phrase)), phrase, pack(len(headers))))
        for k, v in headers.items():
            k = str(k).encode("utf-8")
            v = str(v).encode("utf-8")
            add((pack(len(k)), k, pack(len(v)), v))
        add((pack(len(body)), body))
    out.append(_END_BYTES)
    return b"".join(out)


def create_predict_response(ret, req_id_map, message, code, context=None, ts_stream_next=False):
    """Builds a reply frame for the batch described by req_id_map ({index: request id}).

    ret is the handler's list of replies (None for a failed batch). With a context, per-request
    status, headers and content type come from it, and ts_stream_next is maintained as TorchServe
    does: "true" on intermediate frames, "false" on the final frame of a request that streamed.

    Unlike TorchServe's worker, the handler's response headers travel only until the first frame
    of a request has gone: the frontend builds the HTTP response head from the first part and
    reads nothing but `ts_stream_next` from the later ones, so re-sending every header on every
    chunk (five per chunk for examples/llm) was encoding work for nothing.
    """
    items = []
    for idx in req_id_map:
        request_id = req_id_map[idx]
        if ret is None:
            items.append((request_id, "", code, "", {}, b"error"))
            continue
        items.append(predict_item(request_id, ret[idx], code, context, idx, ts_stream_next))
    return encode_predict_reply(code, message, items)


def predict_item(request_id, data, code, context, idx, ts_stream_next):
    """One request's entry of a reply frame: (request id, content type, status, reason phrase,
    headers, body), its status and headers from the context at index idx."""
    body, implied_type = encode_body(data)
    if context is None:
        return (request_id, implied_type or "", code, "", {}, body)
    headers = context.get_response_headers(idx)
    stopping = getattr(context, "stopping_criteria", None)
    if ts_stream_next:
        headers["ts_stream_next"] = "true"
    elif stopping:
        is_stop = stopping[idx](data)
        if is_stop is not None:
            headers["ts_stream_next"] = "false" if is_stop else "true"
    elif headers.get("ts_stream_next") == "true":
        headers["ts_stream_next"] = "false"
    processor = context.request_processor[idx] if context.request_processor else None
    sent = headers
    if getattr(processor, "headers_sent", False):
        mark = headers.get("ts_stream_next")
        sent = {} if mark is None else {"ts_stream_next": mark}
    elif processor is not None and headers.get("ts_stream_next") == "true":
        processor.headers_sent = True
    content_type = context.get_response_content_type(idx)
    if not content_type and implied_type:
        content_type = implied_type
        context.set_response_content_type(idx, content_type)
    status, phrase = context.get_response_status(idx)
    return (request_id, content_type, 200 if status is None else status, phrase, sent, body)
