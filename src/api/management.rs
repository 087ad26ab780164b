//! Management API (default 127.0.0.1:8081): list, describe, scale, register, unregister, set-default.
//!
//! Every parameter is validated: where TorchServe silently falls back to a default for
//! `min_worker=abc`, oxserve answers 400 with the reason (docs/compatibility.md lists each case).
//! An empty value (`limit=`) means "not given", as in TorchServe; a trailing slash
//! (`DELETE /models/m/`) is the same path without it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, options, put};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::{openapi, parse_query, ApiPath, AppState};
use crate::model::registry::{ModelVersion, RegisterOptions};
use crate::worker::WorkerStatus;

const OPENAPI: &str = include_str!("openapi/management.json");

/// Longest `handler` register parameter (a module path and function name).
const MAX_HANDLER_LEN: usize = 1024;

pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/", options(|| async { openapi(OPENAPI) }))
        .route("/api-description", get(|| async { openapi(OPENAPI) }))
        .route("/models", get(list).post(register))
        // TorchServe splits the path on '/' and drops empty segments: `/models/` is `/models`
        // (its test_snapshot.py lists models with `GET /models/`).
        .route("/models/", get(list).post(register))
        .route(
            "/token",
            get(super::auth::token_api).post(super::auth::token_api),
        )
        .route(
            "/models/{model}",
            get(describe_default)
                .put(scale_default)
                .delete(unregister_default),
        )
        // TorchServe splits the path on '/' and drops empty segments: `/models/m/` is `/models/m`.
        .route(
            "/models/{model}/",
            get(describe_default)
                .put(scale_default)
                .delete(unregister_default),
        )
        .route(
            "/models/{model}/{version}",
            get(describe_version)
                .put(scale_version)
                .delete(unregister_version),
        )
        .route(
            "/models/{model}/{version}/",
            get(describe_version)
                .put(scale_version)
                .delete(unregister_version),
        )
        .route("/models/{model}/{version}/set-default", put(set_default))
        .route(
            "/workflows",
            get(super::workflows::list).post(super::workflows::register),
        )
        .route(
            "/workflows/",
            get(super::workflows::list).post(super::workflows::register),
        )
        .route(
            "/workflows/{name}",
            get(super::workflows::describe).delete(super::workflows::unregister),
        )
        .route(
            "/workflows/{name}/",
            get(super::workflows::describe).delete(super::workflows::unregister),
        )
        .fallback(super::not_found);
    let routes = super::with_token_check(routes, &state, super::auth::management);
    super::finish(routes, state)
}

/// Query parameters, validated one by one.
struct Params(HashMap<String, String>);

impl Params {
    /// Empty values are dropped: TorchServe's NettyUtils treats `limit=` as "not given".
    fn parse(raw: Option<String>) -> Result<Params, ApiError> {
        let pairs = parse_query(raw.as_deref())?;
        // `url=` is the exception: TorchServe answers an empty url with its own 404.
        let empty_url = pairs.iter().any(|(k, v)| k == "url" && v.is_empty());
        let mut map: HashMap<String, String> =
            pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        if empty_url && !map.contains_key("url") {
            map.insert("url".into(), String::new());
        }
        Ok(Params(map))
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn uint(&self, key: &str) -> Result<Option<u32>, ApiError> {
        match self.str(key) {
            None => Ok(None),
            Some(v) => v.parse::<u32>().map(Some).map_err(|_| {
                ApiError::bad_request(format!(
                    "Parameter {key} must be a non-negative integer, got {v:?}"
                ))
            }),
        }
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ApiError> {
        match self.str(key).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(ApiError::bad_request(format!(
                "Parameter {key} must be true or false, got {v:?}"
            ))),
        }
    }
}

fn status(code: StatusCode, message: String) -> Response {
    (code, Json(json!({ "status": message }))).into_response()
}

async fn list(State(state): State<AppState>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let p = Params::parse(q)?;
    let limit = p.uint("limit")?.unwrap_or(100);
    if limit == 0 {
        return Err(ApiError::bad_request("Parameter limit must be at least 1"));
    }
    let start = p.uint("next_page_token")?.unwrap_or(0) as usize;
    Ok(Json(list_page(&state, limit, start)).into_response())
}

/// One page of the model list (`limit` at least 1): shared by HTTP and gRPC `ListModels`.
pub fn list_page(state: &AppState, limit: u32, start: usize) -> Value {
    let models = state.registry.list();
    let page: Vec<Value> = models
        .iter()
        .skip(start)
        .take(limit as usize)
        .map(|(name, url)| json!({"modelName": name, "modelUrl": url}))
        .collect();
    let mut body = json!({ "models": page });
    let next = start + limit as usize;
    if next < models.len() {
        body["nextPageToken"] = json!(next.to_string());
    }
    body
}

/// Resident memory of a process in bytes, from /proc (0 where unknown).
fn rss_bytes(pid: u32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

async fn describe_one(v: &ModelVersion, gpus: u32) -> Value {
    let pool = &v.pool;
    let s = pool.settings();
    // One snapshot of the scheduler's own state: workers and queue as of the same instant.
    let status = pool.describe().await;
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|w| {
            let state = match w.status {
                WorkerStatus::Ready | WorkerStatus::Busy => "READY",
                WorkerStatus::Starting => "STARTING",
                WorkerStatus::Backoff => "BACKOFF",
                WorkerStatus::Stopping => "UNLOADING",
            };
            // TorchServe's pid is -1 while a worker has no process.
            let pid = w.pid.map_or(-1, i64::from);
            json!({
                "id": w.id.to_string(),
                "startTime": crate::timefmt::rfc3339_millis(w.start_time),
                "status": state,
                "memoryUsage": w.pid.map_or(0, rss_bytes),
                "pid": pid,
                "gpu": w.gpu >= 0,
                "gpuUsage": "N/A",
            })
        })
        .collect();
    let pending = status.queue_len;
    json!({
        "modelName": v.name,
        "modelVersion": v.version,
        "modelUrl": v.url,
        "runtime": pool.runtime(),
        "minWorkers": status.min_workers,
        "maxWorkers": status.max_workers,
        "batchSize": s.batch_size,
        "maxBatchDelay": s.max_batch_delay.as_millis() as u64,
        "responseTimeout": s.response_timeout.as_secs(),
        "startupTimeout": s.startup_timeout.as_secs(),
        // TorchServe's remaining describe fields, at the values its defaults give: oxserve has
        // no client timeout, tensor/pipeline parallelism, job tickets or per-model venvs
        // (docs/compatibility.md).
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": 0,
        "parallelType": "",
        "parallelLevel": 0,
        "deviceType": if gpus > 0 { "gpu" } else { "cpu" },
        "continuousBatching": s.mode == crate::worker::BatchMode::Continuous,
        "useJobTicket": false,
        "useVenv": false,
        // Sequence batching as TorchServe reports it (0 for a model without it).
        "stateful": s.sequence.is_some(),
        "sequenceMaxIdleMSec": s.sequence.map_or(0, |q| q.max_idle.as_millis() as u64),
        "sequenceTimeoutMSec": s
            .sequence
            .and_then(|q| q.timeout)
            .map_or(0, |t| t.as_millis() as u64),
        "maxNumSequence": s.sequence.map_or(0, |q| q.max_sequences),
        "maxSequenceJobQueueSize": s.sequence.map_or(0, |q| q.max_queue),
        "loadedAtStartup": v.loaded_at_startup,
        "workers": workers,
        "jobQueueStatus": {
            "remainingCapacity": s.queue_capacity.saturating_sub(pending),
            "pendingRequests": pending,
        },
    })
}

async fn describe_default(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(describe(&state, &model, None).await?).into_response())
}

async fn describe_version(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(describe(&state, &model, Some(&version)).await?).into_response())
}

/// The description of a model's default version, one version, or `all` of them: shared by HTTP
/// and gRPC `DescribeModel`. A model not registered yet but still downloading or unpacking is
/// described with its progress (oxserve's addition; TorchServe answers 404 until it is loaded).
pub async fn describe(
    state: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<Value, ApiError> {
    let found = match version {
        Some("all") => state.registry.versions(model),
        v => state.registry.get(model, v).map(|v| vec![v]),
    };
    let versions: Vec<Arc<ModelVersion>> = match found {
        Ok(v) => v,
        Err(e @ crate::model::registry::RegistryError::ModelNotFound(_)) => {
            return match state.registry.loading(model) {
                Some(l) => Ok(json!([l.describe()])),
                None => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::with_capacity(versions.len());
    for v in &versions {
        out.push(describe_one(v, state.config.number_of_gpu.unwrap_or(0)).await);
    }
    Ok(Value::Array(out))
}

async fn scale_default(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    scale(state, model, None, q).await
}

async fn scale_version(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    scale(state, model, Some(version), q).await
}

async fn scale(
    state: AppState,
    model: String,
    version: Option<String>,
    q: Option<String>,
) -> Result<Response, ApiError> {
    let p = Params::parse(q)?;
    let min = p.uint("min_worker")?.unwrap_or(1);
    let max = p.uint("max_worker")?.unwrap_or(min.max(1));
    let synchronous = p.boolean("synchronous", false)?;
    let number_gpu = p.uint("number_gpu")?.unwrap_or(0);
    let (code, message) = scale_workers(
        &state,
        &model,
        version.as_deref(),
        (min, max, number_gpu),
        synchronous,
    )
    .await?;
    Ok(status(
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        message,
    ))
}

/// Validates and applies a scale request (`workers` = min, max, number_gpu); answers the HTTP
/// status (200 done, 202 under way) and message. Shared by HTTP and gRPC `ScaleWorker`.
pub async fn scale_workers(
    state: &AppState,
    model: &str,
    version: Option<&str>,
    (min, max, number_gpu): (u32, u32, u32),
    synchronous: bool,
) -> Result<(u16, String), ApiError> {
    if max < min {
        return Err(ApiError::bad_request(
            "max_worker cannot be less than min_worker.",
        ));
    }
    let ceiling = state.config.max_workers_per_model;
    if max > ceiling {
        return Err(ApiError::bad_request(format!(
            "max_worker {max} is more than max_workers_per_model ({ceiling})"
        )));
    }
    if number_gpu > state.config.number_of_gpu.unwrap_or(0) {
        return Err(ApiError::bad_request(
            "number_gpu is larger than the GPUs this server uses (number_of_gpu)",
        ));
    }
    let v = state.registry.get(model, version)?;
    if synchronous {
        let n = v.pool.scale(min, max, true).await;
        // TorchServe: a synchronous scale whose workers cannot start is a 500 (the model stays).
        if min > 0 && v.pool.live_workers() == 0 {
            if let Some(why) = v.pool.load_error() {
                return Err(ApiError::internal(format!(
                    "Failed to start workers for model {model} version: {}: {why}",
                    v.version
                )));
            }
        }
        state.registry.save_snapshot("snapshot");
        let mut msg = format!("Workers scaled to {n} for model: {model}");
        if let Some(version) = &version {
            msg.push_str(&format!(", version: {version}"));
        }
        Ok((200, msg))
    } else {
        let pool = v.pool.clone();
        let registry = state.registry.clone();
        tokio::spawn(async move {
            pool.scale(min, max, false).await;
            registry.save_snapshot("snapshot");
        });
        Ok((202, "Processing worker updates...".into()))
    }
}

fn duration_ms(p: &Params, key: &str) -> Result<Option<Duration>, ApiError> {
    Ok(p.uint(key)?.map(|v| Duration::from_millis(u64::from(v))))
}

fn duration_s(p: &Params, key: &str) -> Result<Option<Duration>, ApiError> {
    Ok(p.uint(key)?.map(|v| Duration::from_secs(u64::from(v))))
}

async fn register(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    if !state.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    let p = Params::parse(q)?;
    let Some(url) = p.str("url").map(String::from) else {
        return Err(ApiError::bad_request("Parameter url is required."));
    };
    let runtime = match p.str("runtime") {
        None => None,
        Some(r @ ("python" | "python3")) => Some(r.to_string()),
        Some("LSP") => {
            return Err(ApiError::bad_request(
                "runtime LSP (TorchServe's C++ backend) is not supported by oxserve",
            ))
        }
        Some(r) => {
            let shown: String = r.chars().take(64).collect();
            return Err(ApiError::bad_request(format!(
                "Invalid RuntimeType value: {shown}"
            )));
        }
    };
    let handler = match p.str("handler") {
        None => None,
        Some(h) if h.len() > MAX_HANDLER_LEN || h.chars().any(char::is_control) => {
            return Err(ApiError::bad_request(format!(
                "Parameter handler must be at most {MAX_HANDLER_LEN} characters without control characters"
            )))
        }
        Some(h) => Some(h.to_string()),
    };
    if let Some(b) = p.uint("batch_size")? {
        if b == 0 {
            return Err(ApiError::bad_request(
                "Parameter batch_size must be at least 1",
            ));
        }
    }
    if let Some(n) = p.uint("initial_workers")? {
        let ceiling = state.config.max_workers_per_model;
        if n > ceiling {
            return Err(ApiError::bad_request(format!(
                "initial_workers {n} is more than max_workers_per_model ({ceiling})"
            )));
        }
    }
    let synchronous = p.boolean("synchronous", true)?;
    let options = RegisterOptions {
        handler,
        runtime,
        default_workers: Some(api_default_workers(&state.config)),
        model_name: p.str("model_name").map(String::from),
        initial_workers: p.uint("initial_workers")?,
        batch_size: p.uint("batch_size")?,
        max_batch_delay: duration_ms(&p, "max_batch_delay")?,
        response_timeout: duration_s(&p, "response_timeout")?,
        startup_timeout: duration_s(&p, "startup_timeout")?,
        synchronous,
        loaded_at_startup: false,
        workflow: None,
    };
    let (code, message) = register_model(&state, &url, options).await?;
    Ok(status(
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        message,
    ))
}

/// Registers an archive; answers the HTTP status (200 registered, 202 workers still starting)
/// and message. Shared by HTTP and gRPC `RegisterModel` (each checks `enable_model_api` itself,
/// since they refuse differently, as TorchServe does).
/// Workers a registration through the API starts when it names none: TorchServe starts
/// default_workers_per_model workers when that key is set, else none (one per CPU only for models
/// loaded at start-up). Shared by HTTP and gRPC registration.
pub fn api_default_workers(c: &crate::config::Config) -> u32 {
    if c.default_workers_per_model_configured {
        c.default_workers_per_model
    } else {
        0
    }
}

pub async fn register_model(
    state: &AppState,
    url: &str,
    options: RegisterOptions,
) -> Result<(u16, String), ApiError> {
    let synchronous = options.synchronous;
    let v = state.registry.register(url, options).await?;
    state.registry.save_snapshot("snapshot");
    let workers = v.pool.min_workers();
    let msg = format!(
        "Model \"{}\" Version: {} registered with {workers} initial workers",
        v.name, v.version
    );
    if workers == 0 {
        // TorchServe's answer for a model without workers, synchronous or not.
        return Ok((
            200,
            format!("{msg}. Use scale workers API to add workers for the model."),
        ));
    }
    if synchronous {
        Ok((200, msg))
    } else {
        Ok((
            202,
            format!("{msg}. Use describe model API to see the status of the workers."),
        ))
    }
}

async fn unregister_default(
    State(state): State<AppState>,
    ApiPath(model): ApiPath<String>,
) -> Result<Response, ApiError> {
    unregister(state, model, None).await
}

async fn unregister_version(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    unregister(state, model, Some(version)).await
}

async fn unregister(
    state: AppState,
    model: String,
    version: Option<String>,
) -> Result<Response, ApiError> {
    if !state.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    Ok(status(
        StatusCode::OK,
        unregister_model(&state, &model, version.as_deref()).await?,
    ))
}

/// Unregisters a version (the default one when `version` is None): shared by HTTP and gRPC.
pub async fn unregister_model(
    state: &AppState,
    model: &str,
    version: Option<&str>,
) -> Result<String, ApiError> {
    state.registry.unregister(model, version).await?;
    state.registry.save_snapshot("snapshot");
    Ok(format!("Model \"{model}\" unregistered"))
}

async fn set_default(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(status(
        StatusCode::OK,
        set_default_version(&state, &model, &version)?,
    ))
}

/// Makes `version` the default of `model`: shared by HTTP and gRPC `SetDefault`.
pub fn set_default_version(
    state: &AppState,
    model: &str,
    version: &str,
) -> Result<String, ApiError> {
    state.registry.set_default(model, version)?;
    state.registry.save_snapshot("snapshot");
    Ok(format!(
        "Default version successfully updated for model \"{model}\" to \"{version}\""
    ))
}
