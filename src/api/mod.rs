//! The three HTTP listeners (inference, management, metrics), TorchServe-compatible.

pub mod auth;
pub mod error;
pub mod http;
pub mod inference;
pub mod management;
pub mod metrics;
pub mod tls;
pub mod workflows;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::registry::Registry;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
    /// TorchServe's API keys, when token authorization is on.
    pub tokens: Option<Arc<auth::Tokens>>,
    /// Registered workflows (TorchServe's /workflows, /wfpredict).
    pub workflows: Arc<crate::workflow::Workflows>,
}

/// Path parameters whose rejection (say, invalid UTF-8 in a model name) is a 400 in TorchServe's
/// JSON error shape rather than axum's plain-text body.
pub struct ApiPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = error::ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(ApiPath(t)),
            Err(e) => Err(error::ApiError::bad_request(e.body_text())),
        }
    }
}

/// TorchServe's answer for a path no route serves.
pub async fn not_found() -> error::ApiError {
    error::ApiError::not_found("Requested resource is not found, please refer to API document.")
}

/// Adds TorchServe's token check when token authorization is on (no layer at all otherwise, so
/// the request path pays nothing for it).
pub fn with_token_check<F, Fut>(
    router: axum::Router<AppState>,
    state: &AppState,
    check: F,
) -> axum::Router<AppState>
where
    F: Fn(State<AppState>, Request<axum::body::Body>, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    if state.tokens.is_some() {
        router.layer(axum::middleware::from_fn_with_state(state.clone(), check))
    } else {
        router
    }
}

/// A listener's router with its state. What every listener's requests share (request ids, the
/// access log, counting responses in Requests2XX / 4XX / 5XX as TorchServe counts all listeners,
/// /metrics included) is done around the router by the connection layer, `http::handle`.
pub fn finish(router: axum::Router<AppState>, state: AppState) -> axum::Router {
    router.with_state(state)
}

/// Answers `OPTIONS /` and `GET /api-description` with a listener's OpenAPI document.
pub fn openapi(doc: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

/// Most parameters one request may carry: query pairs, form fields and multipart parts together.
/// Each costs a few small allocations, so a body of nothing but `a&a&a...` would otherwise turn
/// max_request_size bytes into dozens of times that in memory.
pub const MAX_PARAMS: usize = 1024;

/// Parses a raw query string strictly: bad percent-encoding or non-UTF-8 is an error with the reason,
/// not a silently mangled value. More than [`MAX_PARAMS`] pairs are refused.
pub fn parse_query(raw: Option<&str>) -> Result<Vec<(String, String)>, error::ApiError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        if out.len() == MAX_PARAMS {
            return Err(too_many_params());
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

/// The 400 for a request with more than [`MAX_PARAMS`] parameters.
pub fn too_many_params() -> error::ApiError {
    error::ApiError::bad_request(format!(
        "too many parameters: at most {MAX_PARAMS} query pairs, form fields and multipart parts together"
    ))
}

/// Decodes one query component (`+` is a space), refusing a `%` without two hex digits after it.
fn percent_decode(s: &str) -> Result<String, error::ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    // from_str_radix alone would take "+1" as a number.
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                let Some(b) = hex else {
                    return Err(error::ApiError::bad_request(format!(
                        "malformed query string: '%' in {s:?} is not followed by two hex digits"
                    )));
                };
                out.push(b);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| {
        error::ApiError::bad_request(format!(
            "malformed query string: {s:?} is not UTF-8 once decoded"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_is_strict() {
        let q = parse_query(Some("name[]=A&name%5B%5D=B+c&x")).unwrap();
        assert_eq!(
            q,
            [
                ("name[]".into(), "A".into()),
                ("name[]".into(), "B c".into()),
                ("x".into(), "".into())
            ]
        );
        assert!(parse_query(Some("name[]=%zz")).is_err());
        assert!(parse_query(Some("a=%4")).is_err());
        assert!(parse_query(Some("a=%ff")).is_err());
        assert!(parse_query(Some("a=%+1")).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any query string (as a URI can carry it) decodes or is refused; a decoded value is
            /// never longer than its encoded form, and known-good pairs decode to themselves.
            #[test]
            fn query_strings_never_panic(raw in "[ -~]{0,120}") {
                if let Ok(pairs) = parse_query(Some(&raw)) {
                    let decoded: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
                    prop_assert!(decoded <= raw.len());
                }
            }

            #[test]
            fn encoded_names_round_trip(names in proptest::collection::vec("\\PC{0,12}", 0..5)) {
                let raw: String = names
                    .iter()
                    .map(|n| format!("name[]={}", form_urlencoded::byte_serialize(n.as_bytes()).collect::<String>()))
                    .collect::<Vec<_>>()
                    .join("&");
                let pairs = parse_query(Some(&raw)).unwrap();
                let got: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
                prop_assert_eq!(got, names.iter().map(String::as_str).collect::<Vec<_>>());
            }
        }
    }
}
