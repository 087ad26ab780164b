//! The live dashboard on the metrics listener, and the data `oxserve top` prints.
//!
//! `GET /dashboard` is a page whose assets (uPlot, the page's script and style) are compiled into
//! the binary, so it works offline; it polls `GET /dashboard/api/history` once a second and draws
//! what [`history::PANELS`] lists. `GET /dashboard/api/latest` has the newest point of every
//! column, for `oxserve top`. The data endpoints follow /metrics' token rule (metrics_auth_token);
//! the page and its assets hold no data and are public, so a browser can load them and then send the
//! token (typed in, or given in the URL fragment, which browsers never send to the server).
//!
//! TorchServe has no dashboard: its documentation asks for Grafana. This page is for the person who
//! just started the server and has no monitoring stack.

pub mod history;
pub mod top;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::error::{ApiError, ErrorKind};
use crate::api::{metrics::token_refusal, parse_query, AppState};
use crate::metrics::Metrics;
use history::{History, HistoryError};

/// How often the registry is sampled (and the page refreshes).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The history, shared by the sampler and the handlers.
#[derive(Default)]
pub struct Dashboard {
    history: Mutex<History>,
}

impl Dashboard {
    pub fn new() -> Dashboard {
        Dashboard::default()
    }

    /// Takes one sample now.
    pub fn sample(&self, metrics: &Metrics) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.history.lock().unwrap().sample(metrics, now);
    }

    /// Starts the sampler: one sample every [`SAMPLE_EVERY`], for the life of the server.
    pub fn spawn_sampler(self: &Arc<Self>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            // A late tick (a loaded machine) is not made up for with a burst of samples: the
            // window's rates use the real time between samples anyway.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.sample(&metrics);
            }
        })
    }
}

/// The page's files: path under /dashboard/, content type, bytes. Defined once; the routes and the
/// page's references come from here.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/dashboard/vendor/uplot/uPlot.min.css"),
    ),
    (
        "uPlot.LICENSE.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../../assets/dashboard/vendor/uplot/LICENSE"),
    ),
];

const INDEX: &str = include_str!("../../assets/dashboard/index.html");

/// The dashboard's routes, for the metrics listener's router.
pub fn routes(dashboard: Arc<Dashboard>) -> Router<AppState> {
    let mut r = Router::new().route(
        "/dashboard",
        get(|| async {
            (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                INDEX,
            )
        }),
    );
    for (name, content_type, bytes) in ASSETS {
        r = r.route(
            &format!("/dashboard/{name}"),
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, *content_type),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    *bytes,
                )
            }),
        );
    }
    let d = dashboard.clone();
    r = r.route(
        "/dashboard/api/history",
        get(
            move |State(state): State<AppState>, headers: HeaderMap, RawQuery(q): RawQuery| {
                let d = d.clone();
                async move { history(&d, &state, &headers, q.as_deref()) }
            },
        ),
    );
    let d = dashboard;
    r.route(
        "/dashboard/api/latest",
        get(move |State(state): State<AppState>, headers: HeaderMap| {
            let d = d.clone();
            async move {
                if let Some(r) = token_refusal(&state, &headers, "the dashboard's data") {
                    return r;
                }
                let latest = d.history.lock().unwrap().latest();
                json(&latest)
            }
        }),
    )
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// `GET /dashboard/api/history?model=NAME&range=300|900|3600`.
fn history(d: &Dashboard, state: &AppState, headers: &HeaderMap, q: Option<&str>) -> Response {
    if let Some(r) = token_refusal(state, headers, "the dashboard's data") {
        return r;
    }
    let params = match parse_query(q) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut model = None;
    let mut range = 300u32;
    for (k, v) in &params {
        match k.as_str() {
            "model" if !v.is_empty() => model = Some(v.as_str()),
            "model" => {}
            "range" => match v.parse::<u32>() {
                Ok(r) => range = r,
                Err(_) => {
                    return ApiError::bad_request(HistoryError::BadRange(v.clone()).to_string())
                        .into_response()
                }
            },
            other => {
                return ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (expected model, range)"
                ))
                .into_response()
            }
        }
    }
    let view = d.history.lock().unwrap().history(model, range);
    match view {
        Ok(v) => json(&v),
        Err(e @ HistoryError::UnknownModel(_)) => {
            ApiError::new(ErrorKind::ModelNotFound, e.to_string()).into_response()
        }
        Err(e) => ApiError::bad_request(e.to_string()).into_response(),
    }
}
