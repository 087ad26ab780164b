//! TorchServe's worker wire protocol: the frames exchanged with a Python worker over its socket.
//!
//! Pure encoding and decoding, no I/O. Everything is big-endian; a string is an `i32` length then
//! that many bytes; a list ends with an `i32` -1.
//!
//! - load: `b"L"`, model name, model path, `i32` batch size, handler, `i32` gpu id (-1: none),
//!   envelope, 1-byte bool (limitMaxImagePixels). Reply: `i32` code, message, `i32` -1.
//! - inference: `b"I"`, per request: request id, headers as (name, value) pairs ending with -1,
//!   parameters as (name, content type, value) ending with -1; after the last request, -1.
//!   Reply: `i32` code, message, per request: request id, content type, `i32` status, reason
//!   phrase, `i32` header count and (name, value) pairs, body; the list ends with -1.
//! - cancel (oxserve's own, not TorchServe's: sent only to oxserve's runtime in async mode):
//!   `b"C"`, request id. No reply of its own: the request's final reply frame answers it (a 499
//!   error frame when its handler was still running).
//!
//! Decoders take the bytes received so far and return `Ok(None)` while a frame is incomplete, so a
//! reader can call them again after every read; the `_from` variants also say how many bytes must
//! be there before it is worth trying again, and nothing is copied out of the buffer until a frame
//! is whole, so a frame arriving in many pieces is not decoded (and copied) over and over. Nothing is allocated from a length or count on
//! the wire before the bytes it describes have arrived; every string is bounded by `max_len`
//! (max_response_size) and a response's header count by [`MAX_HEADERS`].

use bytes::Bytes;

use super::InferRequest;

const END: i32 = -1;

/// Most headers one response of a reply frame may carry (TorchServe sets none; a handler that
/// sends more is broken, and each one costs an allocation here).
pub const MAX_HEADERS: i32 = 1024;

/// The load command.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRequest {
    pub model_name: String,
    pub model_path: String,
    pub batch_size: i32,
    pub handler: String,
    /// -1 for no GPU.
    pub gpu_id: i32,
    pub envelope: String,
    pub limit_max_image_pixels: bool,
}

/// The worker's answer to a load command.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReply {
    pub code: i32,
    pub message: String,
}

/// One reply frame to an inference command (final, or an intermediate streamed part).
#[derive(Debug, Clone, PartialEq)]
pub struct PredictReply {
    pub code: i32,
    pub message: String,
    pub responses: Vec<FrameResponse>,
}

/// The part of a reply frame for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameResponse {
    pub request_id: String,
    pub content_type: String,
    pub status: i32,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl FrameResponse {
    /// A response header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether more parts of this request follow (header `ts_stream_next: true`).
    pub fn is_intermediate(&self) -> bool {
        self.header("ts_stream_next") == Some("true")
    }
}

/// A frame that can never become valid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid frame from worker: {0}")]
pub struct ProtocolError(pub String);

fn put_int(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let len = i32::try_from(b.len()).expect("frame strings are shorter than 2 GiB");
    put_int(out, len);
    out.extend_from_slice(b);
}

/// Encodes a load command.
pub fn encode_load(req: &LoadRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + req.model_path.len() + req.handler.len());
    out.push(b'L');
    put_bytes(&mut out, req.model_name.as_bytes());
    put_bytes(&mut out, req.model_path.as_bytes());
    put_int(&mut out, req.batch_size);
    put_bytes(&mut out, req.handler.as_bytes());
    put_int(&mut out, req.gpu_id);
    put_bytes(&mut out, req.envelope.as_bytes());
    out.push(u8::from(req.limit_max_image_pixels));
    out
}

/// Encodes an inference command for a batch.
pub fn encode_infer(batch: &[InferRequest]) -> Vec<u8> {
    let size: usize = batch
        .iter()
        .map(|r| {
            64 + r.id.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| 8 + k.len() + v.len())
                    .sum::<usize>()
                + r.params
                    .iter()
                    .map(|p| 12 + p.name.len() + p.content_type.len() + p.value.len())
                    .sum::<usize>()
        })
        .sum();
    let mut out = Vec::with_capacity(8 + size);
    out.push(b'I');
    for req in batch {
        put_bytes(&mut out, req.id.as_bytes());
        for (k, v) in &req.headers {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        put_int(&mut out, END);
        for p in &req.params {
            put_bytes(&mut out, p.name.as_bytes());
            put_bytes(&mut out, p.content_type.as_bytes());
            put_bytes(&mut out, &p.value);
        }
        put_int(&mut out, END);
    }
    put_int(&mut out, END);
    out
}

/// Encodes cancel messages, one per request id, in one buffer.
pub fn encode_cancel(ids: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.iter().map(|id| 5 + id.len()).sum());
    for id in ids {
        out.push(b'C');
        put_bytes(&mut out, id.as_bytes());
    }
    out
}

/// Reads fields from a buffer; `None` from any read means "not all bytes are here yet", and
/// `need` then says how many bytes the buffer must hold before the read can succeed.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    max_len: usize,
    need: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], max_len: usize) -> Cursor<'a> {
        Cursor {
            buf,
            pos: 0,
            max_len,
            need: 0,
        }
    }

    fn int(&mut self) -> Option<i32> {
        let Some(b) = self.buf.get(self.pos..self.pos + 4) else {
            self.need = self.pos + 4;
            return None;
        };
        self.pos += 4;
        Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string whose length was already read.
    fn bytes_of(&mut self, len: i32, what: &str) -> Result<Option<&'a [u8]>, ProtocolError> {
        let len = usize::try_from(len)
            .map_err(|_| ProtocolError(format!("negative length {len} for {what}")))?;
        if len > self.max_len {
            return Err(ProtocolError(format!(
                "{what} of {len} bytes exceeds the limit of {} bytes",
                self.max_len
            )));
        }
        let Some(b) = self.buf.get(self.pos..self.pos + len) else {
            self.need = self.pos + len;
            return Ok(None);
        };
        self.pos += len;
        Ok(Some(b))
    }

    fn bytes(&mut self, what: &str) -> Result<Option<&'a [u8]>, ProtocolError> {
        match self.int() {
            Some(len) => self.bytes_of(len, what),
            None => Ok(None),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Early return for "incomplete" inside decoders: `Err(bytes needed)`.
macro_rules! need {
    ($c:ident, $e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(Err($c.need)),
        }
    };
}

/// The outcome of decoding from the bytes received so far: a frame and the bytes it used, or the
/// number of bytes the buffer must hold before decoding can get further. A reader that waits for
/// that many bytes decodes a frame a bounded number of times however it arrives in pieces.
pub type Decoded<T> = Result<(T, usize), usize>;

/// Decodes a load reply from the start of `buf`: the reply and the bytes it used.
pub fn decode_load_reply(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(LoadReply, usize)>, ProtocolError> {
    Ok(decode_load_reply_from(buf, max_len)?.ok())
}

/// [`decode_load_reply`], saying how many bytes are needed when the reply is incomplete.
pub fn decode_load_reply_from(
    buf: &[u8],
    max_len: usize,
) -> Result<Decoded<LoadReply>, ProtocolError> {
    let mut c = Cursor::new(buf, max_len);
    let code = need!(c, c.int());
    let message = need!(c, c.bytes("load reply message")?);
    let end = need!(c, c.int());
    if end != END {
        return Err(ProtocolError(format!(
            "load reply ends with {end} instead of -1"
        )));
    }
    Ok(Ok((
        LoadReply {
            code,
            message: text(message),
        },
        c.pos,
    )))
}

/// Decodes one inference reply frame from the start of `buf`: the frame and the bytes it used.
/// `max_len` bounds every string (bodies included) and `max_responses` the responses of the frame
/// (a worker answers each request of the batch once per frame): more are refused.
pub fn decode_predict_reply(
    buf: &[u8],
    max_len: usize,
    max_responses: usize,
) -> Result<Option<(PredictReply, usize)>, ProtocolError> {
    Ok(decode_predict_reply_from(buf, max_len, max_responses)?.ok())
}

/// One response of a frame as slices of the buffer; nothing is copied until the frame is whole.
struct RawResponse<'a> {
    request_id: &'a [u8],
    content_type: &'a [u8],
    status: i32,
    reason: &'a [u8],
    headers: Vec<(&'a [u8], &'a [u8])>,
    body: &'a [u8],
}

/// [`decode_predict_reply`], saying how many bytes are needed when the frame is incomplete.
pub fn decode_predict_reply_from(
    buf: &[u8],
    max_len: usize,
    max_responses: usize,
) -> Result<Decoded<PredictReply>, ProtocolError> {
    let mut c = Cursor::new(buf, max_len);
    let code = need!(c, c.int());
    let message = need!(c, c.bytes("reply message")?);
    let mut raw = Vec::new();
    loop {
        let len = need!(c, c.int());
        if len == END {
            break;
        }
        if raw.len() == max_responses {
            return Err(ProtocolError(format!(
                "more than {max_responses} responses in one frame"
            )));
        }
        let request_id = need!(c, c.bytes_of(len, "request id")?);
        let content_type = need!(c, c.bytes("content type")?);
        let status = need!(c, c.int());
        let reason = need!(c, c.bytes("reason phrase")?);
        let count = need!(c, c.int());
        if !(0..=MAX_HEADERS).contains(&count) {
            return Err(ProtocolError(format!(
                "header count {count} is not from 0 to {MAX_HEADERS}"
            )));
        }
        let mut headers = Vec::new();
        for _ in 0..count {
            let k = need!(c, c.bytes("header name")?);
            let v = need!(c, c.bytes("header value")?);
            headers.push((k, v));
        }
        let body = need!(c, c.bytes("response body")?);
        raw.push(RawResponse {
            request_id,
            content_type,
            status,
            reason,
            headers,
            body,
        });
    }
    let responses = raw
        .into_iter()
        .map(|r| FrameResponse {
            request_id: text(r.request_id),
            content_type: text(r.content_type),
            status: r.status,
            reason: text(r.reason),
            headers: r.headers.iter().map(|(k, v)| (text(k), text(v))).collect(),
            body: Bytes::copy_from_slice(r.body),
        })
        .collect();
    Ok(Ok((
        PredictReply {
            code,
            message: text(message),
            responses,
        },
        c.pos,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Param;

    const MAX: usize = 1 << 20;

    fn req(id: &str, body: &[u8]) -> InferRequest {
        InferRequest {
            id: id.into(),
            headers: vec![("h".into(), "v".into())],
            params: vec![Param {
                name: "body".into(),
                content_type: "text/plain".into(),
                value: Bytes::copy_from_slice(body),
            }],
        }
    }

    #[test]
    fn load_frame_is_byte_exact() {
        let frame = encode_load(&LoadRequest {
            model_name: "echo".into(),
            model_path: "/m".into(),
            batch_size: 4,
            handler: "h.py".into(),
            gpu_id: -1,
            envelope: String::new(),
            limit_max_image_pixels: true,
        });
        let expected: &[u8] = b"L\
\x00\x00\x00\x04echo\
\x00\x00\x00\x02/m\
\x00\x00\x00\x04\
\x00\x00\x00\x04h.py\
\xff\xff\xff\xff\
\x00\x00\x00\x00\
\x01";
        assert_eq!(frame, expected);
    }

    #[test]
    fn infer_frame_is_byte_exact() {
        let frame = encode_infer(&[req("a", b"x"), req("bc", b"")]);
        let expected: &[u8] = b"I\
\x00\x00\x00\x01a\
\x00\x00\x00\x01h\x00\x00\x00\x01v\xff\xff\xff\xff\
\x00\x00\x00\x04body\x00\x00\x00\x0atext/plain\x00\x00\x00\x01x\xff\xff\xff\xff\
\x00\x00\x00\x02bc\
\x00\x00\x00\x01h\x00\x00\x00\x01v\xff\xff\xff\xff\
\x00\x00\x00\x04body\x00\x00\x00\x0atext/plain\x00\x00\x00\x00\xff\xff\xff\xff\
\xff\xff\xff\xff";
        assert_eq!(frame, expected);
    }

    #[test]
    fn cancel_frames_are_byte_exact() {
        assert_eq!(
            encode_cancel(&["a".into(), "bc".into()]),
            b"C\x00\x00\x00\x01aC\x00\x00\x00\x02bc"
        );
        assert!(encode_cancel(&[]).is_empty());
    }

    #[test]
    fn empty_batch_and_no_params() {
        assert_eq!(encode_infer(&[]), b"I\xff\xff\xff\xff");
        let r = InferRequest {
            id: "z".into(),
            ..Default::default()
        };
        assert_eq!(
            encode_infer(&[r]),
            b"I\x00\x00\x00\x01z\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
        );
    }

    /// A load reply as TorchServe's create_load_model_response writes it.
    const LOAD_OK: &[u8] = b"\x00\x00\x00\xc8\x00\x00\x00\x11loaded model echo\xff\xff\xff\xff";

    #[test]
    fn load_reply_decodes() {
        let (reply, used) = decode_load_reply(LOAD_OK, MAX).unwrap().unwrap();
        assert_eq!(used, LOAD_OK.len());
        assert_eq!(reply.code, 200);
        assert_eq!(reply.message, "loaded model echo");
        for cut in 0..LOAD_OK.len() {
            assert_eq!(
                decode_load_reply(&LOAD_OK[..cut], MAX).unwrap(),
                None,
                "cut {cut}"
            );
        }
        let bad = b"\x00\x00\x00\xc8\x00\x00\x00\x00\x00\x00\x00\x00";
        assert!(decode_load_reply(bad, MAX).is_err());
    }

    /// An intermediate streamed frame as TorchServe's create_predict_response writes it (captured
    /// from oxserve's Python runtime running examples/streaming), followed by the final frame.
    const STREAM: &[u8] = b"\x00\x00\x00\xc8\x00\x00\x00\x1fIntermediate Prediction success\
\x00\x00\x00\x03id0\x00\x00\x00\x00\x00\x00\x00\xc8\x00\x00\x00\x00\
\x00\x00\x00\x01\x00\x00\x00\x0ets_stream_next\x00\x00\x00\x04true\
\x00\x00\x00\x0chi0: part 1\n\
\xff\xff\xff\xff\
\x00\x00\x00\xc8\x00\x00\x00\x12Prediction success\
\x00\x00\x00\x03id0\x00\x00\x00\x10application/json\x00\x00\x00\xc9\x00\x00\x00\x07Created\
\x00\x00\x00\x02\x00\x00\x00\x0ets_stream_next\x00\x00\x00\x05false\
\x00\x00\x00\x0ccontent-type\x00\x00\x00\x10application/json\
\x00\x00\x00\x02{}\
\xff\xff\xff\xff";

    #[test]
    fn stream_frames_decode_in_sequence() {
        let (first, used) = decode_predict_reply(STREAM, MAX, 16).unwrap().unwrap();
        assert_eq!(first.code, 200);
        assert_eq!(first.message, "Intermediate Prediction success");
        assert_eq!(first.responses.len(), 1);
        let r = &first.responses[0];
        assert_eq!(r.request_id, "id0");
        assert_eq!(r.content_type, "");
        assert_eq!(r.status, 200);
        assert!(r.is_intermediate());
        assert_eq!(&r.body[..], b"hi0: part 1\n");

        let (last, used2) = decode_predict_reply(&STREAM[used..], MAX, 16)
            .unwrap()
            .unwrap();
        assert_eq!(used + used2, STREAM.len());
        let r = &last.responses[0];
        assert_eq!(r.content_type, "application/json");
        assert_eq!((r.status, r.reason.as_str()), (201, "Created"));
        assert!(!r.is_intermediate());
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(&r.body[..], b"{}");
    }

    #[test]
    fn every_prefix_is_incomplete_not_an_error() {
        let (_, used) = decode_predict_reply(STREAM, MAX, 16).unwrap().unwrap();
        for cut in 0..used {
            assert_eq!(
                decode_predict_reply(&STREAM[..cut], MAX, 16).unwrap(),
                None,
                "cut {cut}"
            );
        }
    }

    /// A failed batch as TorchServe writes it: no context, body "error", status = code.
    #[test]
    fn failed_batch_frame() {
        let frame: &[u8] = b"\x00\x00\x01\xf7\x00\x00\x00\x11Prediction failed\
\x00\x00\x00\x01a\x00\x00\x00\x00\x00\x00\x01\xf7\x00\x00\x00\x00\x00\x00\x00\x00\
\x00\x00\x00\x05error\xff\xff\xff\xff";
        let (reply, _) = decode_predict_reply(frame, MAX, 16).unwrap().unwrap();
        assert_eq!(reply.code, 503);
        assert_eq!(reply.message, "Prediction failed");
        assert_eq!(reply.responses[0].status, 503);
        assert_eq!(&reply.responses[0].body[..], b"error");
    }

    /// Fed one byte at a time, a reader that waits for the bytes the decoder says it needs decodes
    /// the frame once per field, not once per byte.
    #[test]
    fn the_need_hint_bounds_the_attempts() {
        let (whole, used) = decode_predict_reply(STREAM, MAX, 16).unwrap().unwrap();
        let mut need = 0;
        let mut attempts = 0;
        for end in 0..=used {
            if end < need {
                continue;
            }
            attempts += 1;
            match decode_predict_reply_from(&STREAM[..end], MAX, 16).unwrap() {
                Ok((reply, n)) => {
                    assert_eq!((reply, n), (whole.clone(), used));
                    break;
                }
                Err(n) => {
                    assert!(n > end, "need {n} at {end}");
                    need = n;
                }
            }
        }
        assert!(attempts <= 20, "{attempts} attempts for {used} bytes");
        // More responses than the batch has requests is an error.
        let e = decode_predict_reply(STREAM, MAX, 0).unwrap_err();
        assert!(e.0.contains("more than 0 responses"), "{e}");
    }

    #[test]
    fn bad_lengths_are_errors() {
        // negative message length
        assert!(decode_predict_reply(b"\x00\x00\x00\xc8\xff\xff\xff\xfe", MAX, 16).is_err());
        // body longer than the limit is refused before it arrives
        let big: &[u8] = b"\x00\x00\x00\xc8\x00\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x00\x00\
\x00\x00\x00\xc8\x00\x00\x00\x00\x00\x00\x00\x00\x7f\x00\x00\x00";
        let err = decode_predict_reply(big, 1024, 16).unwrap_err();
        assert!(err.0.contains("response body"), "{err}");
        // negative header count
        let neg: &[u8] = b"\x00\x00\x00\xc8\x00\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x00\x00\
\x00\x00\x00\xc8\x00\x00\x00\x00\xff\xff\xff\xf0";
        assert!(decode_predict_reply(neg, MAX, 16).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Checks what a decoded frame may hold: nothing longer than the string cap, no more
        /// headers than the header cap, and no more bytes used than were given.
        fn bounded(buf: &[u8], max: usize) {
            if let Ok(Some((reply, used))) = decode_predict_reply(buf, max, 16) {
                assert!(used <= buf.len());
                assert!(
                    reply.message.len() <= max * 3,
                    "lossy UTF-8 at most triples"
                );
                for r in &reply.responses {
                    assert!(r.body.len() <= max);
                    assert!(r.headers.len() <= MAX_HEADERS as usize);
                }
            }
            if let Ok(Some((_, used))) = decode_load_reply(buf, max) {
                assert!(used <= buf.len());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512), max in 0usize..4096) {
                bounded(&buf, max);
            }

            #[test]
            fn mutated_frames_never_panic(
                edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
                cut in any::<proptest::sample::Index>(),
            ) {
                let mut buf = STREAM.to_vec();
                for (at, byte) in edits {
                    let i = at.index(buf.len());
                    buf[i] = byte;
                }
                let keep = cut.index(buf.len() + 1);
                bounded(&buf[..keep], 64);
                bounded(&buf, MAX);
            }

            #[test]
            fn encoded_requests_have_the_declared_layout(
                id in "[a-z0-9-]{0,40}",
                body in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let frame = encode_infer(&[req(&id, &body)]);
                prop_assert_eq!(frame[0], b'I');
                let id_len = i32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]);
                prop_assert_eq!(id_len as usize, id.len());
                prop_assert!(frame.ends_with(&[0xff; 4]));
            }
        }
    }
}
