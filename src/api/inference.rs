//! Inference API (default 127.0.0.1:8080): /ping, /predictions, /explanations, KServe's
//! v1 (`/v1/models/{m}:predict|:explain`) and v2 (`/v2/models/{m}/infer|explain`) routes, and
//! OpenAI's `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (beyond TorchServe).
//!
//! As in TorchServe, the KServe routes are plain predictions with an `explain` header; the
//! request and reply shapes are the Python worker's `service_envelope`. Unlike TorchServe 0.12,
//! oxserve also answers KServe's model-ready and metadata routes itself (TorchServe leaves them
//! to the kserve wrapper in front of it), so it can be a KServe serving runtime on its own.
//! `GET /v1/models` without a name is not KServe's: it is the OpenAI model list.
//!
//! The OpenAI routes are a front door, not an engine: the body's `model` names a registered model
//! and the request reaches its handler exactly as TorchServe passes
//! `/predictions/{model}/{version}/v1/completions` (the extra path in the `url_path` header), so one
//! handler serves both URLs and SSE streams pass through as chunks.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, options};
use axum::{Json, Router};
use http_body_util::BodyExt;

use super::error::{ApiError, ErrorKind};
use super::{openapi, parse_query, ApiPath, AppState};
use crate::backend::{InferRequest, InferResponse, Param};
use crate::logging::access::RequestId;
use crate::logging::ModelInfo;
use crate::metrics::{ModelMetrics, Timings, Usage};
use crate::model::registry::{Health, ModelVersion};
use crate::worker::{Job, PoolError, Reply, ReplyPart, ReplyRx, SubmitError};

const OPENAPI: &str = include_str!("openapi/inference.json");

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/ping", get(ping))
        .route("/", options(|| async { openapi(OPENAPI) }))
        .route("/api-description", get(|| async { openapi(OPENAPI) }))
        .route("/predictions/{model}", any(predict))
        .route("/predictions/{model}/{version}", any(predict))
        .route("/predictions/{model}/{version}/{*rest}", any(predict))
        .route("/wfpredict/{name}", any(super::workflows::predict))
        .route("/explanations/{model}", any(explain))
        .route("/explanations/{model}/{version}", any(explain))
        .route("/v1/models/{target}", any(kserve_v1))
        .route("/v2", get(kserve_v2_server))
        .route("/v2/health/live", get(kserve_v2_live))
        .route("/v2/health/ready", get(kserve_v2_live))
        .route("/v2/models/{model}", get(kserve_v2_metadata))
        .route("/v2/models/{model}/ready", get(kserve_v2_ready))
        .route("/v2/models/{model}/infer", any(kserve_v2_infer))
        .route("/v2/models/{model}/explain", any(kserve_v2_explain))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(kserve_v2_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(kserve_v2_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            any(kserve_v2_infer),
        )
        .route(
            "/v2/models/{model}/versions/{version}/explain",
            any(kserve_v2_explain),
        )
        // Exactly these three: the KServe routes (`/v1/models/{name}...`) live beside them.
        .route("/v1/models", any(openai_models))
        .route("/v1/completions", any(openai_completions))
        .route("/v1/chat/completions", any(openai_chat))
        .fallback(super::not_found);
    let routes = super::with_token_check(routes, &state, super::auth::inference);
    super::finish(routes, state)
}

/// TorchServe's words; 200 only when Healthy, so load balancers take a server out of rotation
/// while any model has fewer workers than its minimum (TorchServe's isModelHealthy rule).
async fn ping(State(state): State<AppState>) -> Response {
    let health = state.registry.health();
    let code = match health {
        Health::Healthy => StatusCode::OK,
        Health::PartialHealthy | Health::Unhealthy => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(serde_json::json!({"status": health.as_str()}))).into_response()
}

/// What a prediction URL names: `{model}[/{version}[/{*rest}]]`.
struct Target {
    model: String,
    version: Option<String>,
    url_path: Option<String>,
    explain: bool,
}

/// The path parameters of the prediction and explanation routes, by name (a struct rather than
/// a map: no table and no hashing per request).
#[derive(serde::Deserialize)]
struct PredictPath {
    model: String,
    version: Option<String>,
    rest: Option<String>,
}

impl Target {
    fn from_path(p: PredictPath, explain: bool) -> Target {
        Target {
            model: p.model,
            version: p.version,
            url_path: p.rest,
            explain,
        }
    }
}

async fn predict(
    State(s): State<AppState>,
    ApiPath(p): ApiPath<PredictPath>,
    req: Request,
) -> Response {
    serve(s, Target::from_path(p, false), req).await
}

async fn explain(
    State(s): State<AppState>,
    ApiPath(p): ApiPath<PredictPath>,
    req: Request,
) -> Response {
    serve(s, Target::from_path(p, true), req).await
}

/// KServe v1: `POST {m}:predict`, `POST {m}:explain`, `GET {m}` (readiness).
async fn kserve_v1(
    State(s): State<AppState>,
    ApiPath(mut p): ApiPath<HashMap<String, String>>,
    req: Request,
) -> Response {
    let target = p.remove("target").unwrap_or_default();
    let (model, action) = match target.rsplit_once(':') {
        Some((m, a)) => (m.to_string(), Some(a)),
        None => (target.clone(), None),
    };
    match (action, req.method()) {
        (None, &Method::GET) => {
            let ready = s
                .registry
                .get(&model, None)
                .map(|m| m.pool.live_workers() > 0);
            match ready {
                Ok(ready) => {
                    Json(serde_json::json!({"name": model, "ready": ready})).into_response()
                }
                Err(e) => ApiError::from(e).into_response(),
            }
        }
        (Some(a @ ("predict" | "explain")), _) => {
            let target = Target {
                model,
                version: None,
                url_path: None,
                explain: a == "explain",
            };
            serve(s, target, req).await
        }
        (None, _) => ApiError::method_not_allowed().into_response(),
        (Some(other), _) => ApiError::new(
            ErrorKind::ResourceNotFound,
            format!("KServe v1 has :predict and :explain, not :{other}"),
        )
        .into_response(),
    }
}

async fn kserve_v2_infer(
    State(s): State<AppState>,
    ApiPath(p): ApiPath<PredictPath>,
    req: Request,
) -> Response {
    serve(s, Target::from_path(p, false), req).await
}

async fn kserve_v2_explain(
    State(s): State<AppState>,
    ApiPath(p): ApiPath<PredictPath>,
    req: Request,
) -> Response {
    serve(s, Target::from_path(p, true), req).await
}

/// KServe v2 server metadata.
async fn kserve_v2_server() -> Response {
    Json(serde_json::json!({
        "name": "oxserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
    .into_response()
}

/// KServe v2 liveness and readiness of the server: TorchServe's /ping rule (every model has its
/// minimum workers) decides readiness; liveness is answering at all.
async fn kserve_v2_live(State(s): State<AppState>, req: Request) -> Response {
    let live = req.uri().path().ends_with("/live");
    let ready = live || s.registry.healthy();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let key = if live { "live" } else { "ready" };
    (code, Json(serde_json::json!({ key: ready }))).into_response()
}

fn kserve_v2_model(
    s: &AppState,
    p: &HashMap<String, String>,
) -> Result<std::sync::Arc<crate::model::registry::ModelVersion>, ApiError> {
    let model = p.get("model").map(String::as_str).unwrap_or_default();
    let version = p
        .get("version")
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    s.registry.get(model, version).map_err(ApiError::from)
}

/// KServe v2 model readiness: 200 with a worker up, else 503 (KServe's rule for the route).
async fn kserve_v2_ready(
    State(s): State<AppState>,
    ApiPath(p): ApiPath<HashMap<String, String>>,
) -> Response {
    match kserve_v2_model(&s, &p) {
        Ok(m) => {
            let ready = m.pool.live_workers() > 0;
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (
                code,
                Json(serde_json::json!({"name": m.name, "ready": ready})),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// KServe v2 model metadata. Tensor names and shapes are the handler's business and unknown
/// to the server, so `inputs` and `outputs` are empty lists (allowed by the protocol).
async fn kserve_v2_metadata(
    State(s): State<AppState>,
    ApiPath(p): ApiPath<HashMap<String, String>>,
) -> Response {
    match kserve_v2_model(&s, &p) {
        Ok(m) => Json(serde_json::json!({
            "name": m.name,
            "versions": [m.version],
            "platform": "oxserve",
            "inputs": [],
            "outputs": [],
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn serve(state: AppState, target: Target, req: Request) -> Response {
    let arrival = Instant::now();
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::GET) {
        return ApiError::method_not_allowed().into_response();
    }
    let version = target.version.as_deref().filter(|v| !v.is_empty());
    if let Err(e) = state.registry.get(&target.model, version) {
        return ApiError::from(e).into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(&state, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    dispatch(state, target, parts, body, arrival).await
}

/// A `/wfpredict` request in the shape a prediction gets (body within max_request_size).
pub(super) async fn workflow_request(
    state: &AppState,
    req: Request,
) -> Result<InferRequest, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(state, &parts.headers, body).await?;
    let id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(crate::logging::new_request_id);
    let target = Target {
        model: String::new(),
        version: None,
        url_path: None,
        explain: false,
    };
    build_request(id, &parts.headers, parts.uri.query(), body, &target).await
}

/// The request body, at most max_request_size bytes.
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_request_size;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large(limit));
        }
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(e) if super::http::is_body_timeout(e.as_ref()) => {
            Err(ApiError::new(ErrorKind::RequestTimeout, e.to_string()))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// Hands a read request to its model version's pool and answers with the reply.
async fn dispatch(
    state: AppState,
    target: Target,
    parts: axum::http::request::Parts,
    body: Bytes,
    arrival: Instant,
) -> Response {
    let version = target.version.as_deref().filter(|v| !v.is_empty());
    // Looked up again after the body is read: the version may have been unregistered meanwhile.
    let model = match state.registry.get(&target.model, version) {
        Ok(m) => m,
        Err(e) => return ApiError::from(e).into_response(),
    };
    // Replies of OpenAI requests (either URL) are read for their `usage`; other replies are not
    // parsed at all, so an image model pays nothing for token metrics.
    let openai = target
        .url_path
        .as_deref()
        .is_some_and(|p| OPENAI_PATHS.contains(&p.trim_start_matches('/')));
    // The id the connection layer gave the request (the client's x-request-id or a new UUID) is the
    // one the worker protocol carries, so the handler's context.request_ids shows it.
    let id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(crate::logging::new_request_id);
    let request = match build_request(id, &parts.headers, parts.uri.query(), body, &target).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let in_url = version.is_some();
    match enqueue(&model, request, arrival, in_url) {
        Ok(rx) => respond(rx, model.metrics.clone(), in_url, openai, arrival).await,
        Err(e) => {
            let mut r = e.into_response();
            tag(&mut r, &model.metrics, &Timings::new(arrival));
            r
        }
    }
}

/// Queues a request on a model version's pool: the one path HTTP and gRPC inference share, so
/// both count in the same metrics. A refusal (queue full, model going away) is counted here.
pub fn enqueue(
    model: &ModelVersion,
    request: InferRequest,
    arrival: Instant,
    in_url: bool,
) -> Result<ReplyRx, ApiError> {
    let (job, rx) = Job::new(request, Timings::new(arrival));
    match model.pool.submit(job) {
        Ok(()) => Ok(rx),
        Err(why) => {
            let e = ApiError::from(match why {
                SubmitError::QueueFull => PoolError::QueueFull(model.name.clone()),
                SubmitError::Closed => {
                    PoolError::Closed(format!("Model \"{}\" is being unregistered", model.name))
                }
            });
            let mut t = Timings::new(arrival);
            t.responded = Some(Instant::now());
            model.metrics.record_request(&t, e.status, in_url);
            Err(e)
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    // TorchServe answers 507 (Insufficient Storage) for a body over max_request_size.
    ApiError::with_status(
        507,
        ErrorKind::RequestEntityTooLarge,
        format!("request body is larger than max_request_size ({limit} bytes)"),
    )
}

/// TorchServe's request shape: headers as received, query pairs and form fields as parameters,
/// otherwise the body as parameter `body`.
async fn build_request(
    id: String,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Bytes,
    target: &Target,
) -> Result<InferRequest, ApiError> {
    let mut req = InferRequest {
        id,
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        params: Vec::new(),
    };
    if let Some(path) = &target.url_path {
        req.headers.push(("url_path".into(), path.clone()));
    }
    if target.explain {
        req.headers.push(("explain".into(), "True".into()));
    }
    for (k, v) in parse_query(query)? {
        req.params.push(Param {
            name: k,
            content_type: "text/plain".into(),
            value: Bytes::from(v),
        });
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // The media type without parameters, as sent (the worker gets it so) and lowercased (to match).
    let media = content_type.split(';').next().unwrap_or("").trim();
    let mime = media.to_ascii_lowercase();
    if mime == "application/x-www-form-urlencoded" {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::bad_request("form body is not UTF-8"))?;
        let fields = parse_query(Some(text))?;
        if req.params.len() + fields.len() > super::MAX_PARAMS {
            return Err(super::too_many_params());
        }
        for (k, v) in fields {
            req.params.push(Param {
                name: k,
                content_type: "text/plain".into(),
                value: Bytes::from(v),
            });
        }
    } else if mime == "multipart/form-data" {
        // Boxed: the multipart parser's state is over 1 KB, and every prediction's future would
        // carry (and be copied with) it, though few requests are multipart.
        Box::pin(multipart_params(&content_type, body, &mut req.params)).await?;
    } else if !body.is_empty() || req.params.is_empty() {
        // The body's parameter carries the media type alone, as TorchServe's frontend sends it
        // (Netty's getMimeType): its worker decodes JSON only when the type is exactly
        // `application/json`, so `application/json; charset=utf-8` (or a bare trailing `;`)
        // must not reach it. The full header still travels with the request headers.
        req.params.push(Param {
            name: "body".into(),
            content_type: media.to_string(),
            value: body,
        });
    }
    Ok(req)
}

/// The fields of a multipart/form-data body, appended to `params` (at most MAX_PARAMS in all).
async fn multipart_params(
    content_type: &str,
    body: Bytes,
    params: &mut Vec<Param>,
) -> Result<(), ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("invalid multipart body: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                if params.len() >= super::MAX_PARAMS {
                    return Err(super::too_many_params());
                }
                let name = field.name().unwrap_or("body").to_string();
                let ct = field
                    .content_type()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                let value = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::bad_request(format!("invalid multipart body: {e}")))?;
                params.push(Param {
                    name,
                    content_type: ct,
                    value,
                });
            }
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "invalid multipart body: {e}"
                )))
            }
        }
    }
    Ok(())
}

/// Turns one reply part into response head + body.
fn to_response(part: &InferResponse, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() =
        StatusCode::from_u16(part.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    if !part.content_type.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&part.content_type) {
            h.insert(header::CONTENT_TYPE, v);
        }
    }
    for (k, v) in &part.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v)) {
            h.insert(k, v);
        }
    }
    r
}

/// Waits for the reply; streams it as HTTP chunks when the backend sends parts. Token metrics are
/// recorded here, where the chunks pass: chunk count and gaps for every stream, and for OpenAI
/// requests (`openai`) the tokens of the reply's `usage`.
async fn respond(
    rx: ReplyRx,
    metrics: std::sync::Arc<ModelMetrics>,
    in_url: bool,
    openai: bool,
    arrival: Instant,
) -> Response {
    let reply = {
        let mut waiting = Waiting {
            metrics: &metrics,
            arrival,
            in_url,
            armed: true,
        };
        let reply = rx.await;
        waiting.armed = false;
        reply
    };
    let (first, rest) = match reply {
        Ok(Reply::Whole(part)) => {
            let mut t = part.timings;
            t.responded = Some(Instant::now());
            metrics.record_request(&t, part.response.status, in_url);
            if openai && (200..300).contains(&part.response.status) {
                if let Some(u) = Usage::from_json(&part.response.body) {
                    metrics.record_usage(u);
                }
            }
            let body = Body::from(part.response.body.clone());
            let mut r = to_response(&part.response, body);
            tag(&mut r, &metrics, &t);
            return r;
        }
        Ok(Reply::Stream(first, rest)) => (first, rest),
        Err(_) => {
            return ApiError::internal("the worker dropped the request without an answer")
                .into_response()
        }
    };
    // Streaming: the first part's head is the response head; every part is a chunk.
    let head = first.response.clone();
    let info = crate::logging::access_wants_model().then(|| model_info(&metrics, &first.timings));
    let mut timings = first.timings;
    timings.first_chunk = Some(Instant::now());
    let stream = Streamed {
        metrics,
        timings,
        last_chunk: None,
        usage: None,
        openai,
        in_url,
        status: head.status,
        ended: false,
    };
    let state = Some((Some(first), rest, stream));
    let stream = futures_util::stream::unfold(state, move |state| async move {
        let (pending, mut rx, mut st) = state?;
        let part: ReplyPart = match pending {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => {
                    st.finish(500);
                    return None;
                }
            },
        };
        st.chunk(&part.response.body);
        if part.last {
            st.finish(part.response.status);
            Some((Ok::<Bytes, std::io::Error>(part.response.body), None))
        } else {
            let body = part.response.body;
            Some((Ok(body), Some((None, rx, st))))
        }
    });
    let mut r = to_response(&head, Body::from_stream(stream));
    if let Some(info) = info {
        r.extensions_mut().insert(info);
    }
    r
}

/// What a stream in flight remembers for its metrics.
struct Streamed {
    metrics: std::sync::Arc<ModelMetrics>,
    timings: Timings,
    last_chunk: Option<Instant>,
    /// The last `usage` seen: engines send it once at the end (`stream_options.include_usage`) or
    /// cumulatively on every event, and either way the last one is the request's total.
    usage: Option<Usage>,
    openai: bool,
    in_url: bool,
    /// The status the response head went out with.
    status: u16,
    /// Its last part passed (or the worker went away): recorded.
    ended: bool,
}

/// A request waiting for its reply. hyper drops the request's future when its client closes the
/// connection: the request is then recorded here, as cancelled with nginx's 499 (nothing was
/// sent), and the worker pool sees the reply's receiver gone (an async worker on oxserve's
/// runtime then stops the handler).
struct Waiting<'a> {
    metrics: &'a ModelMetrics,
    arrival: Instant,
    in_url: bool,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut t = Timings::new(self.arrival);
            t.responded = Some(Instant::now());
            self.metrics.record_cancelled(&t, 499, self.in_url);
        }
    }
}

/// A stream dropped before its last part (the client went away) is recorded as cancelled, with
/// the status its head was sent with.
impl Drop for Streamed {
    fn drop(&mut self) {
        if !self.ended {
            self.end(self.status, true);
        }
    }
}

impl Streamed {
    /// One part on its way to the client. Empty parts (a final frame with no body) are no chunk.
    fn chunk(&mut self, body: &[u8]) {
        if body.is_empty() {
            return;
        }
        let now = Instant::now();
        let gap = self.last_chunk.map(|t| now.saturating_duration_since(t));
        self.last_chunk = Some(now);
        self.metrics.record_chunk(gap);
        if self.openai {
            if let Some(u) = Usage::from_chunk(body) {
                self.usage = Some(u);
            }
        }
    }

    /// The stream ended (last part, or the worker went away: `status` 500).
    fn finish(&mut self, status: u16) {
        self.end(status, false);
    }

    /// Records the request once: finished, or `cancelled` by its client.
    fn end(&mut self, status: u16, cancelled: bool) {
        self.ended = true;
        let mut t = self.timings;
        t.responded = Some(Instant::now());
        if cancelled {
            self.metrics.record_cancelled(&t, status, self.in_url);
        } else {
            self.metrics.record_request(&t, status, self.in_url);
        }
        if let Some(u) = self.usage.take() {
            self.metrics.record_usage(u);
        }
    }
}

/// Hands the access log the model's fields, when its lines carry them (JSON lines only: the
/// record costs two string copies per request).
fn tag(r: &mut Response, metrics: &ModelMetrics, t: &Timings) {
    if crate::logging::access_wants_model() {
        r.extensions_mut().insert(model_info(metrics, t));
    }
}

/// The model, version and timings the access log reports for a request.
fn model_info(metrics: &ModelMetrics, t: &Timings) -> ModelInfo {
    ModelInfo {
        model: metrics.model_name.clone(),
        version: metrics.model_version.clone(),
        queue: t.queue_wait(),
        backend: t
            .backend_end
            .zip(t.backend_start)
            .map(|(end, start)| end.saturating_duration_since(start)),
    }
}

/// The `url_path` values the OpenAI routes pass, which mark a request as an OpenAI one.
const OPENAI_PATHS: &[&str] = &["v1/completions", "v1/chat/completions"];

/// Most bytes of a `model` field: model names are short, and the value is echoed in errors.
const MAX_MODEL_FIELD: usize = 512;

/// `GET /v1/models`: every registered model (its default version), in OpenAI's list shape.
async fn openai_models(State(state): State<AppState>, method: Method) -> Response {
    if method != Method::GET {
        return ApiError::method_not_allowed().into_response();
    }
    let data: Vec<serde_json::Value> = state
        .registry
        .list()
        .into_iter()
        .filter_map(|(name, _)| state.registry.get(&name, None).ok())
        .map(|m| {
            let created = m
                .registered_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            serde_json::json!({
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "oxserve",
                "version": m.version,
            })
        })
        .collect();
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn openai_completions(State(s): State<AppState>, req: Request) -> Response {
    openai(s, OPENAI_PATHS[0], req).await
}

async fn openai_chat(State(s): State<AppState>, req: Request) -> Response {
    openai(s, OPENAI_PATHS[1], req).await
}

/// An OpenAI request: routed by the body's `model` to that model's default version, and handed
/// over as `/predictions/{model}/{version}/{path}` would be (body unchanged, `url_path` header).
async fn openai(state: AppState, path: &str, req: Request) -> Response {
    let arrival = Instant::now();
    if req.method() != Method::POST {
        return ApiError::method_not_allowed().into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(&state, &parts.headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let model = match model_field(&body) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let target = Target {
        model,
        version: None,
        url_path: Some(path.to_string()),
        explain: false,
    };
    dispatch(state, target, parts, body, arrival).await
}

/// The `model` of an OpenAI request body, or a 400 saying what is wrong with the body.
fn model_field(body: &[u8]) -> Result<String, ApiError> {
    #[derive(serde::Deserialize)]
    struct Head {
        model: Option<serde_json::Value>,
    }
    let head: Head = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the request body is not a JSON object: {e}"))
    })?;
    match head.model {
        Some(serde_json::Value::String(m)) if !m.is_empty() && m.len() <= MAX_MODEL_FIELD => Ok(m),
        Some(serde_json::Value::String(m)) if m.len() > MAX_MODEL_FIELD => Err(
            ApiError::bad_request(format!("\"model\" is longer than {MAX_MODEL_FIELD} bytes")),
        ),
        Some(_) => Err(ApiError::bad_request(
            "\"model\" must be a non-empty string naming a registered model",
        )),
        None => Err(ApiError::bad_request(
            "the request body has no \"model\": it names the registered model to use",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_field_is_required_and_bounded() {
        assert_eq!(model_field(br#"{"model":"m","prompt":"x"}"#).unwrap(), "m");
        for bad in [
            &br#"{"prompt":"x"}"#[..],
            br#"{"model":""}"#,
            br#"{"model":3}"#,
            br#"[1]"#,
            b"",
            b"{",
        ] {
            let e = model_field(bad).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(bad));
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_FIELD + 1));
        assert!(model_field(long.as_bytes())
            .unwrap_err()
            .message
            .contains("longer"));
    }
}
