//! Per-model-version scheduling: one supervisor task per model version, and the handle to it.
//!
//! A [`Pool`] is a cheap handle to a supervisor task (`supervisor.rs`) that alone owns the
//! version's queue, its worker slots and their life cycle. Everything reaches it as a typed
//! command on one channel (submit, scale, describe, close) or as an event from a worker task
//! (loaded, answered n jobs, exited), so there is no lock to get wrong and no race between two
//! scale requests: commands are applied one after another. What describe, `/ping` and the
//! worker gauges report is what the supervisor holds, published by it after every step.
//!
//! How it differs from TorchServe's wlm/ package (WorkLoadManager, WorkerThread, BatchAggregator):
//! - Batching is a [`policy::BatchPolicy`] the supervisor consults, not code inside each worker
//!   thread; classic (batch_size / max_batch_delay), async (many requests in flight per worker,
//!   `asyncCommunication`), continuous (`continuousBatching`) and sequence (stateful sessions
//!   pinned to one worker, `sequenceBatching`, alone or with continuous) are implemented (see
//!   `policy.rs`, docs/llm.md).
//! - The pool autoscales between min_worker and max_worker on queue pressure
//!   (`autoscale.rs`, docs/scheduling.md); TorchServe only scales when asked.
//! - Restart backoff resets once a worker has served (TorchServe's grows for good), and a worker
//!   waiting to restart is reported as such (TorchServe shows it as a live worker).
//! - A panic in a backend answers its batch with a 500 and replaces the backend.

pub mod autoscale;
pub mod policy;
mod runner;
mod supervisor;

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

pub use crate::config::{BatchMode, SequenceSettings};

use crate::backend::{BackendLoader, InferRequest, InferResponse, ModelSpec};
use crate::error::ErrorKind;
use crate::metrics::{ModelMetrics, Timings, WorkerState};

pub use autoscale::AutoscaleRule;

/// The most workers one model version may run. Each worker may be a process holding a copy of the
/// model, so a typo in a scale request (`max_worker=100000`) must be refused, not obeyed: the
/// APIs and the configuration reject more, and the supervisor clamps as a last guard.
pub const MAX_WORKERS: u32 = 1024;

/// One part of a reply: streamed parts have `last == false`.
#[derive(Debug)]
pub struct ReplyPart {
    pub response: InferResponse,
    pub last: bool,
    pub timings: Timings,
}

/// How a reply arrives: whole, or as a stream whose further parts follow on the receiver.
#[derive(Debug)]
pub enum Reply {
    Whole(ReplyPart),
    Stream(ReplyPart, mpsc::UnboundedReceiver<ReplyPart>),
}

/// The receiving end of a queued request's reply.
pub type ReplyRx = oneshot::Receiver<Reply>;

/// The sending end: a oneshot for the common whole reply; a channel only once a stream starts.
struct ReplyTx {
    first: Option<oneshot::Sender<Reply>>,
    rest: Option<mpsc::UnboundedSender<ReplyPart>>,
}

impl ReplyTx {
    fn send(&mut self, part: ReplyPart) {
        match (self.first.take(), &self.rest) {
            (Some(first), _) if part.last => {
                let _ = first.send(Reply::Whole(part));
            }
            (Some(first), _) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = first.send(Reply::Stream(part, rx));
                self.rest = Some(tx);
            }
            (None, Some(rest)) => {
                let _ = rest.send(part);
            }
            (None, None) => {}
        }
    }

    /// Nobody reads the reply any more: the client went away (its HTTP request future, or the
    /// stream it was reading, was dropped). False once answered.
    fn abandoned(&self) -> bool {
        match (&self.first, &self.rest) {
            (Some(first), _) => first.is_closed(),
            (None, Some(rest)) => rest.is_closed(),
            (None, None) => false,
        }
    }
}

/// A request waiting for, or being served by, a worker.
pub struct Job {
    pub request: InferRequest,
    pub timings: Timings,
    /// Sequence batching: the session the job belongs to (set by the policy when it is queued).
    /// Every reply part carries it back in TorchServe's `ts_request_sequence_id` header, so a
    /// client that started a session learns its id from the first answer.
    pub sequence: Option<Arc<str>>,
    reply: Mutex<ReplyTx>,
}

impl Job {
    /// A job and the receiver its reply arrives on.
    pub fn new(request: InferRequest, timings: Timings) -> (Job, ReplyRx) {
        let (tx, rx) = oneshot::channel();
        let reply = ReplyTx {
            first: Some(tx),
            rest: None,
        };
        (
            Job {
                request,
                timings,
                sequence: None,
                reply: Mutex::new(reply),
            },
            rx,
        )
    }

    /// Adds the session's id header unless the handler set it already.
    fn tag(&self, response: &mut InferResponse) {
        if let Some(id) = &self.sequence {
            if !response
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(SEQUENCE_ID_HEADER))
            {
                response
                    .headers
                    .push((SEQUENCE_ID_HEADER.to_string(), id.to_string()));
            }
        }
    }

    /// Answers the job with its final reply.
    pub fn finish(self, mut response: InferResponse) {
        self.tag(&mut response);
        let timings = self.timings;
        self.reply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(ReplyPart {
                response,
                last: true,
                timings,
            });
    }

    /// Answers the job with a scheduling error.
    pub fn fail(self, error: &PoolError) {
        self.finish(error.response());
    }

    /// Whether the client went away before the reply was complete.
    fn abandoned(&self) -> bool {
        self.reply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abandoned()
    }

    /// Sends a streamed (not final) part.
    fn send_partial(&self, mut response: InferResponse) {
        self.tag(&mut response);
        self.reply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(ReplyPart {
                response,
                last: false,
                timings: self.timings,
            });
    }
}

impl Drop for Job {
    /// A job dropped unanswered (a bug, or a task torn down) still gets an answer, so no
    /// client waits forever and every counted request gets a counted response.
    fn drop(&mut self) {
        let reply = self.reply.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(first) = reply.first.take() {
            let _ = first.send(Reply::Whole(ReplyPart {
                response: PoolError::Dropped.response(),
                last: true,
                timings: self.timings,
            }));
        }
    }
}

/// Why the scheduler could not serve a request. The one place these become HTTP statuses and
/// TorchServe exception types is [`PoolError::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The queue holds job_queue_size requests (TorchServe's message, word for word).
    #[error("Model \"{0}\" has no worker to serve inference request. Please use scale workers API to add workers.")]
    QueueFull(String),
    /// The model version is being unregistered or the server is stopping.
    #[error("{0}")]
    Closed(String),
    /// The worker process died while serving the batch.
    #[error("Worker died: {0}")]
    WorkerDied(String),
    /// The backend did not answer within response_timeout; it is restarted.
    #[error("the worker did not answer within the response timeout ({0}s); it is restarted")]
    Timeout(u64),
    /// Async mode: one request got no reply part within response_timeout; the worker, busy
    /// with others, keeps running.
    #[error("the request was not answered within the response timeout ({0}s)")]
    RequestTimeout(u64),
    /// The backend panicked; it is replaced.
    #[error("the backend failed unexpectedly (panic: {0}); the worker is replaced")]
    Panicked(String),
    /// The backend answered a batch with the wrong number of replies.
    #[error("the backend returned {got} replies for a batch of {want} requests")]
    ReplyCount { got: usize, want: usize },
    /// A job was dropped without an answer (should not happen; answered rather than hung).
    #[error("the worker dropped the request without an answer")]
    Dropped,
    /// Sequence batching: the request names a session that cannot take it (a malformed id, or
    /// one that expired or was lost with its worker); the client starts a new one.
    #[error("{0}")]
    Sequence(String),
}

/// TorchServe's sequence headers (its `ts_header_key_sequence_*` defaults): the session id (set
/// on requests and replies), the mark of a new session (set on its first request), and the
/// reply header a handler sets to end sessions (ids separated by `;`).
pub const SEQUENCE_ID_HEADER: &str = "ts_request_sequence_id";
pub const SEQUENCE_START_HEADER: &str = "ts_request_sequence_start";
pub const SEQUENCE_END_HEADER: &str = "ts_request_sequence_end";

impl PoolError {
    /// TorchServe's exception type (and so the status) of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PoolError::QueueFull(_) | PoolError::Closed(_) | PoolError::WorkerDied(_) => {
                ErrorKind::ServiceUnavailable
            }
            // TorchServe answers a worker that missed its response timeout with 500 ("Worker
            // died.", test_auto_recover): the worker is killed and restarted, a server-side
            // failure rather than a slow client.
            PoolError::Timeout(_)
            | PoolError::Panicked(_)
            | PoolError::ReplyCount { .. }
            | PoolError::Dropped => ErrorKind::InternalServer,
            // Async mode only (oxserve's): one request timed out, its worker keeps serving.
            PoolError::RequestTimeout(_) => ErrorKind::RequestTimeout,
            PoolError::Sequence(_) => ErrorKind::BadRequest,
        }
    }

    /// The error as a reply in TorchServe's JSON shape.
    pub fn response(&self) -> InferResponse {
        InferResponse::error(self.kind(), &self.to_string())
    }
}

/// Why a request was not queued (the supervisor is gone). Queue-full and closing answers arrive
/// as the job's reply instead, so the caller answers every request the same way.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds job_queue_size requests.
    QueueFull,
    /// The model version is being unregistered.
    Closed,
}

/// Batching, timeout and autoscaling settings of one model version.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub batch_size: u32,
    pub max_batch_delay: Duration,
    pub queue_capacity: usize,
    pub response_timeout: Duration,
    pub startup_timeout: Duration,
    pub autoscale: AutoscaleRule,
    /// How requests reach the workers (classic batches or async).
    pub mode: BatchMode,
    /// `sequenceBatching: true`: stateful sessions pinned to one worker (with `mode` classic
    /// or continuous).
    pub sequence: Option<SequenceSettings>,
}

/// What a worker slot is doing. `Backoff` is a worker whose backend died or failed to load and
/// that waits to be started again: it has no process and serves nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    Starting,
    Ready,
    Busy,
    Backoff,
    Stopping,
}

impl WorkerStatus {
    /// The `oxserve_workers` gauge this status is counted in.
    pub fn gauge(self) -> WorkerState {
        match self {
            WorkerStatus::Starting => WorkerState::Starting,
            WorkerStatus::Ready => WorkerState::Ready,
            WorkerStatus::Busy => WorkerState::Busy,
            WorkerStatus::Backoff => WorkerState::Backoff,
            WorkerStatus::Stopping => WorkerState::Stopping,
        }
    }

    /// Whether the worker can serve requests now.
    pub fn live(self) -> bool {
        matches!(self, WorkerStatus::Ready | WorkerStatus::Busy)
    }
}

/// A worker as `describe` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub id: u32,
    /// The GPU the worker was given, -1 for none.
    pub gpu: i32,
    pub name: String,
    pub start_time: SystemTime,
    pub state: WorkerState,
    pub status: WorkerStatus,
    /// The process serving the model (the server's own for in-process backends); None while no
    /// backend is loaded.
    pub pid: Option<u32>,
}

/// The supervisor's state as it publishes it after each step.
#[derive(Debug, Clone, Default)]
pub struct PoolStatus {
    pub workers: Vec<WorkerInfo>,
    pub queue_len: usize,
    pub min_workers: u32,
    pub max_workers: u32,
    /// Why the latest model load failed; cleared by the next successful load.
    pub load_error: Option<String>,
    pub closed: bool,
    /// Every worker has exited after close; the supervisor is gone.
    pub stopped: bool,
}

impl PoolStatus {
    /// Workers that can serve now (ready or busy).
    pub fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.status.live()).count()
    }
}

/// A command to the supervisor.
enum Command {
    /// Boxed: a job is far larger than the other commands, and commands queue in a channel.
    Submit(Box<Job>),
    Scale {
        min: u32,
        max: u32,
        wait: bool,
        done: oneshot::Sender<usize>,
    },
    Describe(oneshot::Sender<PoolStatus>),
    Close(String),
}

/// What reaches the supervisor: commands from handles, events from its worker tasks.
enum Msg {
    Command(Command),
    Worker(runner::Event),
}

/// The handle side; the last one dropped closes the pool so its supervisor never outlives it.
struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    status: watch::Receiver<PoolStatus>,
    settings: PoolSettings,
    runtime: String,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Command(Command::Close(
            "the model version was dropped".into(),
        )));
    }
}

/// The pool of one model version: a handle to its supervisor task.
#[derive(Clone)]
pub struct Pool {
    handle: Arc<Handle>,
}

impl Pool {
    /// Creates an empty pool and starts its supervisor; call [`Pool::scale`] to start workers.
    /// `spec` is the template each worker's spec is made from (port and name are filled per
    /// worker). Must be called inside a tokio runtime.
    pub fn new(
        loader: Arc<dyn BackendLoader>,
        spec: Arc<ModelSpec>,
        settings: PoolSettings,
        metrics: Arc<ModelMetrics>,
        next_port: Arc<AtomicU32>,
    ) -> Pool {
        let (tx, rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(PoolStatus::default());
        let runtime = loader.runtime().to_string();
        let supervisor = supervisor::Supervisor::new(supervisor::Parts {
            loader,
            spec,
            settings: settings.clone(),
            metrics,
            next_port,
            tx: tx.clone(),
            status: status_tx,
        });
        tokio::spawn(supervisor.run(rx));
        Pool {
            handle: Arc::new(Handle {
                tx,
                status: status_rx,
                settings,
                runtime,
            }),
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.handle.settings
    }

    pub fn runtime(&self) -> String {
        self.handle.runtime.clone()
    }

    /// Sends a command; false when the supervisor is gone.
    fn send(&self, c: Command) -> bool {
        self.handle.tx.send(Msg::Command(c)).is_ok()
    }

    /// Queues a job. A full queue or a closing pool answers the job through its reply (503 in
    /// TorchServe's shape); Err only when the supervisor is already gone.
    pub fn submit(&self, mut job: Job) -> Result<(), SubmitError> {
        job.timings.enqueued = Some(Instant::now());
        match self
            .handle
            .tx
            .send(Msg::Command(Command::Submit(Box::new(job))))
        {
            Ok(()) => Ok(()),
            Err(returned) => {
                // Nobody reads this answer: the caller answers from the error. Answering keeps
                // the job's drop from reporting it as dropped.
                if let Msg::Command(Command::Submit(job)) = returned.0 {
                    job.fail(&PoolError::Closed("closed".into()));
                }
                Err(SubmitError::Closed)
            }
        }
    }

    /// The supervisor's state as of its latest step.
    pub fn status(&self) -> PoolStatus {
        self.handle.status.borrow().clone()
    }

    /// The supervisor's state once it has handled every command sent before this one.
    pub async fn describe(&self) -> PoolStatus {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Describe(tx)) {
            return self.status();
        }
        rx.await.unwrap_or_else(|_| self.status())
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.handle.status.borrow().queue_len
    }

    pub fn min_workers(&self) -> u32 {
        self.handle.status.borrow().min_workers
    }

    pub fn max_workers(&self) -> u32 {
        self.handle.status.borrow().max_workers
    }

    /// Every worker slot with its true state.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.handle.status.borrow().workers.clone()
    }

    /// Why the latest model load failed, if it did and no load has succeeded since.
    pub fn load_error(&self) -> Option<String> {
        self.handle.status.borrow().load_error.clone()
    }

    /// Workers that can serve now (ready or busy).
    pub fn live_workers(&self) -> usize {
        self.handle.status.borrow().live_workers()
    }

    /// (min_workers, live workers) read together, for `/ping`.
    pub fn health_counts(&self) -> (u32, usize) {
        let s = self.handle.status.borrow();
        (s.min_workers, s.live_workers())
    }

    /// Sets min/max workers and starts or stops workers to fit: fewer than `min` are topped up
    /// to `min`; more than `max` are cut to `max` (idle ones first). With `wait`, returns once
    /// the new workers are ready, a load failed with none serving, or the startup timeout
    /// passed; returns the number of workers then.
    pub async fn scale(&self, min: u32, max: u32, wait: bool) -> usize {
        let (tx, rx) = oneshot::channel();
        let c = Command::Scale {
            min,
            max,
            wait,
            done: tx,
        };
        if !self.send(c) {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Stops accepting requests, answers every queued one with `reason` (503), and stops all
    /// workers once their current batch is done.
    pub fn close(&self, reason: &str) {
        self.send(Command::Close(reason.to_string()));
    }

    /// Waits until every worker has exited (after [`Pool::close`]), at most `limit`.
    pub async fn wait_stopped(&self, limit: Duration) {
        let mut rx = self.handle.status.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.stopped)).await;
    }
}

/// TorchServe's GPU assignment: workers take GPUs round robin in the order they are created.
fn gpu_for(port: u32, first_port: u32, gpus: u32) -> i32 {
    if gpus == 0 {
        -1
    } else {
        (port.saturating_sub(first_port) % gpus) as i32
    }
}

#[cfg(test)]
mod tests;
