//! What recorders hold: handles to series, resolved once, so that recording is atomic adds.
//!
//! [`ModelMetrics`] per model version (the request path), [`HostMetrics`] for the server,
//! [`GpuMetrics`] per device, and [`Timings`], the one interface through which a request's
//! timings reach the metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::registry::Series;

/// A series to update, or nothing when metrics.yaml does not declare the metric.
#[derive(Debug, Clone, Default)]
pub struct Handle(pub(super) Option<Arc<Series>>);

impl Handle {
    #[inline]
    pub fn inc(&self) {
        if let Some(s) = &self.0 {
            s.inc()
        }
    }
    #[inline]
    pub fn inc_by(&self, v: f64) {
        if let Some(s) = &self.0 {
            s.inc_by(v)
        }
    }
    #[inline]
    pub fn set(&self, v: f64) {
        if let Some(s) = &self.0 {
            s.set(v)
        }
    }
    #[inline]
    pub fn observe(&self, v: f64) {
        if let Some(s) = &self.0 {
            s.observe(v)
        }
    }
}

/// Worker states counted by `oxserve_workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Starting = 0,
    Ready = 1,
    Busy = 2,
    Stopping = 3,
    /// Crashed or failed to load; waits to be restarted (no process).
    Backoff = 4,
}

impl WorkerState {
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Busy,
        WorkerState::Stopping,
        WorkerState::Backoff,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
            WorkerState::Stopping => "stopping",
            WorkerState::Backoff => "backoff",
        }
    }
}

/// When each step of one request happened. Filled where each step happens (api: arrival and
/// response; worker: queue, batch and backend) and recorded once, by [`ModelMetrics::record_request`].
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub arrival: Instant,
    pub enqueued: Option<Instant>,
    pub batch_start: Option<Instant>,
    pub backend_start: Option<Instant>,
    pub backend_end: Option<Instant>,
    pub first_chunk: Option<Instant>,
    pub responded: Option<Instant>,
}

impl Timings {
    pub fn new(arrival: Instant) -> Timings {
        Timings {
            arrival,
            enqueued: None,
            batch_start: None,
            backend_start: None,
            backend_end: None,
            first_chunk: None,
            responded: None,
        }
    }

    /// Time spent waiting for a worker (enqueue to batch start, batching delay included).
    pub fn queue_wait(&self) -> Option<Duration> {
        Some(self.batch_start?.saturating_duration_since(self.enqueued?))
    }
}

/// The three ts_* counters of one model, for one `model_version` label value.
#[derive(Debug, Clone, Default)]
pub(super) struct TsCounters {
    pub(super) requests: Handle,
    pub(super) latency_us: Handle,
    pub(super) queue_latency_us: Handle,
}

/// Every series one model version records into, resolved once at registration.
#[derive(Debug)]
pub struct ModelMetrics {
    pub model_name: String,
    pub model_version: String,
    /// ts_* counters labelled `model_version="default"` (URL without a version).
    pub(super) url_default: TsCounters,
    /// ts_* counters labelled with the version named in the URL.
    pub(super) url_version: TsCounters,
    pub(super) request_duration: Handle,
    pub(super) queue_wait: Handle,
    pub backend_duration: Handle,
    pub batch_size: Handle,
    pub first_chunk: Handle,
    pub queue_depth: Handle,
    pub queue_capacity: Handle,
    pub workers_min: Handle,
    pub workers_max: Handle,
    pub(super) workers: [Handle; 5],
    /// oxserve_worker_scale_events_total: [up, down] x [request, autoscale].
    pub(super) scale_events: [[Handle; 2]; 2],
    pub(super) responses: [Handle; 3],
    /// TorchServe's HandlerTime / PredictionTime, recorded by in-process backends' workers.
    pub handler_time: Handle,
    pub prediction_time: Handle,
    pub(super) host: Arc<HostMetrics>,
}

impl ModelMetrics {
    /// Records a finished prediction request (any status) with its timings.
    pub fn record_request(&self, t: &Timings, status: u16, version_in_url: bool) {
        let ts = if version_in_url {
            &self.url_version
        } else {
            &self.url_default
        };
        ts.requests.inc();
        let end = t.responded.unwrap_or_else(Instant::now);
        let total = end.saturating_duration_since(t.arrival);
        if (200..300).contains(&status) {
            ts.latency_us.inc_by(total.as_micros() as f64);
        }
        if let Some(wait) = t.queue_wait() {
            ts.queue_latency_us.inc_by(wait.as_micros() as f64);
            self.queue_wait.observe(wait.as_secs_f64());
            self.host.queue_time.set(wait.as_millis() as f64);
        }
        self.request_duration.observe(total.as_secs_f64());
        if let Some(first) = t.first_chunk {
            self.first_chunk
                .observe(first.saturating_duration_since(t.arrival).as_secs_f64());
        }
        self.responses[status_class(status)].inc();
    }

    /// Sets the worker count of one state (the scheduler is the only writer).
    pub fn set_workers(&self, state: WorkerState, n: f64) {
        self.workers[state as usize].set(n);
    }

    /// Counts `n` workers added (`up`) or stopped by a scale request or by the autoscaler.
    pub fn scaled(&self, up: bool, by_autoscaler: bool, n: u32) {
        if n > 0 {
            self.scale_events[usize::from(!up)][usize::from(by_autoscaler)].inc_by(f64::from(n));
        }
    }
}

pub(super) fn status_class(status: u16) -> usize {
    match status {
        200..=299 => 0,
        400..=499 => 1,
        _ => 2,
    }
}

/// Server-level series.
#[derive(Debug, Default)]
pub struct HostMetrics {
    pub(super) requests: [Handle; 3],
    pub queue_time: Handle,
    pub worker_thread_time: Handle,
}

impl HostMetrics {
    /// Counts one HTTP response of any listener by status class (Requests2XX/4XX/5XX).
    #[inline]
    pub fn count_response(&self, status: u16) {
        self.requests[status_class(status)].inc();
    }
}

/// One GPU's series.
#[derive(Debug, Default)]
pub struct GpuMetrics {
    pub utilization: Handle,
    pub memory_utilization: Handle,
    pub memory_used: Handle,
}
