//! What recorders hold: handles to series, resolved once, so that recording is atomic adds.
//!
//! [`ModelMetrics`] per model version (the request path), [`HostMetrics`] for the server,
//! [`GpuMetrics`] per device, and [`Timings`], the one interface through which a request's
//! timings reach the metrics.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::registry::{Family, Series};

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

/// A series created on its first update, not at registration: for counters that only some models
/// ever move (tokens, stream chunks). An eager series would show 0 for every model, and a rate of
/// 0 is data, so the dashboards would draw LLM panels for an image classifier.
#[derive(Debug, Default)]
pub struct LazyHandle {
    pub(super) family: Option<Arc<Family>>,
    pub(super) values: Vec<String>,
    pub(super) cell: OnceLock<Handle>,
}

impl LazyHandle {
    fn get(&self) -> &Handle {
        self.cell.get_or_init(|| {
            let values: Vec<&str> = self.values.iter().map(String::as_str).collect();
            Handle(self.family.as_ref().map(|f| f.series(&values)))
        })
    }
    #[inline]
    pub fn inc_by(&self, v: f64) {
        self.get().inc_by(v)
    }
}

/// The OpenAI `usage` of one reply: prompt and completion tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// The `usage` of an OpenAI JSON reply (`prompt_tokens`, `completion_tokens`), if it has one.
    pub fn from_json(body: &[u8]) -> Option<Usage> {
        #[derive(serde::Deserialize)]
        struct Reply {
            usage: Option<Shape>,
        }
        #[derive(serde::Deserialize)]
        struct Shape {
            #[serde(default)]
            prompt_tokens: u64,
            #[serde(default)]
            completion_tokens: u64,
        }
        let u = serde_json::from_slice::<Reply>(body).ok()?.usage?;
        Some(Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        })
    }

    /// The last `usage` among the server-sent events of one streamed chunk (`data: {...}` lines);
    /// a chunk that is one JSON document (a handler streaming JSON lines) counts as one event.
    /// A chunk without the text `"usage"` is not parsed at all: most chunks of a token stream.
    pub fn from_chunk(chunk: &[u8]) -> Option<Usage> {
        const NEEDLE: &[u8] = b"\"usage\"";
        if !chunk.windows(NEEDLE.len()).any(|w| w == NEEDLE) {
            return None;
        }
        let text = std::str::from_utf8(chunk).ok()?;
        let mut found = None;
        let mut events = 0;
        for line in text.lines() {
            if let Some(data) = line.strip_prefix("data:") {
                events += 1;
                if let Some(u) = Usage::from_json(data.trim().as_bytes()) {
                    found = Some(u);
                }
            }
        }
        if events == 0 {
            return Usage::from_json(chunk);
        }
        found
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
    /// Requests inside workers (handed over, not yet answered); the scheduler is the only writer.
    pub requests_running: Handle,
    pub queue_capacity: Handle,
    /// Time between consecutive chunks of a stream (inter-token latency for LLM streams).
    pub inter_chunk: Handle,
    pub(super) stream_chunks: LazyHandle,
    pub(super) prompt_tokens: LazyHandle,
    pub(super) generated_tokens: LazyHandle,
    /// Requests whose client went away before the reply was complete (created on the first).
    pub(super) requests_cancelled: LazyHandle,
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

    /// Records a request whose client went away before its reply was complete: as a finished
    /// request (with the status sent, or 499 when nothing was), and as cancelled.
    pub fn record_cancelled(&self, t: &Timings, status: u16, version_in_url: bool) {
        self.record_request(t, status, version_in_url);
        self.requests_cancelled.inc_by(1.0);
    }

    /// Records one chunk of a streamed reply; `gap` is the time since the previous chunk (none for
    /// the first, whose latency is the time to first chunk).
    #[inline]
    pub fn record_chunk(&self, gap: Option<Duration>) {
        self.stream_chunks.inc_by(1.0);
        if let Some(gap) = gap {
            self.inter_chunk.observe(gap.as_secs_f64());
        }
    }

    /// Counts the tokens of one reply's OpenAI `usage` object.
    pub fn record_usage(&self, u: Usage) {
        self.prompt_tokens.inc_by(u.prompt_tokens as f64);
        self.generated_tokens.inc_by(u.completion_tokens as f64);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_json_replies_and_sse_events() {
        let u = |p, c| {
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
            })
        };
        assert_eq!(
            Usage::from_json(br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#),
            u(5, 7)
        );
        assert_eq!(Usage::from_json(br#"{"usage":null}"#), None);
        assert_eq!(Usage::from_json(br#"{"usage":{"prompt_tokens":-1}}"#), None);
        assert_eq!(Usage::from_json(b"not json"), None);
        // Two events in one chunk: the last usage wins; a null usage is no usage.
        let chunk = b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: {\"usage\":null}\n\ndata: [DONE]\n\n";
        assert_eq!(Usage::from_chunk(chunk), u(3, 2));
        assert_eq!(Usage::from_chunk(b"data: [DONE]\n\n"), None);
        assert_eq!(
            Usage::from_chunk(br#"{"usage":{"completion_tokens":4}}"#),
            u(0, 4)
        );
        assert_eq!(Usage::from_chunk(&[0xff, 0xfe]), None);
    }
}
