//! Request ids and the access log, for every listener.
//!
//! Like TorchServe, every response of every listener carries `x-request-id` and gets one
//! access_log.log line. Unlike TorchServe (which always makes a new UUID), a client's own
//! `x-request-id` is kept, so one id follows a request from the caller's logs through oxserve's
//! to the handler's (`context.request_ids`); one that is malformed or too long is refused with a
//! 400 rather than silently replaced, so the caller learns why its id does not show up.
//!
//! These are plain functions that the connection layer (`api::http`) calls around the router,
//! not an axum middleware: a `from_fn` layer boxes a future and clones the boxed inner service
//! on every request, which the request path's CPU budget (issue 9) showed.

use std::net::SocketAddr;
use std::time::Instant;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use axum::response::Response;

use super::{AccessRecord, ModelInfo};
use crate::api::error::ApiError;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, in the request's extensions for the handlers that pass it on.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The id a request goes by: the client's `x-request-id`, or a new UUID when it sent none.
/// A header that is not an id oxserve can carry is the request's 400 answer.
pub fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(v) = headers.get(&X_REQUEST_ID) else {
        return Ok(super::new_request_id());
    };
    match v.to_str() {
        Ok(s) if super::is_request_id(s) => Ok(s.to_string()),
        _ => Err(ApiError::bad_request(super::REQUEST_ID_RULE)),
    }
}

/// What the access line needs of the request, taken before the router consumes it: nothing (not
/// even a clock reading) when the access log is off.
pub struct Seen(Option<Line>);

struct Line {
    start: Instant,
    remote: SocketAddr,
    method: Method,
    uri: Uri,
    version: Version,
}

impl Seen {
    pub fn new(remote: SocketAddr, method: &Method, uri: &Uri, version: Version) -> Seen {
        Seen(super::access_enabled().then(|| Line {
            start: Instant::now(),
            remote,
            method: method.clone(),
            uri: uri.clone(),
            version,
        }))
    }
}

/// Answers with the id in `x-request-id` and writes the access log line (when it is on).
pub fn finish(seen: Seen, id: &str, response: &mut Response) {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert(X_REQUEST_ID, v);
    }
    let Some(line) = seen.0 else {
        return;
    };
    // A request line in origin form (all but proxies send that) is its path and query as sent.
    let full;
    let uri = match line.uri.path_and_query() {
        Some(p) if line.uri.scheme().is_none() => p.as_str(),
        _ => {
            full = line.uri.to_string();
            &full
        }
    };
    super::access(&AccessRecord {
        remote: Some(line.remote),
        method: line.method.as_str(),
        uri,
        protocol: protocol(line.version),
        status: response.status().as_u16(),
        duration: line.start.elapsed(),
        request_id: id,
        model: response.extensions().get::<ModelInfo>(),
    });
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}
