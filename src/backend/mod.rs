//! The seam between the worker pool and whatever computes a prediction.
//!
//! A [`Backend`] is one loaded copy of a model owned by one worker: an in-process Rust model or the
//! socket to a Python worker process. The pool never knows which: it hands a batch in and gets one
//! reply per request back, so batching, queueing, supervision and metrics live in one place
//! (`crate::worker`) for every kind of model.

pub mod builtin;
pub mod onnx;
pub mod protocol;
pub mod python;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{ApiError, ErrorKind};
use crate::model::archive::Manifest;

/// One request of a batch, in the shape TorchServe's worker protocol carries it.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    /// Request id, unique per request; echoed back by Python workers.
    pub id: String,
    /// HTTP headers as received, plus TorchServe's synthetic ones (`url_path`, `explain`).
    pub headers: Vec<(String, String)>,
    /// The body as parameter `body`, or one parameter per form field / multipart part / query pair.
    pub params: Vec<Param>,
}

/// A named input of a request.
#[derive(Debug, Clone, Default)]
pub struct Param {
    pub name: String,
    pub content_type: String,
    pub value: Bytes,
}

impl InferRequest {
    /// The value of the first parameter with this name.
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The request's payload: `body` (or `data`, TorchServe's alias), else the first parameter.
    pub fn payload(&self) -> Option<&Param> {
        self.param("body")
            .or_else(|| self.param("data"))
            .or_else(|| self.params.first())
    }

    /// A header by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The reply to one request (a whole reply, or one streamed part of it).
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl InferResponse {
    pub fn ok(content_type: &str, body: impl Into<Bytes>) -> Self {
        InferResponse {
            status: 200,
            content_type: content_type.to_string(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A per-request error in TorchServe's JSON error shape, with its kind's status.
    pub fn error(kind: ErrorKind, message: &str) -> Self {
        InferResponse::from(ApiError::new(kind, message))
    }
}

impl From<ApiError> for InferResponse {
    fn from(e: ApiError) -> Self {
        InferResponse {
            status: e.status,
            content_type: "application/json".into(),
            headers: Vec::new(),
            body: Bytes::from(e.json()),
        }
    }
}

/// Receives intermediate (streamed) parts while a batch is being computed.
pub trait StreamSink: Send + Sync {
    /// A part for request `index` of the batch; the final part is the backend's return value.
    fn send_partial(&self, index: usize, part: InferResponse);
}

/// A sink for callers that do not stream.
pub struct NoStream;

impl StreamSink for NoStream {
    fn send_partial(&self, _index: usize, _part: InferResponse) {}
}

/// One reply part of a request in flight on an async backend ([`Backend::recv`]).
#[derive(Debug)]
pub struct Part {
    /// The request id as sent to the backend.
    pub id: String,
    pub response: InferResponse,
    /// The final part of that request (no `ts_stream_next: true`).
    pub last: bool,
}

/// Why a whole batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model could not be loaded (bad file, handler import error, startup timeout).
    #[error("{0}")]
    Load(String),
    /// The handler failed this batch; the worker is still usable.
    #[error("{message}")]
    Failed { status: u16, message: String },
    /// The worker is gone (process died, socket closed): the pool restarts it.
    #[error("worker died: {0}")]
    Died(String),
}

/// Why no backend could be made for a model version at registration.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The manifest names nothing any backend serves.
    #[error("the manifest names no handler and no .onnx serializedFile (runtime {runtime:?}): nothing can serve it")]
    NoBackend { runtime: String },
    /// The archive's model file is not named, not inside its folder, or missing.
    #[error("{0}")]
    ModelFile(String),
    /// The ONNX model did not load in-process: a file that does not parse, an unsupported
    /// operator.
    #[error("cannot load ONNX model {}: {source}", .file.display())]
    Onnx {
        file: std::path::PathBuf,
        source: onnx::ModelError,
    },
    /// The ONNX model failed the load check: over its memory cap or deadline, or weights
    /// refused. `file` is the file's name only.
    #[error("ONNX model {file} refused: {source}")]
    OnnxRefused {
        file: String,
        source: onnx::CheckError,
    },
    /// The load check needs this binary's path, and it cannot be found.
    #[error("cannot find the oxserve binary: {0}")]
    NoExe(std::io::Error),
}

impl LoaderError {
    /// A bad archive is a bad request; a model that does not load is a 500, as TorchServe answers
    /// a model whose workers fail to start ("Failed to start workers", InternalServerException).
    pub fn kind(&self) -> ErrorKind {
        match self {
            LoaderError::NoBackend { .. } | LoaderError::ModelFile(_) => ErrorKind::BadRequest,
            LoaderError::Onnx { .. } | LoaderError::OnnxRefused { .. } | LoaderError::NoExe(_) => {
                ErrorKind::InternalServer
            }
        }
    }
}

/// One loaded model instance, owned by one worker.
#[async_trait]
pub trait Backend: Send {
    /// Computes one reply per request of `batch`, in order. Streaming backends send earlier parts
    /// through `sink` and return the last part of each request.
    async fn infer(
        &mut self,
        batch: &[InferRequest],
        sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError>;

    /// The OS process serving this backend, if it is a separate process.
    fn pid(&self) -> Option<u32> {
        None
    }

    /// Whether the backend reports TorchServe's HandlerTime / PredictionTime itself (Python workers
    /// print them as `[METRICS]` lines); otherwise the worker pool records them around `infer`.
    fn reports_handler_metrics(&self) -> bool {
        false
    }

    /// Whether the backend holds many requests at once (async mode, [`Backend::send`] and
    /// [`Backend::recv`]). One that cannot is served batch by batch with [`Backend::infer`].
    fn is_async(&self) -> bool {
        false
    }

    /// Whether [`Backend::send`] then one [`Backend::recv`] is one step of continuous batching
    /// (one inference message, one reply frame). One that cannot is served batch by batch.
    fn can_step(&self) -> bool {
        false
    }

    /// Async mode: sends a batch without waiting for its replies.
    async fn send(&mut self, _batch: &[InferRequest]) -> Result<(), BackendError> {
        Err(BackendError::Died("this backend has no async mode".into()))
    }

    /// Async mode: whether [`Backend::cancel`] reaches the handler (oxserve's Python runtime);
    /// otherwise a request whose client went away runs to its end, as in TorchServe.
    fn can_cancel(&self) -> bool {
        false
    }

    /// Async mode: stops the requests `ids`, sent earlier, whose clients went away. Each still
    /// gets a final reply part from [`Backend::recv`] (an error part when it was stopped).
    async fn cancel(&mut self, _ids: &[String]) -> Result<(), BackendError> {
        Ok(())
    }

    /// Async mode: the parts of the next reply, for any requests sent earlier, in the order the
    /// backend finished them. Must be cancel safe: it is raced against new work arriving.
    async fn recv(&mut self) -> Result<Vec<Part>, BackendError> {
        Err(BackendError::Died("this backend has no async mode".into()))
    }

    /// Releases the model: stops the worker process, if any. Called once, when the worker retires.
    async fn shutdown(self: Box<Self>) {}
}

/// TorchServe's words for a worker that missed a deadline (start-up or response): its tests and
/// operators grep for them, so every such message starts with them.
pub const NO_RESPONSE: &str = "Backend worker did not respond in given time";

/// What every worker of one model version shares: built once, when the version is registered.
pub struct ModelSpec {
    pub model_name: String,
    pub model_version: String,
    /// The unpacked model folder (the working directory of Python workers).
    pub model_dir: PathBuf,
    pub manifest: Arc<Manifest>,
    pub batch_size: u32,
    pub startup_timeout: Duration,
    pub response_timeout: Duration,
    /// Where backend-emitted metrics go.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Server-wide settings backends may need (python interpreter, runtime folder, metrics config).
    pub settings: Arc<crate::config::Config>,
}

/// What one worker needs to load its model: the model version's [`ModelSpec`] and the worker's own
/// slot, built by the scheduler when it starts the worker.
#[derive(Clone)]
pub struct WorkerSpec {
    /// The worker's port-like id (`initial_worker_port` counting up), also used in socket names.
    pub id: u32,
    /// `W-<id>-<model>_<version>`, TorchServe's worker name.
    pub name: String,
    /// GPU the worker should use, -1 for none (TorchServe's encoding, sent as is in the load
    /// message).
    pub gpu_id: i32,
    pub model: Arc<ModelSpec>,
}

/// Creates backends of one kind; one loader per model version, called once per worker (re)start.
#[async_trait]
pub trait BackendLoader: Send + Sync {
    /// A short name shown in describe's `runtime` field.
    fn runtime(&self) -> &str;
    /// Work done once per model version before any worker starts (a Python model's pip
    /// dependencies); an error fails the registration. Nothing by default.
    async fn prepare(&self, _model: &Arc<ModelSpec>) -> Result<(), BackendError> {
        Ok(())
    }
    async fn load(&self, spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError>;
}

/// Chooses the backend for an unpacked archive from its manifest.
///
/// `handler: "builtin"` is the demo model; an `.onnx` serializedFile with no Python handler runs on
/// tract, after a test load in a child process of this binary (see [`onnx`]). Any other handler
/// runs in Python worker processes. Parsing an ONNX model is CPU-heavy: call this from a blocking
/// thread.
pub fn loader_for(
    dir: &std::path::Path,
    manifest: &Manifest,
    config: &Arc<crate::config::Config>,
) -> Result<Arc<dyn BackendLoader>, LoaderError> {
    if manifest.model.handler == "builtin" {
        return Ok(Arc::new(builtin::DemoLoader));
    }
    if onnx::is_onnx(manifest) {
        // /proc/self/exe still runs this binary after the file was replaced on disk (an upgrade
        // under a running server), where current_exe() would name the new or a deleted file.
        let exe = if cfg!(target_os = "linux") {
            std::path::PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().map_err(LoaderError::NoExe)?
        };
        return Ok(Arc::new(onnx::OnnxLoader::new_checked(
            dir, manifest, config, &exe,
        )?));
    }
    if !manifest.model.handler.is_empty() {
        return Ok(Arc::new(python::PythonLoader::new()));
    }
    Err(LoaderError::NoBackend {
        runtime: manifest.runtime.clone(),
    })
}
