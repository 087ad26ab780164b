//! The layer every listener shares for request ids and the access log.
//!
//! Like TorchServe, every response of every listener carries `x-request-id` and gets one
//! access_log.log line. Unlike TorchServe (which always makes a new UUID), a client's own
//! `x-request-id` is kept, so one id follows a request from the caller's logs through oxserve's
//! to the handler's (`context.request_ids`); one that is malformed or too long is refused with a
//! 400 rather than silently replaced, so the caller learns why its id does not show up.

use std::net::SocketAddr;
use std::time::Instant;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue, Request, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AccessRecord, ModelInfo};
use crate::api::error::ApiError;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, in the request's extensions for the handlers that pass it on.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives the request its id, answers with it in `x-request-id`, and writes the access log line.
pub async fn layer(mut req: Request<Body>, next: Next) -> Response {
    let start = Instant::now();
    // None: no header; Some(Err(why)): one that is not an id oxserve can carry.
    let sent: Option<Result<String, String>> = req.headers().get(&X_REQUEST_ID).map(|v| {
        let s = v.to_str().map_err(|_| super::REQUEST_ID_RULE.to_string())?;
        super::check_request_id(s)?;
        Ok(s.to_string())
    });
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let method = req.method().clone();
    let uri = req.uri().clone();
    let version = req.version();
    let (id, mut response) = match sent {
        Some(Err(why)) => (
            super::new_request_id(),
            ApiError::bad_request(why).into_response(),
        ),
        Some(Ok(id)) => {
            req.extensions_mut().insert(RequestId(id.clone()));
            (id, next.run(req).await)
        }
        None => {
            let id = super::new_request_id();
            req.extensions_mut().insert(RequestId(id.clone()));
            (id, next.run(req).await)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(X_REQUEST_ID, v);
    }
    if !super::access_enabled() {
        return response;
    }
    super::access(&AccessRecord {
        remote,
        method: method.as_str(),
        uri: &uri.to_string(),
        protocol: protocol(version),
        status: response.status().as_u16(),
        duration: start.elapsed(),
        request_id: &id,
        model: response.extensions().get::<ModelInfo>(),
    });
    response
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
