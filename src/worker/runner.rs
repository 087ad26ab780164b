//! One worker task: one incarnation of a backend, from load to exit.
//!
//! The task loads its backend, then serves the batches the supervisor sends until the
//! supervisor drops its sender (stop) or the backend dies. It reports each step as an [`Event`];
//! the supervisor, not the task, decides about restarts, so backoff and slot state live in one
//! place. Every backend call runs under `catch_unwind`: a panic answers the batch with a 500 and
//! ends the incarnation like a crash (TorchServe's Java worker thread would die silently
//! instead and leave its requests hanging).

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::mpsc;

use super::{BatchMode, Job, Msg, PoolError};
use crate::backend::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, Part, StreamSink,
    WorkerSpec, NO_RESPONSE,
};
use crate::metrics::ModelMetrics;

/// What a worker task tells its supervisor.
#[derive(Debug)]
pub(super) enum Event {
    /// The backend is loaded; `pid` is the process serving it.
    Loaded { slot: u32, pid: u32 },
    /// The worker answered `n` jobs and can take more; `seq` names the sessions involved
    /// (sequence batching only, else empty).
    Released { slot: u32, n: usize, seq: SeqNotes },
    /// The incarnation is over: stopped (None) or failed (why).
    Exited { slot: u32, failure: Option<Failure> },
}

/// Why an incarnation ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The model never loaded.
    Load(String),
    /// The backend died, hung or panicked after loading.
    Died(String),
}

/// Sequence batching: what answered jobs tell the policy. Empty (no allocation) for jobs
/// without a session.
#[derive(Debug, Default)]
pub(super) struct SeqNotes {
    /// The session of each answered job.
    pub done: Vec<Arc<str>>,
    /// Values of `ts_request_sequence_end` reply headers: sessions the handler ended.
    pub ended: Vec<String>,
}

impl SeqNotes {
    /// Notes a reply part of `job` (final when `last`).
    fn note(&mut self, job: &Job, response: &InferResponse, last: bool) {
        let Some(id) = &job.sequence else { return };
        if last {
            self.done.push(id.clone());
        }
        for (k, v) in &response.headers {
            if k.eq_ignore_ascii_case(super::SEQUENCE_END_HEADER) {
                self.ended.push(v.clone());
            }
        }
    }
}

/// What the supervisor sends a worker task.
pub(super) type Batch = Vec<Job>;

/// Everything one worker task needs.
pub(super) struct Runner {
    pub slot: u32,
    pub mode: BatchMode,
    pub spec: WorkerSpec,
    pub loader: Arc<dyn BackendLoader>,
    pub metrics: Arc<ModelMetrics>,
    pub events: mpsc::UnboundedSender<Msg>,
    /// Response timeouts of this model version since its last answered batch (TorchServe's
    /// "consecutive unsuccessful inference" count, which its logs and tests show).
    pub failed_inferences: Arc<AtomicU32>,
}

/// A panic's message, for logs and the 500 answer.
fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}

impl Runner {
    /// TorchServe's lines for a worker that missed its response timeout, which its
    /// test_auto_recover and operators grep.
    fn log_timeout(&self, limit: Duration) {
        let n = self.failed_inferences.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(worker = %self.spec.name, "Number or consecutive unsuccessful inference {n}");
        tracing::error!(
            worker = %self.spec.name,
            "Backend worker error: {NO_RESPONSE} ({}s); the worker is restarted",
            limit.as_secs()
        );
    }

    fn report(&self, e: Event) {
        // The supervisor outlives its workers; if it is gone there is nobody left to tell.
        let _ = self.events.send(Msg::Worker(e));
    }

    pub(super) async fn run(self, mut batches: mpsc::UnboundedReceiver<Batch>) {
        let slot = self.slot;
        let started = Instant::now();
        let load = AssertUnwindSafe(self.loader.load(&self.spec)).catch_unwind();
        let loaded = tokio::time::timeout(self.spec.model.startup_timeout, load).await;
        let mut backend = match loaded {
            Ok(Ok(Ok(b))) => b,
            Ok(Ok(Err(e))) => return self.exit(Failure::Load(format!("model load failed: {e}"))),
            Ok(Err(p)) => {
                let why = format!("model load panicked: {}", panic_message(&*p));
                return self.exit(Failure::Load(why));
            }
            Err(_) => {
                let why = format!(
                    "{NO_RESPONSE}: model load timed out after {:?}",
                    self.spec.model.startup_timeout
                );
                return self.exit(Failure::Load(why));
            }
        };
        self.spec
            .model
            .metrics
            .worker_load_time(&self.spec.name)
            .set(started.elapsed().as_millis() as f64);
        let pid = backend.pid().unwrap_or_else(std::process::id);
        tracing::info!(worker = %self.spec.name, "worker ready in {:?}", started.elapsed());
        self.report(Event::Loaded { slot, pid });
        let mut failure = None;
        if self.mode == BatchMode::Async && backend.is_async() {
            failure = self.run_async(&mut backend, &mut batches).await.err();
        } else if self.mode == BatchMode::Continuous && backend.can_step() {
            failure = self.run_continuous(&mut backend, &mut batches).await.err();
        } else {
            // An async policy may hand a backend without an async mode more than batch_size
            // jobs at once (`asyncCommunication` on a built-in or ONNX model): it gets them in
            // batches of at most batch_size, one after another.
            let most = self.spec.model.batch_size.max(1) as usize;
            'serve: while let Some(mut batch) = batches.recv().await {
                while !batch.is_empty() {
                    let rest = batch.split_off(most.min(batch.len()));
                    let chunk = std::mem::replace(&mut batch, rest);
                    let n = chunk.len();
                    match self.run_batch(&mut backend, chunk).await {
                        Ok(seq) => self.report(Event::Released { slot, n, seq }),
                        Err(died) => {
                            let why = died.to_string();
                            let e = PoolError::WorkerDied(why.clone());
                            for job in batch.drain(..) {
                                job.fail(&e);
                            }
                            failure = Some(Failure::Died(why));
                            break 'serve;
                        }
                    }
                }
            }
        }
        // A panicking backend may panic again on the way out; it is dropped either way, and
        // dropping kills its process (python.rs), so nothing is orphaned.
        if AssertUnwindSafe(backend.shutdown())
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(worker = %self.spec.name, "backend panicked while shutting down");
        }
        match failure {
            Some(f) => self.exit(f),
            None => {
                self.report(Event::Exited {
                    slot,
                    failure: None,
                });
            }
        }
    }

    /// Async mode: sends each batch as it arrives while replies of earlier ones come back, in
    /// any order, matched by request id. A failed request answers only itself (TorchServe's
    /// frontend sends one request's error to every job in flight on the worker). Each request
    /// has `response_timeout` from its latest reply part: past it, it alone answers 408 and a
    /// late reply is ignored. A request whose client went away is cancelled in the worker when
    /// the backend can ([`Backend::can_cancel`]): noticed when its next streamed part finds no
    /// reader, or by a sweep every [`CANCEL_SWEEP`] (a whole reply's waiter); it stays in flight
    /// until the worker's final answer. Returns when the supervisor stopped the worker and every
    /// request in flight is answered (Ok), or when the backend died (every one in flight answers
    /// 503).
    async fn run_async(
        &self,
        backend: &mut Box<dyn Backend>,
        batches: &mut mpsc::UnboundedReceiver<Batch>,
    ) -> Result<(), Failure> {
        let slot = self.slot;
        let timeout = self.spec.model.response_timeout;
        let chunk = (self.spec.model.batch_size.max(1)) as usize;
        let can_cancel = backend.can_cancel();
        let mut flying: HashMap<String, Flying> = HashMap::new();
        let mut open = true;
        let mut next_sweep = tokio::time::Instant::now() + CANCEL_SWEEP;
        let died = |flying: &mut HashMap<String, Flying>, why: String| {
            let e = PoolError::WorkerDied(why);
            for (_, f) in flying.drain() {
                f.job.fail(&e);
            }
            Err(Failure::Died(e.to_string()))
        };
        loop {
            if !open && flying.is_empty() {
                return Ok(());
            }
            let next_expiry = flying.values().map(|f| f.deadline).min();
            let wake = match next_expiry {
                Some(t) if can_cancel => Some(t.min(next_sweep)),
                other => other,
            };
            let mut gone: Vec<String> = Vec::new();
            tokio::select! {
                batch = batches.recv(), if open => {
                    let Some(mut jobs) = batch else {
                        open = false;
                        continue;
                    };
                    let now = Instant::now();
                    let deadline = super::policy::later(tokio::time::Instant::now(), timeout);
                    while !jobs.is_empty() {
                        let rest = jobs.split_off(chunk.min(jobs.len()));
                        let mut requests = Vec::with_capacity(jobs.len());
                        for mut job in std::mem::replace(&mut jobs, rest) {
                            job.timings.batch_start = Some(now);
                            job.timings.backend_start = Some(now);
                            let mut request = std::mem::take(&mut job.request);
                            request.id = unique_id(&flying, request.id);
                            flying.insert(request.id.clone(), Flying { job, deadline, cancelled: false });
                            requests.push(request);
                        }
                        self.metrics.batch_size.observe(requests.len() as f64);
                        let sent = AssertUnwindSafe(backend.send(&requests)).catch_unwind().await;
                        match sent {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return died(&mut flying, e.to_string()),
                            Err(p) => return died(&mut flying, format!("panic: {}", panic_message(&*p))),
                        }
                    }
                }
                parts = AssertUnwindSafe(backend.recv()).catch_unwind(), if !flying.is_empty() => {
                    let parts = match parts {
                        Ok(Ok(parts)) => parts,
                        Ok(Err(e)) => return died(&mut flying, e.to_string()),
                        Err(p) => return died(&mut flying, format!("panic: {}", panic_message(&*p))),
                    };
                    let mut released = 0;
                    for Part { id, response, last } in parts {
                        if last {
                            let Some(Flying { mut job, .. }) = flying.remove(&id) else {
                                tracing::warn!(worker = %self.spec.name, request_id = %id, "reply for a request not in flight (timed out?) ignored");
                                continue;
                            };
                            let end = Instant::now();
                            job.timings.backend_end = Some(end);
                            if let Some(start) = job.timings.backend_start {
                                self.metrics.backend_duration.observe((end - start).as_secs_f64());
                            }
                            job.finish(response);
                            released += 1;
                        } else if let Some(f) = flying.get_mut(&id) {
                            f.deadline = super::policy::later(tokio::time::Instant::now(), timeout);
                            f.job.send_partial(response);
                            if can_cancel && f.newly_gone() {
                                gone.push(id);
                            }
                        }
                    }
                    if released > 0 {
                        self.report(Event::Released { slot, n: released, seq: SeqNotes::default() });
                    }
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(tokio::time::Instant::now)), if wake.is_some() => {
                    let now = tokio::time::Instant::now();
                    let expired: Vec<String> = flying.iter().filter(|(_, f)| f.deadline <= now).map(|(id, _)| id.clone()).collect();
                    let e = PoolError::RequestTimeout(timeout.as_secs());
                    for id in &expired {
                        if let Some(f) = flying.remove(id) {
                            tracing::warn!(worker = %self.spec.name, request_id = %id, "{e}");
                            f.job.fail(&e);
                        }
                    }
                    if !expired.is_empty() {
                        self.report(Event::Released { slot, n: expired.len(), seq: SeqNotes::default() });
                    }
                    if can_cancel && now >= next_sweep {
                        next_sweep = now + CANCEL_SWEEP;
                        gone.extend(flying.iter_mut().filter_map(|(id, f)| f.newly_gone().then(|| id.clone())));
                    }
                }
            }
            if !gone.is_empty() {
                tracing::info!(worker = %self.spec.name, requests = gone.len(), "client gone: cancelling {}", gone.join(", "));
                match AssertUnwindSafe(backend.cancel(&gone)).catch_unwind().await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return died(&mut flying, e.to_string()),
                    Err(p) => return died(&mut flying, format!("panic: {}", panic_message(&*p))),
                }
            }
        }
    }

    /// Continuous batching (TorchServe's ContinuousBatching): each step sends one inference
    /// message with every running job (those already in the worker "cached": headers only, no
    /// parameters, as TorchServe encodes them) plus the new ones, and reads one reply frame. A
    /// part with `ts_stream_next: true` keeps its job running; a final part answers it and
    /// frees its slot, which the policy refills before the next step. A step that takes longer
    /// than `response_timeout` or a broken connection fails every running job (503 / 408) and
    /// the worker is restarted.
    async fn run_continuous(
        &self,
        backend: &mut Box<dyn Backend>,
        batches: &mut mpsc::UnboundedReceiver<Batch>,
    ) -> Result<(), Failure> {
        let slot = self.slot;
        let limit = self.spec.model.response_timeout;
        let mut running: Vec<Running> = Vec::new();
        let mut open = true;
        // Jobs released in the last step: the supervisor answers with their refill.
        let mut refill_due = false;
        let fail_all = |running: &mut Vec<Running>, e: PoolError| {
            for (_, _, job) in running.drain(..) {
                job.fail(&e);
            }
            Err(Failure::Died(e.to_string()))
        };
        loop {
            let mut fresh: Vec<Job> = Vec::new();
            if running.is_empty() && !refill_due {
                match batches.recv().await {
                    Some(b) => fresh = b,
                    None => return Ok(()),
                }
            } else if refill_due && open {
                match batches.recv().await {
                    Some(b) => fresh = b,
                    None => open = false,
                }
            }
            refill_due = false;
            if running.is_empty() && fresh.is_empty() {
                if open {
                    continue;
                }
                return Ok(());
            }
            while open {
                match batches.try_recv() {
                    Ok(b) => fresh.extend(b),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let mut requests: Vec<InferRequest> = running
                .iter()
                .map(|(id, headers, _)| InferRequest {
                    id: id.clone(),
                    headers: headers.clone(),
                    params: Vec::new(),
                })
                .collect();
            let now = Instant::now();
            for mut job in fresh {
                job.timings.batch_start = Some(now);
                job.timings.backend_start = Some(now);
                let mut request = std::mem::take(&mut job.request);
                let mut id = request.id.clone();
                let mut n = 2;
                while running.iter().any(|(r, _, _)| *r == id) {
                    id = format!("{}#{n}", request.id);
                    n += 1;
                }
                request.id = id.clone();
                running.push((id, request.headers.clone(), job));
                requests.push(request);
            }
            self.metrics.batch_size.observe(requests.len() as f64);
            let step = async {
                backend.send(&requests).await?;
                backend.recv().await
            };
            let parts =
                match tokio::time::timeout(limit, AssertUnwindSafe(step).catch_unwind()).await {
                    Ok(Ok(Ok(parts))) => parts,
                    Ok(Ok(Err(e))) => {
                        return fail_all(&mut running, PoolError::WorkerDied(e.to_string()))
                    }
                    Ok(Err(p)) => {
                        return fail_all(&mut running, PoolError::Panicked(panic_message(&*p)))
                    }
                    Err(_) => {
                        self.log_timeout(limit);
                        return fail_all(&mut running, PoolError::Timeout(limit.as_secs()));
                    }
                };
            let mut released = 0;
            let mut seq = SeqNotes::default();
            for Part { id, response, last } in parts {
                let Some(i) = running.iter().position(|(r, _, _)| *r == id) else {
                    let e = PoolError::WorkerDied(format!(
                        "the worker answered unknown request id {id:?}"
                    ));
                    return fail_all(&mut running, e);
                };
                if last {
                    let (_, _, mut job) = running.remove(i);
                    seq.note(&job, &response, true);
                    job.timings.backend_end = Some(Instant::now());
                    job.finish(response);
                    released += 1;
                } else {
                    seq.note(&running[i].2, &response, false);
                    running[i].2.send_partial(response);
                }
            }
            if released > 0 || !seq.ended.is_empty() {
                self.report(Event::Released {
                    slot,
                    n: released,
                    seq,
                });
                refill_due = released > 0;
            }
        }
    }

    fn exit(&self, f: Failure) {
        self.report(Event::Exited {
            slot: self.slot,
            failure: Some(f),
        });
    }

    /// Runs one batch and answers its jobs; returns what the answers tell a sequence policy.
    /// Err means the backend is unusable.
    async fn run_batch(
        &self,
        backend: &mut Box<dyn Backend>,
        mut jobs: Vec<Job>,
    ) -> Result<SeqNotes, PoolError> {
        let mut seq = SeqNotes::default();
        let metrics = &self.metrics;
        // One reading for the batch's start and the backend's, as in the other modes: between
        // them the requests are only moved out of their jobs.
        let start = Instant::now();
        for job in &mut jobs {
            job.timings.batch_start = Some(start);
            job.timings.backend_start = Some(start);
        }
        metrics.batch_size.observe(jobs.len() as f64);
        let requests: Vec<InferRequest> = jobs
            .iter_mut()
            .map(|j| std::mem::take(&mut j.request))
            .collect();
        let result = {
            let sink = BatchSink { jobs: &jobs };
            let infer = AssertUnwindSafe(backend.infer(&requests, &sink)).catch_unwind();
            within(self.spec.model.response_timeout, infer).await
        };
        let backend_end = Instant::now();
        let backend_time = backend_end - start;
        metrics.backend_duration.observe(backend_time.as_secs_f64());
        if !backend.reports_handler_metrics() {
            let ms = (backend_time.as_secs_f64() * 100_000.0).round() / 100.0;
            metrics.handler_time.set(ms);
            metrics.prediction_time.set(ms);
        }
        for job in &mut jobs {
            job.timings.backend_end = Some(backend_end);
        }
        let n = jobs.len();
        let fail_all = |jobs: Vec<Job>, e: &PoolError| {
            for job in jobs {
                job.fail(e);
            }
        };
        let outcome = match result {
            Ok(Ok(Ok(responses))) if responses.len() == n => {
                for (job, response) in jobs.into_iter().zip(responses) {
                    seq.note(&job, &response, true);
                    job.finish(response);
                }
                Ok(seq)
            }
            Ok(Ok(Ok(responses))) => {
                let e = PoolError::ReplyCount {
                    got: responses.len(),
                    want: n,
                };
                seq.done
                    .extend(jobs.iter().filter_map(|j| j.sequence.clone()));
                fail_all(jobs, &e);
                Ok(seq)
            }
            Ok(Ok(Err(BackendError::Failed { status, message }))) => {
                for job in jobs {
                    let response = InferResponse::from(crate::error::ApiError::with_status(
                        status,
                        crate::error::ErrorKind::InternalServer,
                        &message,
                    ));
                    seq.note(&job, &response, true);
                    job.finish(response);
                }
                Ok(seq)
            }
            Ok(Ok(Err(e @ (BackendError::Died(_) | BackendError::Load(_))))) => {
                let e = PoolError::WorkerDied(e.to_string());
                fail_all(jobs, &e);
                Err(e)
            }
            Ok(Err(p)) => {
                let e = PoolError::Panicked(panic_message(&*p));
                tracing::error!(worker = %self.spec.name, "{e}");
                fail_all(jobs, &e);
                Err(e)
            }
            Err(_) => {
                self.log_timeout(self.spec.model.response_timeout);
                let e = PoolError::Timeout(self.spec.model.response_timeout.as_secs());
                fail_all(jobs, &e);
                Err(e)
            }
        };
        let frontend = start.elapsed().saturating_sub(backend_time);
        self.spec
            .model
            .metrics
            .host
            .worker_thread_time
            .set(frontend.as_millis() as f64);
        outcome
    }
}

/// `fut` under a time limit whose timer is armed only if the first poll does not finish it.
/// The built-in demo model answers on its first poll; registering a timer in tokio's wheel and
/// removing it again per batch showed in the request path's profile. Others (ONNX on the
/// blocking pool, Python workers) return Pending there, and their limit runs from the first
/// poll's end, microseconds after the batch was sent.
async fn within<F: std::future::Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    match std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await {
        std::task::Poll::Ready(out) => Ok(out),
        std::task::Poll::Pending => tokio::time::timeout(limit, fut).await,
    }
}

/// A job in a continuous batch: its id as sent, its headers (resent with every step), the job.
type Running = (String, Vec<(String, String)>, Job);

/// A job in flight on an async backend.
struct Flying {
    job: Job,
    /// When it answers 408 unless another reply part comes first.
    deadline: tokio::time::Instant,
    /// Its client went away and the backend was told to stop it.
    cancelled: bool,
}

impl Flying {
    /// Whether its client has gone away since the last look: then it is marked cancelled, so
    /// that the backend is told once.
    fn newly_gone(&mut self) -> bool {
        if self.cancelled || !self.job.abandoned() {
            return false;
        }
        self.cancelled = true;
        true
    }
}

/// How often async mode looks for requests in flight whose client went away without a streamed
/// part telling it (a client waiting for a whole reply).
const CANCEL_SWEEP: Duration = Duration::from_secs(1);

/// `id`, or `id#2`, `id#3`, ... when a request with that id is already in flight on this worker:
/// replies are matched by id, and clients choose their own `x-request-id`.
fn unique_id<V>(flying: &HashMap<String, V>, id: String) -> String {
    if !flying.contains_key(&id) {
        return id;
    }
    (2u64..)
        .map(|n| format!("{id}#{n}"))
        .find(|c| !flying.contains_key(c))
        .unwrap_or(id)
}

/// Forwards a backend's streamed parts to the jobs of the current batch.
struct BatchSink<'a> {
    jobs: &'a [Job],
}

impl StreamSink for BatchSink<'_> {
    fn send_partial(&self, index: usize, part: InferResponse) {
        if let Some(job) = self.jobs.get(index) {
            job.send_partial(part);
        }
    }
}

/// The first restart delay, and the most a restart ever waits.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);
