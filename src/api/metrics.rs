//! Metrics API (default 127.0.0.1:8082): `GET /metrics` in Prometheus text format 0.0.4, and the
//! live dashboard (`GET /` leads to `/dashboard`; TorchServe's metrics listener has no page).

use std::io::Write;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, options};
use axum::Router;
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorKind};
use super::{openapi, parse_query, AppState};
use crate::config::MetricsMode;
use crate::dashboard::Dashboard;

const OPENAPI: &str = include_str!("openapi/metrics.json");
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The listener's routes; with a dashboard history, the dashboard's too (`GET /` then leads there).
pub fn router(state: AppState, dashboard: Option<Arc<Dashboard>>) -> Router {
    let mut routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/api-description", get(|| async { openapi(OPENAPI) }))
        .fallback(super::not_found);
    routes = match dashboard {
        Some(d) => routes.merge(crate::dashboard::routes(d)).route(
            "/",
            options(|| async { openapi(OPENAPI) }).get(|| async { Redirect::to("/dashboard") }),
        ),
        None => routes.route("/", options(|| async { openapi(OPENAPI) })),
    };
    // The metrics listener has its own optional token (metrics_auth_token), not TorchServe's keys.
    super::finish(routes, state)
}

/// Whether the request carries the configured bearer token (compared in constant time).
fn authorized(expected: &str, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// The metrics listener's token rule (metrics_auth_token), shared by /metrics and the dashboard's
/// data: without the configured bearer token, the 401 to answer (TorchServe's JSON shape, naming
/// `what`); `None` when the request may proceed.
pub(crate) fn token_refusal(state: &AppState, headers: &HeaderMap, what: &str) -> Option<Response> {
    match &state.config.metrics_auth_token {
        Some(token) if !authorized(token, headers) => {
            let mut r = ApiError::new(
                ErrorKind::Unauthorized,
                format!("a valid bearer token is required for {what}"),
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(r)
        }
        _ => None,
    }
}

async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    if let Some(r) = token_refusal(&state, &headers, "/metrics") {
        return Ok(r);
    }
    let names: Vec<String> = parse_query(q.as_deref())?
        .into_iter()
        .filter(|(k, _)| k == "name[]")
        .map(|(_, v)| v)
        .collect();
    let body = if state.metrics.mode == MetricsMode::Log {
        format!(
            "# metrics_mode=log: metrics are written to ts_metrics.log and model_metrics.log in {}, not served here; set metrics_mode=prometheus to scrape them\n",
            state.config.metrics_log_dir.display()
        )
    } else if q.is_some() && !names.is_empty() {
        state.metrics.render(Some(&names))
    } else {
        state.metrics.render(None)
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|e| e.trim().split(';').next() == Some("gzip"))
        });
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::fast(),
        );
        let _ = enc.write_all(body.as_bytes());
        if let Ok(compressed) = enc.finish() {
            return Ok((
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, CONTENT_TYPE),
                    (header::CONTENT_ENCODING, "gzip"),
                ],
                compressed,
            )
                .into_response());
        }
    }
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response())
}
