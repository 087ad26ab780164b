//! Per-model-version worker pools: a bounded queue, batching, live scaling and supervision.
//!
//! Requests wait in one bounded queue per model version. Each worker is a task that owns one
//! [`Backend`]; when idle it takes the oldest request, keeps collecting until the batch is full or
//! `max_batch_delay` has passed since it took the first one, and hands the batch to its backend.
//! Scaling down marks workers as stopping: they finish their batch and never take another, so a
//! queued request is never lost. A worker whose backend dies fails its batch with a 5xx, then loads
//! again with exponential backoff.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::backend::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, StreamSink, WorkerSpec,
};
use crate::metrics::{ModelMetrics, Timings, WorkerState};

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
}

/// A request waiting for, or being served by, a worker.
pub struct Job {
    pub request: InferRequest,
    pub timings: Timings,
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
                reply: Mutex::new(reply),
            },
            rx,
        )
    }

    fn finish(self, response: InferResponse) {
        let timings = self.timings;
        self.reply
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .send(ReplyPart {
                response,
                last: true,
                timings,
            });
    }
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds job_queue_size requests.
    QueueFull,
    /// The model version is being unregistered.
    Closed,
}

/// Batching and timeout settings of one model version.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub batch_size: u32,
    pub max_batch_delay: Duration,
    pub queue_capacity: usize,
    pub response_timeout: Duration,
    pub startup_timeout: Duration,
}

/// A worker as `describe` shows it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: u32,
    /// The GPU the worker was given, -1 for none.
    pub gpu: i32,
    pub name: String,
    pub start_time: SystemTime,
    pub state: WorkerState,
    pub pid: Option<u32>,
}

struct WorkerSlot {
    id: u32,
    gpu: i32,
    name: String,
    start_time: SystemTime,
    state: Arc<AtomicU8>,
    pid: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    /// Wakes idle workers when a job arrives or a worker is told to stop.
    notify: Notify,
    closed: AtomicBool,
    settings: PoolSettings,
    loader: Arc<dyn BackendLoader>,
    spec: WorkerSpec,
    metrics: Arc<ModelMetrics>,
    workers: Mutex<Vec<WorkerSlot>>,
    min_workers: AtomicU32,
    max_workers: AtomicU32,
    next_port: Arc<AtomicU32>,
    /// Notified when a worker starts, finishes loading, fails to load, stops or exits.
    state_changed: Notify,
    /// Why the latest model load failed; cleared by the next successful load.
    load_error: Mutex<Option<String>>,
}

/// The pool of one model version.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// Creates an empty pool; call [`Pool::scale`] to start workers. `spec` is the template each
    /// worker's spec is made from (port and name are filled per worker).
    pub fn new(
        loader: Arc<dyn BackendLoader>,
        spec: WorkerSpec,
        settings: PoolSettings,
        metrics: Arc<ModelMetrics>,
        next_port: Arc<AtomicU32>,
    ) -> Pool {
        metrics.queue_capacity.set(settings.queue_capacity as f64);
        metrics.queue_depth.set(0.0);
        Pool {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::with_capacity(settings.queue_capacity.min(1024))),
                notify: Notify::new(),
                closed: AtomicBool::new(false),
                settings,
                loader,
                spec,
                metrics,
                workers: Mutex::new(Vec::new()),
                min_workers: AtomicU32::new(0),
                max_workers: AtomicU32::new(0),
                next_port,
                state_changed: Notify::new(),
                load_error: Mutex::new(None),
            }),
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.shared.settings
    }

    pub fn runtime(&self) -> String {
        self.shared.loader.runtime().to_string()
    }

    /// Queues a job, or says why not (the job is dropped; the caller answers the request).
    pub fn submit(&self, mut job: Job) -> Result<(), SubmitError> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(SubmitError::Closed);
        }
        {
            let mut q = s.queue.lock().unwrap();
            if q.len() >= s.settings.queue_capacity {
                return Err(SubmitError::QueueFull);
            }
            job.timings.enqueued = Some(Instant::now());
            q.push_back(job);
            s.metrics.queue_depth.set(q.len() as f64);
        }
        s.notify.notify_one();
        Ok(())
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.shared.queue.lock().unwrap().len()
    }

    pub fn min_workers(&self) -> u32 {
        self.shared.min_workers.load(Ordering::Relaxed)
    }

    pub fn max_workers(&self) -> u32 {
        self.shared.max_workers.load(Ordering::Relaxed)
    }

    /// Workers not told to stop.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared
            .workers
            .lock()
            .unwrap()
            .iter()
            .map(|w| WorkerInfo {
                id: w.id,
                gpu: w.gpu,
                name: w.name.clone(),
                start_time: w.start_time,
                state: state_from(w.state.load(Ordering::Relaxed)),
                pid: Some(w.pid.load(Ordering::Relaxed)).filter(|p| *p != 0),
            })
            .collect()
    }

    /// Why the latest model load failed, if it did and no load has succeeded since.
    pub fn load_error(&self) -> Option<String> {
        self.shared.load_error.lock().unwrap().clone()
    }

    /// Workers that can serve now (ready or busy).
    pub fn live_workers(&self) -> usize {
        self.workers()
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
            .count()
    }

    /// Sets min/max workers and starts or stops workers to fit: fewer than `min` running are topped
    /// up to `min`; more than `max` are cut to `max` (idle ones first). With `wait`, returns once the
    /// new workers are ready or the startup timeout passes; returns the number of workers then.
    pub async fn scale(&self, min: u32, max: u32, wait: bool) -> usize {
        let s = &self.shared;
        s.min_workers.store(min, Ordering::Relaxed);
        s.max_workers.store(max, Ordering::Relaxed);
        s.metrics.workers_min.set(f64::from(min));
        s.metrics.workers_max.set(f64::from(max));
        let running = {
            let workers = s.workers.lock().unwrap();
            let running = workers
                .iter()
                .filter(|w| !w.stop.load(Ordering::Relaxed))
                .count() as u32;
            if running > max {
                // Stop the surplus, idle workers first, then the newest.
                let mut order: Vec<usize> = (0..workers.len())
                    .filter(|&i| !workers[i].stop.load(Ordering::Relaxed))
                    .collect();
                order.sort_by_key(|&i| {
                    let busy =
                        state_from(workers[i].state.load(Ordering::Relaxed)) == WorkerState::Busy;
                    (busy, std::cmp::Reverse(workers[i].id))
                });
                for &i in order.iter().take((running - max) as usize) {
                    workers[i].stop.store(true, Ordering::Release);
                    s.transition(&workers[i].state, WorkerState::Stopping);
                }
            }
            running
        };
        if running > max {
            s.notify.notify_waiters();
        }
        for _ in running..min {
            self.spawn_worker();
        }
        if wait {
            let deadline = Instant::now() + s.settings.startup_timeout;
            loop {
                let notified = s.state_changed.notified();
                let workers = self.workers();
                let settled = workers
                    .iter()
                    .all(|w| !matches!(w.state, WorkerState::Starting | WorkerState::Stopping));
                // A load that failed while nothing serves yet will not fix itself by waiting.
                let failed = s.load_error.lock().unwrap().is_some()
                    && !workers
                        .iter()
                        .any(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy));
                if settled || failed || Instant::now() >= deadline {
                    return workers.len();
                }
                let _ = tokio::time::timeout_at(deadline.into(), notified).await;
            }
        }
        self.workers()
            .iter()
            .filter(|w| w.state != WorkerState::Stopping)
            .count()
    }

    /// Stops accepting requests, answers every queued one with `reason`, and stops all workers
    /// once their current batch is done.
    pub fn close(&self, reason: &str) {
        let s = &self.shared;
        s.closed.store(true, Ordering::Release);
        let drained: Vec<Job> = s.queue.lock().unwrap().drain(..).collect();
        s.metrics.queue_depth.set(0.0);
        for job in drained {
            job.finish(InferResponse::error(
                503,
                "ServiceUnavailableException",
                reason,
            ));
        }
        for w in s.workers.lock().unwrap().iter() {
            w.stop.store(true, Ordering::Release);
            s.transition(&w.state, WorkerState::Stopping);
        }
        s.notify.notify_waiters();
    }

    /// Waits until every worker has exited (after [`Pool::close`]), at most `limit`.
    pub async fn wait_stopped(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.shared.state_changed.notified();
            if self.shared.workers.lock().unwrap().is_empty() || Instant::now() >= deadline {
                return;
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }

    fn spawn_worker(&self) {
        let s = &self.shared;
        let port = s.next_port.fetch_add(1, Ordering::Relaxed);
        let name = format!("W-{port}-{}_{}", s.spec.model_name, s.spec.model_version);
        let gpu = gpu_for(
            port,
            s.spec.settings.initial_worker_port,
            s.spec.settings.number_of_gpu.unwrap_or(0),
        );
        let slot = WorkerSlot {
            gpu,
            id: port,
            name: name.clone(),
            start_time: SystemTime::now(),
            state: Arc::new(AtomicU8::new(WorkerState::Starting as u8)),
            pid: Arc::new(AtomicU32::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let mut spec = s.spec.clone();
        spec.port = port;
        spec.name = name;
        spec.gpu_id = gpu_for(
            port,
            spec.settings.initial_worker_port,
            spec.settings.number_of_gpu.unwrap_or(0),
        );
        let worker = Worker {
            pool: self.clone(),
            spec,
            state: slot.state.clone(),
            pid: slot.pid.clone(),
            stop: slot.stop.clone(),
        };
        s.workers.lock().unwrap().push(slot);
        s.count(WorkerState::Starting, 1);
        tokio::spawn(worker.run());
    }

    fn remove_worker(&self, port: u32) {
        let s = &self.shared;
        let mut workers = s.workers.lock().unwrap();
        if let Some(i) = workers.iter().position(|w| w.id == port) {
            let gone = workers.remove(i);
            s.count(state_from(gone.state.load(Ordering::Acquire)), -1);
        }
        drop(workers);
        s.state_changed.notify_waiters();
    }
}

impl Shared {
    /// Moves a worker to `new` (a stopping worker stays stopping) and updates the state gauges.
    fn transition(&self, state: &AtomicU8, new: WorkerState) {
        let mut current = state.load(Ordering::Acquire);
        loop {
            if current == new as u8 || current == WorkerState::Stopping as u8 {
                return;
            }
            match state.compare_exchange(current, new as u8, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        let old = state_from(current);
        self.count(old, -1);
        self.count(new, 1);
        // Busy <-> ready flips happen per batch; only start-up and stopping concern scale waiters.
        if matches!(old, WorkerState::Starting) || matches!(new, WorkerState::Stopping) {
            self.state_changed.notify_waiters();
        }
    }

    /// The per-state gauges are the counts themselves: atomic adds keep them exact under races.
    fn count(&self, st: WorkerState, delta: i64) {
        self.metrics.add_workers(st, delta);
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

fn state_from(v: u8) -> WorkerState {
    match v {
        0 => WorkerState::Starting,
        1 => WorkerState::Ready,
        2 => WorkerState::Busy,
        _ => WorkerState::Stopping,
    }
}

/// One worker task.
struct Worker {
    pool: Pool,
    spec: WorkerSpec,
    state: Arc<AtomicU8>,
    pid: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

/// Forwards a backend's streamed parts to the jobs of the current batch.
struct BatchSink<'a> {
    jobs: &'a [Job],
}

impl StreamSink for BatchSink<'_> {
    fn send_partial(&self, index: usize, part: InferResponse) {
        if let Some(job) = self.jobs.get(index) {
            job.reply
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(ReplyPart {
                    response: part,
                    last: false,
                    timings: job.timings,
                });
        }
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Worker {
    fn set_state(&self, st: WorkerState) {
        self.pool.shared.transition(&self.state, st);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    async fn run(self) {
        let metrics = self.spec.metrics.clone();
        let mut backoff = Duration::from_millis(500);
        while !self.stopping() {
            self.set_state(WorkerState::Starting);
            let started = Instant::now();
            let loaded = tokio::time::timeout(
                self.spec.startup_timeout,
                self.pool.shared.loader.load(&self.spec),
            )
            .await;
            let failure = match loaded {
                Ok(Ok(b)) => Ok(b),
                Ok(Err(e)) => Err(format!("model load failed: {e}")),
                Err(_) => Err(format!(
                    "model load timed out after {:?}",
                    self.spec.startup_timeout
                )),
            };
            let mut backend = match failure {
                Ok(b) => {
                    *self.pool.shared.load_error.lock().unwrap() = None;
                    b
                }
                Err(why) => {
                    tracing::error!(worker = %self.spec.name, "{why}; retrying in {backoff:?}");
                    *self.pool.shared.load_error.lock().unwrap() = Some(why);
                    self.pool.shared.state_changed.notify_waiters();
                    self.sleep_unless_stopped(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            metrics
                .worker_load_time(&self.spec.name)
                .set(started.elapsed().as_millis() as f64);
            self.pid
                .store(backend.pid().unwrap_or(0), Ordering::Relaxed);
            self.set_state(WorkerState::Ready);
            tracing::info!(worker = %self.spec.name, "worker ready in {:?}", started.elapsed());
            let died = self.serve(&mut backend).await;
            backend.shutdown().await;
            self.pid.store(0, Ordering::Relaxed);
            match died {
                Some(reason) => {
                    tracing::warn!(worker = %self.spec.name, "worker restarting in {backoff:?}: {reason}");
                    self.sleep_unless_stopped(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                None => break,
            }
        }
        metrics.forget_worker(&self.spec.name);
        self.pool.remove_worker(self.spec.port);
        tracing::info!(worker = %self.spec.name, "worker stopped");
    }

    async fn sleep_unless_stopped(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while !self.stopping() && Instant::now() < deadline {
            let notified = self.pool.shared.notify.notified();
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }

    /// Serves batches until told to stop (returns None) or the backend dies (returns why).
    async fn serve(&self, backend: &mut Box<dyn Backend>) -> Option<String> {
        loop {
            let batch = self.next_batch().await?;
            self.set_state(WorkerState::Busy);
            let outcome = self.run_batch(backend, batch).await;
            self.set_state(WorkerState::Ready);
            if let Err(reason) = outcome {
                return Some(reason);
            }
        }
    }

    /// Waits for the first job, then fills the batch until it is full or max_batch_delay passes.
    async fn next_batch(&self) -> Option<Vec<Job>> {
        let shared = &self.pool.shared;
        let limit = shared.settings.batch_size.max(1) as usize;
        let mut batch = Vec::with_capacity(limit);
        let mut deadline: Option<Instant> = None;
        loop {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.stopping() {
                // Jobs already taken are served; none more are taken. Pass on a wake-up this
                // worker may have consumed, so a queued job is not left waiting.
                if !shared.queue.lock().unwrap().is_empty() {
                    shared.notify.notify_one();
                }
                return if batch.is_empty() { None } else { Some(batch) };
            }
            {
                let mut q = shared.queue.lock().unwrap();
                while batch.len() < limit {
                    match q.pop_front() {
                        Some(job) => batch.push(job),
                        None => break,
                    }
                }
                shared.metrics.queue_depth.set(q.len() as f64);
                if !q.is_empty() {
                    // Others may be able to take what we leave.
                    shared.notify.notify_one();
                }
            }
            if batch.len() >= limit {
                return Some(batch);
            }
            if !batch.is_empty() {
                let d = *deadline
                    .get_or_insert_with(|| Instant::now() + shared.settings.max_batch_delay);
                if Instant::now() >= d {
                    return Some(batch);
                }
                let _ = tokio::time::timeout_at(d.into(), notified).await;
            } else {
                notified.await;
            }
        }
    }

    /// Runs one batch and answers its jobs. Err means the backend is unusable.
    async fn run_batch(
        &self,
        backend: &mut Box<dyn Backend>,
        mut jobs: Vec<Job>,
    ) -> Result<(), String> {
        let metrics = &self.pool.shared.metrics;
        let batch_start = Instant::now();
        for job in &mut jobs {
            job.timings.batch_start = Some(batch_start);
        }
        metrics.batch_size.observe(jobs.len() as f64);
        let requests: Vec<InferRequest> = jobs
            .iter_mut()
            .map(|j| std::mem::take(&mut j.request))
            .collect();
        let backend_start = Instant::now();
        let result = {
            let sink = BatchSink { jobs: &jobs };
            tokio::time::timeout(self.spec.response_timeout, backend.infer(&requests, &sink)).await
        };
        let backend_end = Instant::now();
        let backend_time = backend_end - backend_start;
        metrics.backend_duration.observe(backend_time.as_secs_f64());
        if !backend.reports_handler_metrics() {
            let ms = backend_time.as_secs_f64() * 1000.0;
            metrics.handler_time.set((ms * 100.0).round() / 100.0);
            metrics.prediction_time.set((ms * 100.0).round() / 100.0);
        }
        for job in &mut jobs {
            job.timings.backend_start = Some(backend_start);
            job.timings.backend_end = Some(backend_end);
        }
        let n = jobs.len();
        let outcome = match result {
            Ok(Ok(responses)) if responses.len() == n => {
                for (job, response) in jobs.into_iter().zip(responses) {
                    job.finish(response);
                }
                Ok(())
            }
            Ok(Ok(responses)) => {
                let msg = format!(
                    "the backend returned {} replies for a batch of {n} requests",
                    responses.len()
                );
                for job in jobs {
                    job.finish(InferResponse::error(500, "InternalServerException", &msg));
                }
                Ok(())
            }
            Ok(Err(BackendError::Failed { status, message })) => {
                for job in jobs {
                    job.finish(InferResponse::error(
                        status,
                        "InternalServerException",
                        &message,
                    ));
                }
                Ok(())
            }
            Ok(Err(e @ (BackendError::Died(_) | BackendError::Load(_)))) => {
                let msg = format!("Worker died: {e}");
                for job in jobs {
                    job.finish(InferResponse::error(
                        503,
                        "ServiceUnavailableException",
                        &msg,
                    ));
                }
                Err(msg)
            }
            Err(_) => {
                let msg = format!(
                    "the worker did not answer within the response timeout ({}s); it is restarted",
                    self.spec.response_timeout.as_secs()
                );
                for job in jobs {
                    job.finish(InferResponse::error(408, "RequestTimeoutException", &msg));
                }
                Err(msg)
            }
        };
        let frontend = batch_start.elapsed().saturating_sub(backend_time);
        let host = &self.spec.metrics.host;
        host.worker_thread_time.set(frontend.as_millis() as f64);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::gpu_for;

    #[test]
    fn workers_take_gpus_round_robin() {
        assert_eq!(gpu_for(9000, 9000, 0), -1);
        let ids: Vec<i32> = (9000..9005).map(|p| gpu_for(p, 9000, 2)).collect();
        assert_eq!(ids, [0, 1, 0, 1, 0]);
    }
}
