//! Every metric family name the code records into or reads, each defined once, and the definitions
//! of oxserve's own families.
//!
//! TorchServe's families (the first block of names) are declared by metrics.yaml, built-in or the
//! user's, with TorchServe's exact names, types and dimensions; a user file may leave one out, and
//! recording into it then does nothing. oxserve's own families (`oxserve_*`) are always present and
//! defined here, since TorchServe has no equivalent and their shape is part of oxserve's contract
//! with the Grafana dashboards (deploy/grafana) and the live dashboard (src/dashboard).

use super::registry::FamilyDef;
use super::spec::Kind;

// TorchServe's frontend families (metrics.yaml `ts_metrics`).
pub const REQUESTS_2XX: &str = "Requests2XX";
pub const REQUESTS_4XX: &str = "Requests4XX";
pub const REQUESTS_5XX: &str = "Requests5XX";
pub const TS_INFERENCE_REQUESTS: &str = "ts_inference_requests_total";
pub const TS_INFERENCE_LATENCY: &str = "ts_inference_latency_microseconds";
pub const TS_QUEUE_LATENCY: &str = "ts_queue_latency_microseconds";
pub const QUEUE_TIME: &str = "QueueTime";
pub const WORKER_THREAD_TIME: &str = "WorkerThreadTime";
pub const WORKER_LOAD_TIME: &str = "WorkerLoadTime";
pub const CPU_UTILIZATION: &str = "CPUUtilization";
pub const MEMORY_USED: &str = "MemoryUsed";
pub const MEMORY_AVAILABLE: &str = "MemoryAvailable";
pub const MEMORY_UTILIZATION: &str = "MemoryUtilization";
pub const DISK_USAGE: &str = "DiskUsage";
pub const DISK_AVAILABLE: &str = "DiskAvailable";
pub const DISK_UTILIZATION: &str = "DiskUtilization";
pub const GPU_UTILIZATION: &str = "GPUUtilization";
pub const GPU_MEMORY_UTILIZATION: &str = "GPUMemoryUtilization";
pub const GPU_MEMORY_USED: &str = "GPUMemoryUsed";
// TorchServe's handler families (metrics.yaml `model_metrics`), which in-process backends record.
pub const HANDLER_TIME: &str = "HandlerTime";
pub const PREDICTION_TIME: &str = "PredictionTime";

// oxserve's own families.
pub const REQUEST_DURATION: &str = "oxserve_request_duration_seconds";
pub const QUEUE_WAIT: &str = "oxserve_queue_wait_seconds";
pub const BACKEND_DURATION: &str = "oxserve_backend_duration_seconds";
pub const TIME_TO_FIRST_CHUNK: &str = "oxserve_time_to_first_chunk_seconds";
pub const INTER_TOKEN_LATENCY: &str = "oxserve_inter_token_latency_seconds";
pub const STREAM_CHUNKS: &str = "oxserve_stream_chunks_total";
pub const PROMPT_TOKENS: &str = "oxserve_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "oxserve_generated_tokens_total";
pub const REQUESTS_RUNNING: &str = "oxserve_requests_running";
pub const REQUESTS_CANCELLED: &str = "oxserve_requests_cancelled_total";
pub const BATCH_SIZE: &str = "oxserve_batch_size";
pub const QUEUE_DEPTH: &str = "oxserve_queue_depth";
pub const QUEUE_CAPACITY: &str = "oxserve_queue_capacity";
pub const WORKERS_MIN: &str = "oxserve_workers_min";
pub const WORKERS_MAX: &str = "oxserve_workers_max";
pub const WORKERS: &str = "oxserve_workers";
pub const WORKER_SCALE_EVENTS: &str = "oxserve_worker_scale_events_total";
pub const MODEL_RESPONSES: &str = "oxserve_model_responses_total";
pub const BACKEND_LINES_DROPPED: &str = "oxserve_backend_metric_lines_dropped_total";
pub const BUILD_INFO: &str = "oxserve_build_info";

/// The ts_* counters that legacy mode keeps on /metrics (every other family is logged instead).
pub const LEGACY_EXPOSED: &[&str] = &[
    TS_INFERENCE_REQUESTS,
    TS_INFERENCE_LATENCY,
    TS_QUEUE_LATENCY,
];

/// Buckets of histograms declared in metrics.yaml without `buckets`: TorchServe's (the Prometheus
/// Java client's) defaults, for compatibility.
pub const TORCHSERVE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Inter-token gaps are milliseconds to tens of them; the request buckets would put every gap of a
/// fast engine into one or two buckets, and p50 vs p99 would be the same number.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
];

/// The labels of oxserve's per-model-version families.
const MV: &[&str] = &["model_name", "model_version"];

/// oxserve's own families; `buckets` are the configured latency buckets (`histogram_buckets`).
pub(super) fn own(buckets: &[f64]) -> Vec<FamilyDef> {
    use Kind::{Counter, Gauge, Histogram};
    let per_model = |name, kind, help: &str| FamilyDef::new(name, kind, help).labels(MV);
    vec![
        per_model(REQUEST_DURATION, Histogram, "Time from a prediction request's arrival to its response, in seconds.").buckets(buckets),
        per_model(QUEUE_WAIT, Histogram, "Time a prediction request waited in the model's queue (batching delay included), in seconds.").buckets(buckets),
        per_model(BACKEND_DURATION, Histogram, "Time the backend (handler) spent on one batch, in seconds.").buckets(buckets),
        per_model(TIME_TO_FIRST_CHUNK, Histogram, "Time from a streamed request's arrival to its first chunk (time to first token for LLM streams), in seconds.").buckets(buckets),
        per_model(INTER_TOKEN_LATENCY, Histogram, "Time between consecutive chunks of a streamed response (inter-token latency for LLM streams), in seconds.").buckets(INTER_TOKEN_BUCKETS),
        per_model(STREAM_CHUNKS, Counter, "Chunks sent in streamed responses."),
        per_model(PROMPT_TOKENS, Counter, "Prompt tokens, from the OpenAI usage object of replies that carry one."),
        per_model(GENERATED_TOKENS, Counter, "Completion (generated) tokens, from the OpenAI usage object of replies that carry one."),
        per_model(REQUESTS_RUNNING, Gauge, "Requests handed to workers and not answered yet (those waiting for one are oxserve_queue_depth)."),
        per_model(REQUESTS_CANCELLED, Counter, "Prediction requests whose HTTP client went away before the reply was complete (stopped in the worker when it can: async mode on oxserve's runtime)."),
        per_model(BATCH_SIZE, Histogram, "Requests per batch handed to a worker.").buckets(BATCH_BUCKETS),
        per_model(QUEUE_DEPTH, Gauge, "Requests waiting in the model's queue."),
        per_model(QUEUE_CAPACITY, Gauge, "Capacity of the model's queue (job_queue_size)."),
        per_model(WORKERS_MIN, Gauge, "Configured minimum number of workers."),
        per_model(WORKERS_MAX, Gauge, "Configured maximum number of workers."),
        FamilyDef::new(WORKERS, Gauge, "Workers of a model version by state (starting, ready, busy, stopping, backoff).")
            .labels(&["model_name", "model_version", "state"]),
        FamilyDef::new(WORKER_SCALE_EVENTS, Counter, "Workers added (direction=up) or stopped (down) by a scale request (trigger=request) or the autoscaler (trigger=autoscale).")
            .labels(&["model_name", "model_version", "direction", "trigger"]),
        FamilyDef::new(MODEL_RESPONSES, Counter, "Prediction responses per model version by status class (2xx, 4xx, 5xx).")
            .labels(&["model_name", "model_version", "status_class"]),
        FamilyDef::new(BACKEND_LINES_DROPPED, Counter, "Backend [METRICS] lines that were dropped: malformed, undeclared in metrics.yaml, or past model_metrics_max_series (cardinality).")
            .labels(&["reason"]),
        FamilyDef::new(BUILD_INFO, Gauge, "Always 1; labels carry the oxserve version.").labels(&["version"]),
    ]
}
