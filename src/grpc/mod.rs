//! TorchServe's gRPC APIs: `InferenceAPIsService` (default 127.0.0.1:7070) and
//! `ManagementAPIsService` (default 127.0.0.1:7071), from TorchServe's own inference.proto and
//! management.proto (vendored in proto/), served with tonic over HTTP/2: cleartext, or TLS with
//! `enable_grpc_ssl=true` and the HTTPS listeners' key and certificate (src/grpc/tls.rs).
//!
//! Every call goes through the same code as the HTTP listeners: the registry, the pool's queue
//! (`api::inference::enqueue`) and the shared management functions, so gRPC requests count in the
//! same model metrics, and each call counts once in Requests2XX/4XX/5XX with the HTTP status its
//! outcome maps to.
//!
//! Differences from TorchServe, on purpose (docs/compatibility.md, "gRPC"):
//! - an unknown model in `Predictions` is NOT_FOUND (TorchServe: INTERNAL), since every other
//!   error maps its HTTP status with TorchServe's own table (GRPCUtils.getGRPCStatusCode);
//! - `Ping` needs no token, as `/ping` over HTTP;
//! - `StreamPredictions2` answers each message of the stream in order, with TorchServe's sequence
//!   headers; on a `sequenceBatching` model the scheduler pins the sequence by them, as for HTTP;
//! - `RegisterModel` refuses `handler`/`runtime` overrides (oxserve takes them from the archive)
//!   instead of ignoring them;
//! - with `enable_grpc_ssl=true` and no key or certificate, start-up stops with a message
//!   (TorchServe falls back to a self-signed certificate it makes).

pub mod pb;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::api::auth::Scope;
use crate::api::error::{ApiError, ErrorKind};
use crate::api::{inference, management, AppState};
use crate::backend::{InferRequest, Param};
use crate::metrics::{ModelMetrics, Timings};
use crate::model::registry::RegisterOptions;
use crate::worker::{Reply, ReplyRx};
use pb::inference::inference_ap_is_service_server::{
    InferenceApIsService, InferenceApIsServiceServer,
};
use pb::inference::{PredictionResponse, PredictionsRequest, TorchServeHealthResponse};
use pb::management::management_ap_is_service_server::{
    ManagementApIsService, ManagementApIsServiceServer,
};
use pb::management::{
    DescribeModelRequest, ListModelsRequest, ManagementResponse, RegisterModelRequest,
    ScaleWorkerRequest, SetDefaultRequest, UnregisterModelRequest,
};

/// TorchServe's sequence headers (its ts_header_key_sequence_* defaults), set on
/// `StreamPredictions2` requests so that handlers see the same headers as under TorchServe.
const SEQUENCE_ID: &str = "ts_request_sequence_id";
const SEQUENCE_START: &str = "ts_request_sequence_start";
const SEQUENCE_END: &str = "ts_request_sequence_end";

/// Most streams one HTTP/2 connection may have open at once: each holds a queued request.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// How often an HTTP/2 ping checks an idle peer, and how long its answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Most bytes of HTTP/2 headers (gRPC metadata) one request may carry.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// TorchServe's map from an HTTP status to a gRPC code (GRPCUtils.getGRPCStatusCode).
pub fn code_for(http: u16) -> tonic::Code {
    use tonic::Code;
    match http {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        416 => Code::OutOfRange,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ if (400..500).contains(&http) => Code::FailedPrecondition,
        _ if (500..600).contains(&http) => Code::Internal,
        _ => Code::Unknown,
    }
}

/// The gRPC status of an API error: TorchServe's description is the message, then the
/// exception type on a line of its own (its `augmentDescription`).
fn status_of(e: &ApiError) -> Status {
    Status::new(code_for(e.status), format!("{}\n{}", e.message, e.kind))
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        status_of(&e)
    }
}

/// The HTTP status a gRPC outcome counts as in Requests2XX/4XX/5XX.
fn http_of(code: tonic::Code) -> u16 {
    use tonic::Code;
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::Aborted | Code::AlreadyExists => 409,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// Shared by both services: the state, and which key opens the service.
#[derive(Clone)]
struct Api {
    state: AppState,
    scope: Scope,
}

impl Api {
    /// TorchServe's gRPC token check: `authorization: Bearer <key>` metadata, PERMISSION_DENIED
    /// with its message when missing or wrong.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(tokens) = &self.state.tokens else {
            return Ok(());
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        tokens
            .check(self.scope, given)
            .map_err(|_| Status::permission_denied(crate::api::auth::TOKEN_FAILED))
    }

    /// Counts a finished call in Requests2XX/4XX/5XX, as the HTTP listeners count responses.
    fn count(&self, code: tonic::Code) {
        self.state.metrics.host.count_response(http_of(code));
    }

    /// [`Api::authorize`] for a call that counts its own outcome: a refusal is counted here.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.authorize(req).inspect_err(|e| self.count(e.code()))
    }

    /// Runs a unary call: token check, then `f`, counting the outcome.
    async fn unary<T, F>(&self, req: &Request<impl Sized>, f: F) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<T, Status>>,
    {
        let out = match self.authorize(req) {
            Ok(()) => f.await,
            Err(e) => Err(e),
        };
        self.count(out.as_ref().map_or_else(|e| e.code(), |_| tonic::Code::Ok));
        out.map(Response::new)
    }
}

/// An empty string is "not given", as in TorchServe's protos (proto3 has no presence for these).
fn given(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The inference service.
pub struct Inference(Api);

/// The management service.
pub struct Management(Api);

type PredictionStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<PredictionResponse, Status>> + Send + 'static>>;

/// One queued prediction: the reply receiver and what recording it needs.
struct Queued {
    rx: ReplyRx,
    metrics: Arc<ModelMetrics>,
    in_url: bool,
    arrival: Instant,
}

impl Inference {
    /// A unary or server-streaming prediction admitted and queued; a refusal (token, bad
    /// request, full queue) is counted and answered here. What is queued is counted when drained.
    fn admit_and_submit(&self, req: Request<PredictionsRequest>) -> Result<Queued, Status> {
        self.0.admit(&req)?;
        self.submit(req.into_inner(), Vec::new()).map_err(|e| {
            self.0.count(code_for(e.status));
            Status::from(e)
        })
    }

    /// Checks a request, builds TorchServe's request shape (one parameter per `input` entry) and
    /// queues it on the model's pool.
    fn submit(
        &self,
        req: PredictionsRequest,
        extra: Vec<(String, String)>,
    ) -> Result<Queued, ApiError> {
        let arrival = Instant::now();
        let state = &self.0.state;
        if req.model_name.is_empty() {
            return Err(ApiError::bad_request("Parameter model_name is required."));
        }
        let version = given(&req.model_version);
        let model = state.registry.get(&req.model_name, version)?;
        if req.input.len() > crate::api::MAX_PARAMS {
            return Err(crate::api::too_many_params());
        }
        let request = InferRequest {
            id: crate::logging::new_request_id(),
            headers: extra,
            params: req
                .input
                .into_iter()
                .map(|(name, value)| Param {
                    name,
                    content_type: String::new(),
                    value: Bytes::from(value),
                })
                .collect(),
        };
        let in_url = version.is_some();
        let rx = inference::enqueue(&model, request, arrival, in_url)?;
        Ok(Queued {
            rx,
            metrics: model.metrics.clone(),
            in_url,
            arrival,
        })
    }
}

/// Awaits every part of a reply, hands each to `each` (a failed part as an error), and records
/// the request in the model's metrics exactly once, whether or not the client is still there.
/// Answers the HTTP status the call ends with.
async fn drain(q: Queued, mut each: impl FnMut(Result<Bytes, ApiError>)) -> u16 {
    let failed = |status: u16, body: &Bytes| {
        ApiError::with_status(
            status,
            ErrorKind::InternalServer,
            String::from_utf8_lossy(body).into_owned(),
        )
    };
    let (first, mut rest) = match q.rx.await {
        Ok(Reply::Whole(part)) => {
            let mut t = part.timings;
            t.responded = Some(Instant::now());
            let status = part.response.status;
            q.metrics.record_request(&t, status, q.in_url);
            if (200..300).contains(&status) {
                each(Ok(part.response.body));
            } else {
                each(Err(failed(status, &part.response.body)));
            }
            return status;
        }
        Ok(Reply::Stream(first, rest)) => (first, rest),
        Err(_) => {
            let mut t = Timings::new(q.arrival);
            t.responded = Some(Instant::now());
            q.metrics.record_request(&t, 500, q.in_url);
            each(Err(ApiError::internal(
                "the worker dropped the request without an answer",
            )));
            return 500;
        }
    };
    let mut timings = first.timings;
    timings.first_chunk = Some(Instant::now());
    let mut part = first;
    let mut ok = true;
    loop {
        let status = part.response.status;
        if ok {
            if (200..300).contains(&status) {
                each(Ok(part.response.body));
            } else {
                ok = false;
                each(Err(failed(status, &part.response.body)));
            }
        }
        if part.last {
            timings.responded = Some(Instant::now());
            let status = if ok { status } else { status.max(400) };
            q.metrics.record_request(&timings, status, q.in_url);
            return status;
        }
        match rest.recv().await {
            Some(p) => part = p,
            None => {
                timings.responded = Some(Instant::now());
                q.metrics.record_request(&timings, 500, q.in_url);
                if ok {
                    each(Err(ApiError::internal(
                        "the worker ended the stream without its last part",
                    )));
                }
                return 500;
            }
        }
    }
}

#[tonic::async_trait]
impl InferenceApIsService for Inference {
    async fn ping(&self, _req: Request<()>) -> Result<Response<TorchServeHealthResponse>, Status> {
        // No token needed, as for HTTP /ping: health probes keep working.
        let healthy = self.0.state.registry.healthy();
        let health = serde_json::json!({"status": if healthy { "Healthy" } else { "Unhealthy" }});
        self.0.count(tonic::Code::Ok);
        Ok(Response::new(TorchServeHealthResponse {
            health: format!("{health:#}"),
        }))
    }

    async fn predictions(
        &self,
        req: Request<PredictionsRequest>,
    ) -> Result<Response<PredictionResponse>, Status> {
        let queued = self.admit_and_submit(req)?;
        // A streamed reply to a unary call is answered whole, as HTTP joins its chunks. The reply
        // is drained by its own task: a client that gives up (a deadline, a cancel) drops this
        // future, and the request must still be recorded once the worker answers.
        let metrics = self.0.state.metrics.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut body = Vec::new();
            let mut error = None;
            let status = drain(queued, |part| match part {
                Ok(b) => body.extend_from_slice(&b),
                Err(e) => error = Some(e),
            })
            .await;
            metrics.host.count_response(status);
            let _ = tx.send(match error {
                Some(e) => Err(status_of(&e)),
                None => Ok(body),
            });
        });
        match rx.await {
            Ok(Ok(body)) => Ok(Response::new(PredictionResponse {
                prediction: body,
                sequence_id: None,
                status: None,
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Status::internal("the reply was lost")),
        }
    }

    type StreamPredictionsStream = PredictionStream;

    async fn stream_predictions(
        &self,
        req: Request<PredictionsRequest>,
    ) -> Result<Response<Self::StreamPredictionsStream>, Status> {
        let queued = self.admit_and_submit(req)?;
        // The reply is drained by its own task so that it is recorded even when the client goes
        // away mid-stream; the channel holds what the worker has sent and the client not yet read.
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = self.0.state.metrics.clone();
        tokio::spawn(async move {
            let status = drain(queued, |part| {
                let msg = part
                    .map(|b| PredictionResponse {
                        prediction: b.to_vec(),
                        sequence_id: None,
                        status: None,
                    })
                    .map_err(|e| status_of(&e));
                let _ = tx.send(msg);
            })
            .await;
            metrics.host.count_response(status);
        });
        Ok(Response::new(Box::pin(tokio_stream_from(rx))))
    }

    type StreamPredictions2Stream = PredictionStream;

    async fn stream_predictions2(
        &self,
        req: Request<Streaming<PredictionsRequest>>,
    ) -> Result<Response<Self::StreamPredictions2Stream>, Status> {
        self.0.admit(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let this = Inference(self.0.clone());
        // One message at a time, in order: the next is read only once the previous is answered,
        // so a client cannot queue more than one request per stream.
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                };
                let (sequence_id, headers) = sequence_headers(&msg);
                let seq = Some(sequence_id.clone());
                let reply_err = |e: &ApiError| PredictionResponse {
                    prediction: Vec::new(),
                    sequence_id: seq.clone(),
                    status: Some(rpc_status(e)),
                };
                let queued = match this.submit(msg, headers) {
                    Ok(q) => q,
                    Err(e) => {
                        this.0.count(code_for(e.status));
                        let _ = tx.send(Ok(reply_err(&e)));
                        continue;
                    }
                };
                let status = drain(queued, |part| {
                    let out = match part {
                        Ok(b) => PredictionResponse {
                            prediction: b.to_vec(),
                            sequence_id: seq.clone(),
                            status: None,
                        },
                        Err(e) => reply_err(&e),
                    };
                    let _ = tx.send(Ok(out));
                })
                .await;
                this.0.state.metrics.host.count_response(status);
                if tx.is_closed() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream_from(rx))))
    }
}

/// TorchServe's in-band error of a `StreamPredictions2` reply: a google.rpc.Status with an
/// ErrorInfo naming the exception.
fn rpc_status(e: &ApiError) -> pb::google::rpc::Status {
    use prost::Message;
    let info = pb::google::rpc::ErrorInfo {
        reason: format!("org.pytorch.serve.http.{}", e.kind),
        domain: String::new(),
        metadata: Default::default(),
    };
    pb::google::rpc::Status {
        code: code_for(e.status) as i32,
        message: e.message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(),
            value: info.encode_to_vec(),
        }],
    }
}

/// The sequence id of a `StreamPredictions2` message (a new one when it starts a sequence) and
/// the headers TorchServe sets for it.
fn sequence_headers(msg: &PredictionsRequest) -> (String, Vec<(String, String)>) {
    let mut headers = Vec::new();
    let id = match msg.sequence_id.as_deref().filter(|s| !s.is_empty()) {
        Some(id) => id.to_string(),
        None => {
            headers.push((SEQUENCE_START.to_string(), "true".to_string()));
            format!("ts-seq-{}", crate::logging::new_request_id())
        }
    };
    headers.push((SEQUENCE_ID.to_string(), id.clone()));
    let ends = msg
        .input
        .get(SEQUENCE_END)
        .is_some_and(|v| v.eq_ignore_ascii_case(b"true"));
    if ends {
        headers.push((SEQUENCE_END.to_string(), "true".to_string()));
    }
    (id, headers)
}

/// An unbounded receiver as a stream of replies.
fn tokio_stream_from(
    rx: mpsc::UnboundedReceiver<Result<PredictionResponse, Status>>,
) -> impl Stream<Item = Result<PredictionResponse, Status>> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// A management reply.
fn msg(msg: String) -> ManagementResponse {
    ManagementResponse { msg }
}

/// A positive proto3 int, or the default where it is 0 or negative (TorchServe's
/// GRPCUtils.getRegisterParam).
fn positive_or(v: i32, default: Option<u32>) -> Option<u32> {
    if v > 0 {
        Some(v as u32)
    } else {
        default
    }
}

/// TorchServe's refusal when the model API is off (`enable_model_api=false`).
fn model_api_enabled(state: &AppState) -> Result<(), Status> {
    if state.config.enable_model_api {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "Model API disabled\norg.pytorch.serve.archive.model.ModelException",
        ))
    }
}

fn required(value: &str, name: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(ApiError::bad_request(format!("Parameter {name} is required.")).into())
    } else {
        Ok(())
    }
}

fn pretty(v: &serde_json::Value) -> String {
    format!("{v:#}")
}

#[tonic::async_trait]
impl ManagementApIsService for Management {
    async fn describe_model(
        &self,
        req: Request<DescribeModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.get_ref();
        self.0
            .unary(&req, async {
                required(&r.model_name, "model_name")?;
                let v = management::describe(&self.0.state, &r.model_name, given(&r.model_version))
                    .await?;
                Ok(msg(pretty(&v)))
            })
            .await
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.get_ref();
        self.0
            .unary(&req, async {
                // TorchServe: a limit outside 1..=100 is 100; a negative page token is 0.
                let limit = positive_or(r.limit, Some(100)).unwrap_or(100).min(100);
                let start = r.next_page_token.max(0) as usize;
                Ok(msg(pretty(&management::list_page(
                    &self.0.state,
                    limit,
                    start,
                ))))
            })
            .await
    }

    async fn register_model(
        &self,
        req: Request<RegisterModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.get_ref();
        self.0
            .unary(&req, async {
                model_api_enabled(&self.0.state)?;
                // TorchServe's GRPCUtils.getRegisterParam reads an empty field as absent.
                if r.url.is_empty() {
                    return Err(ApiError::bad_request("Parameter url is required.").into());
                }
                if !r.handler.is_empty() || !r.runtime.is_empty() {
                    return Err(ApiError::bad_request(
                        "oxserve takes handler and runtime from the archive's MANIFEST.json; \
                         they cannot be overridden at registration",
                    )
                    .into());
                }
                let ms = |v: i32| positive_or(v, None).map(|v| Duration::from_millis(v.into()));
                let s = |v: i32| positive_or(v, None).map(|v| Duration::from_secs(v.into()));
                let options = RegisterOptions {
                    model_name: given(&r.model_name).map(String::from),
                    initial_workers: positive_or(r.initial_workers, None),
                    batch_size: positive_or(r.batch_size, None),
                    max_batch_delay: ms(r.max_batch_delay),
                    response_timeout: s(r.response_timeout),
                    startup_timeout: s(r.startup_timeout),
                    synchronous: r.synchronous,
                    loaded_at_startup: false,
                    handler: None,
                    runtime: None,
                    default_workers: Some(management::api_default_workers(&self.0.state.config)),
                    workflow: None,
                };
                let (_, text) = management::register_model(&self.0.state, &r.url, options).await?;
                Ok(msg(text))
            })
            .await
    }

    async fn scale_worker(
        &self,
        req: Request<ScaleWorkerRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.get_ref();
        self.0
            .unary(&req, async {
                required(&r.model_name, "model_name")?;
                let min = positive_or(r.min_worker, Some(1)).unwrap_or(1);
                let max = positive_or(r.max_worker, Some(min)).unwrap_or(min);
                let gpus = positive_or(r.number_gpu, Some(0)).unwrap_or(0);
                let (_, text) = management::scale_workers(
                    &self.0.state,
                    &r.model_name,
                    given(&r.model_version),
                    (min, max, gpus),
                    r.synchronous,
                )
                .await?;
                Ok(msg(text))
            })
            .await
    }

    async fn set_default(
        &self,
        req: Request<SetDefaultRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.get_ref();
        self.0
            .unary(&req, async {
                required(&r.model_name, "model_name")?;
                required(&r.model_version, "model_version")?;
                let text = management::set_default_version(
                    &self.0.state,
                    &r.model_name,
                    &r.model_version,
                )?;
                Ok(msg(text))
            })
            .await
    }

    async fn unregister_model(
        &self,
        req: Request<UnregisterModelRequest>,
    ) -> Result<Response<ManagementResponse>, Status> {
        let r = req.get_ref();
        self.0
            .unary(&req, async {
                model_api_enabled(&self.0.state)?;
                required(&r.model_name, "model_name")?;
                let text = management::unregister_model(
                    &self.0.state,
                    &r.model_name,
                    given(&r.model_version),
                )
                .await?;
                Ok(msg(text))
            })
            .await
    }
}

/// Serves one gRPC service on a bound listener until `stop` turns true, logging a failure; over
/// TLS when `tls` is an acceptor. (A macro: tonic's bound on a servable service is long and names
/// crates oxserve does not use.)
macro_rules! serve {
    ($listener:expr, $service:expr, $stop:expr, $tls:expr, $timeout:expr, $what:literal) => {{
        let listener = $listener;
        let service = $service;
        let stop = $stop;
        match $tls {
            Some(acceptor) => {
                let incoming = tls::incoming(listener, acceptor, $timeout, $what);
                serve!(@run incoming, service, stop, $what)
            }
            None => {
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                serve!(@run incoming, service, stop, $what)
            }
        }
    }};
    (@run $incoming:expr, $service:expr, $stop:expr, $what:literal) => {{
        let incoming = $incoming;
        let service = $service;
        let mut stop = $stop;
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
                .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
                // Dead peers (a vanished client, a half-open connection) are found and dropped,
                // so they do not hold connections forever.
                .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
                .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!("gRPC {} listener failed: {e}", $what);
            }
        })
    }};
}

/// Why the gRPC listeners cannot start (the server does not start either).
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Tls(#[from] crate::api::tls::TlsError),
    #[error("enable_grpc_ssl=true needs private_key_file and certificate_file")]
    NoTlsFiles,
}

/// Spawns the two gRPC listeners (already bound) with the request size limits of the config;
/// with `enable_grpc_ssl`, over TLS (an unusable key or certificate is the error).
pub fn spawn(
    state: &AppState,
    inference_listener: tokio::net::TcpListener,
    management_listener: tokio::net::TcpListener,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, SpawnError> {
    let acceptor = match (&state.config.tls, state.config.grpc_ssl) {
        (Some(files), true) => Some(crate::api::tls::acceptor_with_alpn(files, b"h2")?),
        (None, true) => return Err(SpawnError::NoTlsFiles),
        (_, false) => None,
    };
    let timeout = state.config.http.header_timeout;
    let limit_in = state.config.max_request_size;
    let limit_out = state.config.max_response_size;
    let inference = InferenceApIsServiceServer::new(Inference(Api {
        state: state.clone(),
        scope: Scope::Inference,
    }))
    .max_decoding_message_size(limit_in)
    .max_encoding_message_size(limit_out);
    let management = ManagementApIsServiceServer::new(Management(Api {
        state: state.clone(),
        scope: Scope::Management,
    }))
    .max_decoding_message_size(limit_in)
    .max_encoding_message_size(limit_out);
    Ok(vec![
        serve!(
            inference_listener,
            inference,
            stop.clone(),
            acceptor.clone(),
            timeout,
            "inference"
        ),
        serve!(
            management_listener,
            management,
            stop,
            acceptor,
            timeout,
            "management"
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_as_in_torchserve() {
        use tonic::Code;
        for (http, code) in [
            (200, Code::Ok),
            (202, Code::Ok),
            (400, Code::InvalidArgument),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (409, Code::Aborted),
            (413, Code::ResourceExhausted),
            (418, Code::FailedPrecondition),
            (503, Code::Unavailable),
            (507, Code::Internal),
            (99, Code::Unknown),
        ] {
            assert_eq!(code_for(http), code, "{http}");
        }
        // Counting a gRPC outcome keeps its class (2XX/4XX/5XX).
        for http in [200, 400, 401, 403, 404, 409, 499, 500, 501, 503, 504] {
            assert_eq!(http_of(code_for(http)) / 100, http / 100, "{http}");
        }
    }

    #[test]
    fn stream_predictions2_sets_torchserve_sequence_headers() {
        let mut m = PredictionsRequest::default();
        let (id, h) = sequence_headers(&m);
        assert!(id.starts_with("ts-seq-"));
        assert!(h.contains(&(SEQUENCE_START.into(), "true".into())));
        assert!(h.contains(&(SEQUENCE_ID.into(), id.clone())));
        m.sequence_id = Some("s1".into());
        m.input.insert(SEQUENCE_END.into(), b"TRUE".to_vec());
        let (id, h) = sequence_headers(&m);
        assert_eq!(id, "s1");
        assert!(!h.iter().any(|(k, _)| k == SEQUENCE_START));
        assert!(h.contains(&(SEQUENCE_END.into(), "true".into())));
    }
}
