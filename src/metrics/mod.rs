//! The one metric registry. Everything that records a metric records it here; /metrics and the log
//! files read it from here.
//!
//! Families come from metrics.yaml (TorchServe's names, types and dimensions, exactly) plus oxserve's
//! own `oxserve_` families. Recorders hold pre-resolved [`Handle`]s ([`ModelMetrics`] per model
//! version, [`HostMetrics`] for the server), so the request path does atomic adds and nothing else.

mod handles;
pub mod line;
pub mod log;
pub mod registry;
pub mod spec;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{Config, MetricsMode};
use log::LogSink;
use registry::Family;
pub use spec::SpecError;
use spec::{Kind, MetricSpec, Origin, Spec};

use handles::TsCounters;
pub use handles::{
    GpuMetrics, Handle, HostMetrics, LazyHandle, ModelMetrics, Timings, Usage, WorkerState,
};

/// The registry.
pub struct Metrics {
    pub hostname: String,
    pub mode: MetricsMode,
    spec: Spec,
    auto_detect: bool,
    buckets: Vec<f64>,
    log: Option<Arc<LogSink>>,
    families: RwLock<BTreeMap<String, Arc<Family>>>,
    pub host: Arc<HostMetrics>,
    dropped_malformed: Handle,
    dropped_undeclared: Handle,
    dropped_cardinality: Handle,
    /// Most series per handler family, and most auto-detected families (`model_metrics_max_series`).
    max_series: usize,
    /// Families created by auto-detection so far.
    auto_families: std::sync::atomic::AtomicUsize,
    /// (reason, metric name) pairs already reported as dropped, so each is logged once.
    warned: Mutex<HashSet<String>>,
}

/// Most distinct drop warnings logged; past it, one last warning says that the rest are silent
/// (they are still counted). Keeps a handler that invents a new metric name per line from growing
/// the set, or the log, without end.
const MAX_WARNED: usize = 1000;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("mode", &self.mode).finish()
    }
}

/// The ts_* counters that legacy mode keeps on /metrics.
const LEGACY_EXPOSED: &[&str] = &[
    "ts_inference_requests_total",
    "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
];

/// oxserve's own per-model families: name, kind, help, extra label.
const OXSERVE_MODEL_FAMILIES: &[(&str, Kind, &str)] = &[
    ("oxserve_request_duration_seconds", Kind::Histogram, "Time from a prediction request's arrival to its response, in seconds."),
    ("oxserve_queue_wait_seconds", Kind::Histogram, "Time a prediction request waited in the model's queue (batching delay included), in seconds."),
    ("oxserve_backend_duration_seconds", Kind::Histogram, "Time the backend (handler) spent on one batch, in seconds."),
    ("oxserve_time_to_first_chunk_seconds", Kind::Histogram, "Time from a streamed request's arrival to its first chunk (time to first token for LLM streams), in seconds."),
    ("oxserve_inter_token_latency_seconds", Kind::Histogram, "Time between consecutive chunks of a streamed response (inter-token latency for LLM streams), in seconds."),
    ("oxserve_stream_chunks_total", Kind::Counter, "Chunks sent in streamed responses."),
    ("oxserve_prompt_tokens_total", Kind::Counter, "Prompt tokens, from the OpenAI usage object of replies that carry one."),
    ("oxserve_generated_tokens_total", Kind::Counter, "Completion (generated) tokens, from the OpenAI usage object of replies that carry one."),
    ("oxserve_requests_running", Kind::Gauge, "Requests handed to workers and not answered yet (those waiting for one are oxserve_queue_depth)."),
    ("oxserve_batch_size", Kind::Histogram, "Requests per batch handed to a worker."),
    ("oxserve_queue_depth", Kind::Gauge, "Requests waiting in the model's queue."),
    ("oxserve_queue_capacity", Kind::Gauge, "Capacity of the model's queue (job_queue_size)."),
    ("oxserve_workers_min", Kind::Gauge, "Configured minimum number of workers."),
    ("oxserve_workers_max", Kind::Gauge, "Configured maximum number of workers."),
];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Inter-token gaps are milliseconds to tens of them; the request buckets would put every gap of a
/// fast engine into one or two buckets, and p50 vs p99 would be the same number.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
];

/// Why the metrics registry could not be built at start-up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("cannot open the metrics logs in {}: {source}", dir.display())]
    LogDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Metrics {
    /// Builds the registry from the configuration: metrics.yaml (built-in or `metrics_config`),
    /// mode, buckets, and the log sink for log and legacy modes.
    pub fn from_config(config: &Config) -> Result<Metrics, MetricsError> {
        let spec = match &config.metrics_config {
            Some(path) => Spec::load(path)?,
            None => Spec::builtin(),
        };
        // The files exist in every mode, as TorchServe's log4j2 appenders create them at start-up, so
        // a log shipper configured for them finds them; metric lines go there in log and legacy
        // modes only, as in TorchServe.
        let log = Some(Arc::new(
            LogSink::open(&config.metrics_log_dir, config.metrics_log_max_bytes).map_err(|e| {
                MetricsError::LogDir {
                    dir: config.metrics_log_dir.clone(),
                    source: e,
                }
            })?,
        ));
        Ok(Metrics::new(
            spec,
            config.metrics_mode,
            config.model_metrics_auto_detect,
            config.histogram_buckets.clone(),
            log,
            hostname(),
        )
        .with_max_series(config.model_metrics_max_series))
    }

    /// Sets the cap on series per handler family and on auto-detected families.
    pub fn with_max_series(mut self, max_series: usize) -> Metrics {
        self.max_series = max_series;
        self
    }

    /// Waits until the metric log lines recorded so far are in their files: call at shutdown, so
    /// that the last events (written by a background thread) are not lost.
    pub fn flush_log(&self) {
        if let Some(log) = &self.log {
            log.flush();
        }
    }

    pub fn new(
        spec: Spec,
        mode: MetricsMode,
        auto_detect: bool,
        buckets: Vec<f64>,
        log: Option<Arc<LogSink>>,
        hostname: String,
    ) -> Metrics {
        let mut m = Metrics {
            hostname,
            mode,
            spec: Spec::default(),
            auto_detect,
            buckets,
            log,
            families: RwLock::new(BTreeMap::new()),
            host: Arc::new(HostMetrics::default()),
            dropped_malformed: Handle::default(),
            dropped_undeclared: Handle::default(),
            dropped_cardinality: Handle::default(),
            max_series: crate::config::DEFAULT_MODEL_METRICS_MAX_SERIES,
            auto_families: std::sync::atomic::AtomicUsize::new(0),
            warned: Mutex::new(HashSet::new()),
        };
        for s in &spec.metrics {
            m.add_declared(s);
        }
        m.spec = spec;
        let name_buckets = m.buckets.clone();
        for (name, kind, help) in OXSERVE_MODEL_FAMILIES {
            let buckets = match (*kind, *name) {
                (Kind::Histogram, "oxserve_batch_size") => BATCH_BUCKETS.to_vec(),
                (Kind::Histogram, "oxserve_inter_token_latency_seconds") => {
                    INTER_TOKEN_BUCKETS.to_vec()
                }
                (Kind::Histogram, _) => name_buckets.clone(),
                _ => Vec::new(),
            };
            m.add_family(
                name,
                *kind,
                "",
                help.to_string(),
                &["model_name", "model_version"],
                buckets,
                false,
            );
        }
        m.add_family(
            "oxserve_workers",
            Kind::Gauge,
            "",
            "Workers of a model version by state (starting, ready, busy, stopping, backoff)."
                .into(),
            &["model_name", "model_version", "state"],
            vec![],
            false,
        );
        m.add_family(
            "oxserve_worker_scale_events_total",
            Kind::Counter,
            "",
            "Workers added (direction=up) or stopped (down) by a scale request (trigger=request) or the autoscaler (trigger=autoscale).".into(),
            &["model_name", "model_version", "direction", "trigger"],
            vec![],
            false,
        );
        m.add_family(
            "oxserve_model_responses_total",
            Kind::Counter,
            "",
            "Prediction responses per model version by status class (2xx, 4xx, 5xx).".into(),
            &["model_name", "model_version", "status_class"],
            vec![],
            false,
        );
        m.add_family(
            "oxserve_backend_metric_lines_dropped_total",
            Kind::Counter,
            "",
            "Backend [METRICS] lines that were dropped: malformed, undeclared in metrics.yaml, or past model_metrics_max_series (cardinality)."
                .into(),
            &["reason"],
            vec![],
            false,
        );
        m.add_family(
            "oxserve_build_info",
            Kind::Gauge,
            "",
            "Always 1; labels carry the oxserve version.".into(),
            &["version"],
            vec![],
            false,
        );
        m.series("oxserve_build_info", &[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        m.dropped_malformed =
            m.series("oxserve_backend_metric_lines_dropped_total", &["malformed"]);
        m.dropped_undeclared = m.series(
            "oxserve_backend_metric_lines_dropped_total",
            &["undeclared"],
        );
        m.dropped_cardinality = m.series(
            "oxserve_backend_metric_lines_dropped_total",
            &["cardinality"],
        );
        m.dropped_malformed.inc_by(0.0);
        m.dropped_undeclared.inc_by(0.0);
        m.dropped_cardinality.inc_by(0.0);
        let host = HostMetrics {
            requests: [
                m.ts("Requests2XX", &[]),
                m.ts("Requests4XX", &[]),
                m.ts("Requests5XX", &[]),
            ],
            queue_time: m.ts("QueueTime", &[]),
            worker_thread_time: m.ts("WorkerThreadTime", &[]),
        };
        m.host = Arc::new(host);
        m
    }

    /// A registry with the built-in metric set, for tests and benchmarks.
    pub fn for_tests() -> Metrics {
        Metrics::new(
            Spec::builtin(),
            MetricsMode::Prometheus,
            false,
            crate::config::DEFAULT_BUCKETS.to_vec(),
            None,
            "testhost".into(),
        )
    }

    fn add_declared(&self, s: &MetricSpec) {
        let help = format!(
            "Torchserve prometheus {} metric with unit: {}",
            s.kind.as_str(),
            s.unit
        );
        let buckets = s.buckets.clone().unwrap_or_else(|| {
            // TorchServe's (Prometheus client's) default buckets, for compatibility.
            vec![
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            ]
        });
        let dims: Vec<&str> = s.dimensions.iter().map(String::as_str).collect();
        self.add_family(
            &s.name,
            s.kind,
            &s.unit,
            help,
            &dims,
            if s.kind == Kind::Histogram {
                buckets
            } else {
                Vec::new()
            },
            s.origin == Origin::Model,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn add_family(
        &self,
        name: &str,
        kind: Kind,
        unit: &str,
        help: String,
        labels: &[&str],
        buckets: Vec<f64>,
        model_origin: bool,
    ) -> Arc<Family> {
        // TorchServe's MetricBuilder: a metric is either a Prometheus metric or a LogMetric, never
        // both, so prometheus mode logs no metric lines (its metric log files stay empty).
        let (exposed, logged) = match self.mode {
            MetricsMode::Prometheus => (true, false),
            MetricsMode::Log => (false, true),
            MetricsMode::Legacy => {
                let kept = LEGACY_EXPOSED.contains(&name);
                (kept, !kept)
            }
        };
        let family = Arc::new(Family::new(
            name,
            kind,
            unit,
            help,
            labels.iter().map(|s| s.to_string()).collect(),
            buckets,
            exposed,
            logged,
            model_origin,
        ));
        self.families
            .write()
            .unwrap()
            .entry(name.to_string())
            .or_insert(family)
            .clone()
    }

    /// A family by name.
    pub fn family(&self, name: &str) -> Option<Arc<Family>> {
        self.families.read().unwrap().get(name).cloned()
    }

    /// The series of family `name` with these label values; nothing if the family does not exist.
    pub fn series(&self, name: &str, values: &[&str]) -> Handle {
        Handle(self.family(name).map(|f| f.series(values, &self.log)))
    }

    /// A frontend series whose label values are filled by dimension name: Level -> Host,
    /// Hostname -> this host, the rest from `known`; a dimension nobody knows gets "".
    pub fn ts(&self, name: &str, known: &[(&str, &str)]) -> Handle {
        let Some(family) = self.family(name) else {
            return Handle::default();
        };
        let values: Vec<&str> = family
            .meta
            .label_names
            .iter()
            .map(|label| match label.as_str() {
                "Level" => "Host",
                "Hostname" | "hostname" => self.hostname.as_str(),
                other => known
                    .iter()
                    .find(|(k, _)| *k == other)
                    .map(|(_, v)| *v)
                    .unwrap_or(""),
            })
            .collect();
        Handle(Some(family.series(&values, &self.log)))
    }

    /// Resolves every series a model version records into.
    pub fn model(&self, model_name: &str, model_version: &str) -> Arc<ModelMetrics> {
        let ts_counters = |label_version: &str| {
            let k = [("model_name", model_name), ("model_version", label_version)];
            TsCounters {
                requests: self.ts("ts_inference_requests_total", &k),
                latency_us: self.ts("ts_inference_latency_microseconds", &k),
                queue_latency_us: self.ts("ts_queue_latency_microseconds", &k),
            }
        };
        let mv = [model_name, model_version];
        let s = |name: &str| self.series(name, &mv);
        let lazy = |name: &str| LazyHandle {
            family: self.family(name),
            values: vec![model_name.to_string(), model_version.to_string()],
            log: self.log.clone(),
            cell: std::sync::OnceLock::new(),
        };
        let state = |st: WorkerState| {
            let h = self.series("oxserve_workers", &[model_name, model_version, st.as_str()]);
            h.set(0.0);
            h
        };
        let class = |c: &str| {
            let h = self.series(
                "oxserve_model_responses_total",
                &[model_name, model_version, c],
            );
            h.inc_by(0.0);
            h
        };
        let scale = |direction: &str, trigger: &str| {
            let h = self.series(
                "oxserve_worker_scale_events_total",
                &[model_name, model_version, direction, trigger],
            );
            h.inc_by(0.0);
            h
        };
        let model_dims = [("ModelName", model_name), ("Level", "Model")];
        let model_gauge = |name: &str| {
            let Some(f) = self.family(name) else {
                return Handle::default();
            };
            let values: Vec<&str> = f
                .meta
                .label_names
                .iter()
                .map(|l| match l.as_str() {
                    "Hostname" => self.hostname.as_str(),
                    other => model_dims
                        .iter()
                        .find(|(k, _)| *k == other)
                        .map(|(_, v)| *v)
                        .unwrap_or(""),
                })
                .collect();
            Handle(Some(f.series(&values, &self.log)))
        };
        Arc::new(ModelMetrics {
            model_name: model_name.to_string(),
            model_version: model_version.to_string(),
            url_default: ts_counters("default"),
            url_version: ts_counters(model_version),
            request_duration: s("oxserve_request_duration_seconds"),
            queue_wait: s("oxserve_queue_wait_seconds"),
            backend_duration: s("oxserve_backend_duration_seconds"),
            batch_size: s("oxserve_batch_size"),
            first_chunk: s("oxserve_time_to_first_chunk_seconds"),
            queue_depth: s("oxserve_queue_depth"),
            requests_running: s("oxserve_requests_running"),
            inter_chunk: s("oxserve_inter_token_latency_seconds"),
            stream_chunks: lazy("oxserve_stream_chunks_total"),
            prompt_tokens: lazy("oxserve_prompt_tokens_total"),
            generated_tokens: lazy("oxserve_generated_tokens_total"),
            queue_capacity: s("oxserve_queue_capacity"),
            workers_min: s("oxserve_workers_min"),
            workers_max: s("oxserve_workers_max"),
            workers: WorkerState::ALL.map(state),
            scale_events: [
                [scale("up", "request"), scale("up", "autoscale")],
                [scale("down", "request"), scale("down", "autoscale")],
            ],
            responses: ["2xx", "4xx", "5xx"].map(class),
            handler_time: model_gauge("HandlerTime"),
            prediction_time: model_gauge("PredictionTime"),
            host: self.host.clone(),
        })
    }

    /// Removes a model version's gauges (queue, workers) once it is unregistered. Counters and
    /// histograms stay: they are cumulative, and Prometheus' rate() needs them not to vanish.
    pub fn forget_model(&self, model_name: &str, model_version: &str) {
        for name in [
            "oxserve_queue_depth",
            "oxserve_requests_running",
            "oxserve_queue_capacity",
            "oxserve_workers_min",
            "oxserve_workers_max",
        ] {
            if let Some(f) = self.family(name) {
                f.remove(&[model_name, model_version]);
            }
        }
        if let Some(f) = self.family("oxserve_workers") {
            for st in WorkerState::ALL {
                f.remove(&[model_name, model_version, st.as_str()]);
            }
        }
    }

    /// WorkerLoadTime of one worker, in ms.
    pub fn worker_load_time(&self, worker_name: &str) -> Handle {
        self.ts("WorkerLoadTime", &[("WorkerName", worker_name)])
    }

    /// Removes a retired worker's WorkerLoadTime series.
    pub fn forget_worker(&self, worker_name: &str) {
        if let Some(f) = self.family("WorkerLoadTime") {
            f.remove_where("WorkerName", worker_name);
        }
    }

    /// The series of one GPU.
    pub fn gpu(&self, device_id: u32) -> GpuMetrics {
        let id = device_id.to_string();
        let k = [("DeviceId", id.as_str())];
        GpuMetrics {
            utilization: self.ts("GPUUtilization", &k),
            memory_utilization: self.ts("GPUMemoryUtilization", &k),
            memory_used: self.ts("GPUMemoryUsed", &k),
        }
    }

    /// Records one `[METRICS]` line from a handler of `model_name`: declared metrics per
    /// metrics.yaml, undeclared ones only with model_metrics_auto_detect, the rest counted as
    /// dropped. Handler code chooses names and label values, so the series of each handler family,
    /// and the number of auto-detected families, stop at `model_metrics_max_series`; what comes
    /// past it is dropped and counted with reason `cardinality`.
    pub fn record_backend_line(&self, text: &str, model_name: &str) {
        let parsed = match line::parse(text) {
            Ok(l) => l,
            Err(reason) => {
                self.drop_malformed(&line_name(text), &reason, text);
                return;
            }
        };
        let family = match self.family(&parsed.name) {
            Some(f) if f.meta.model_origin => f,
            Some(_) => {
                self.drop_undeclared(&parsed.name, "it is a frontend metric");
                return;
            }
            None if self.auto_detect => match self.auto_family(&parsed) {
                Ok(f) => f,
                Err(Refusal::Malformed(reason)) => {
                    self.drop_malformed(&parsed.name, &reason, text);
                    return;
                }
                Err(Refusal::Cardinality(reason)) => {
                    self.drop_cardinality(&parsed.name, &reason);
                    return;
                }
            },
            None => {
                self.drop_undeclared(&parsed.name, "it is not declared in metrics.yaml");
                return;
            }
        };
        let mut values = Vec::with_capacity(family.meta.label_names.len());
        for label in &family.meta.label_names {
            let v = parsed
                .dimensions
                .iter()
                .find(|(k, _)| k == label)
                .map(|(_, v)| v.as_str());
            let v = match (label.as_str(), v) {
                (_, Some(v)) => v,
                ("Hostname", None) => self.hostname.as_str(),
                ("ModelName", None) => model_name,
                ("Level", None) => "Model",
                (other, None) => {
                    self.drop_undeclared(
                        &parsed.name,
                        &format!("the line lacks dimension {other:?} declared in metrics.yaml"),
                    );
                    return;
                }
            };
            values.push(v);
        }
        match family.series_within(&values, &self.log, self.max_series) {
            Some(series) => {
                series.record(parsed.value, parsed.request_ids.first().map(String::as_str))
            }
            None => self.drop_cardinality(
                &parsed.name,
                &format!(
                    "it already has {} series (model_metrics_max_series); a label value per request or per input makes a series per request",
                    self.max_series
                ),
            ),
        }
    }

    /// The family for an undeclared metric under auto-detection, created on first use, or why
    /// the line is dropped.
    fn auto_family(&self, parsed: &line::MetricLine) -> Result<Arc<Family>, Refusal> {
        let kind = parsed.kind.unwrap_or(Kind::Gauge);
        let mut dims: Vec<&str> = parsed.dimensions.iter().map(|(k, _)| k.as_str()).collect();
        if kind == Kind::Histogram && dims.contains(&"le") {
            return Err(Refusal::Malformed(
                "a histogram cannot have a dimension named \"le\"".into(),
            ));
        }
        // Sample names must stay unique on /metrics: `X_count` next to a histogram `X` (or a
        // histogram `X` next to `X_count`) would make the whole scrape unparsable.
        let clash = ["_bucket", "_sum", "_count"].iter().find_map(|sfx| {
            let base_is_histogram = parsed.name.strip_suffix(sfx).is_some_and(|base| {
                self.family(base)
                    .is_some_and(|f| f.meta.kind == Kind::Histogram)
            });
            let would_shadow =
                kind == Kind::Histogram && self.family(&format!("{}{sfx}", parsed.name)).is_some();
            (base_is_histogram || would_shadow).then_some(*sfx)
        });
        if let Some(sfx) = clash {
            return Err(Refusal::Malformed(format!(
                "its samples would clash with a histogram's {sfx} samples"
            )));
        }
        if !dims.contains(&"Hostname") {
            dims.push("Hostname");
        }
        // Counted before the family exists; two racing lines may both pass at the very edge,
        // which only moves the cap by one.
        if self
            .auto_families
            .load(std::sync::atomic::Ordering::Relaxed)
            >= self.max_series
        {
            return Err(Refusal::Cardinality(format!(
                "{} auto-detected families exist already (model_metrics_max_series)",
                self.max_series
            )));
        }
        let help = format!(
            "Torchserve prometheus {} metric with unit: {}",
            kind.as_str(),
            parsed.unit
        );
        let buckets = if kind == Kind::Histogram {
            self.buckets.clone()
        } else {
            Vec::new()
        };
        let before = self.families.read().unwrap().len();
        let family = self.add_family(&parsed.name, kind, &parsed.unit, help, &dims, buckets, true);
        if self.families.read().unwrap().len() > before {
            self.auto_families
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(family)
    }

    fn drop_malformed(&self, name: &str, reason: &str, text: &str) {
        self.dropped_malformed.inc();
        let shown: String = text.chars().take(300).collect();
        self.warn_once(
            &format!("malformed:{name}"),
            &format!("dropped a malformed backend metric line ({reason}): {shown:?}; further malformed lines of {name:?} are counted in oxserve_backend_metric_lines_dropped_total, not logged"),
        );
    }

    fn drop_undeclared(&self, name: &str, why: &str) {
        self.dropped_undeclared.inc();
        self.warn_once(
            &format!("undeclared:{name}"),
            &format!("dropped backend metric {name}: {why} (set model_metrics_auto_detect=true to accept undeclared metrics)"),
        );
    }

    fn drop_cardinality(&self, name: &str, why: &str) {
        self.dropped_cardinality.inc();
        self.warn_once(
            &format!("cardinality:{name}"),
            &format!("dropped backend metric {name}: {why}; further drops are counted in oxserve_backend_metric_lines_dropped_total{{reason=\"cardinality\"}}"),
        );
    }

    /// Logs `message` the first time `key` (a reason and a metric name) is seen.
    fn warn_once(&self, key: &str, message: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.len() > MAX_WARNED || warned.contains(key) {
            return;
        }
        if warned.len() == MAX_WARNED {
            warned.insert(String::new());
            tracing::warn!("{MAX_WARNED} distinct backend metric problems logged; further ones are only counted in oxserve_backend_metric_lines_dropped_total");
            return;
        }
        warned.insert(key.to_string());
        tracing::warn!("{message}");
    }

    /// Renders /metrics: every exposed family, or only those `names` select (family or sample
    /// names). The cost grows with the families asked for, not with all that exist.
    pub fn render(&self, names: Option<&[String]>) -> String {
        let mut out = String::with_capacity(16 * 1024);
        match names {
            None => {
                let families: Vec<Arc<Family>> =
                    self.families.read().unwrap().values().cloned().collect();
                for f in families.iter().filter(|f| f.meta.exposed) {
                    f.render(&mut out, None);
                }
            }
            Some(names) => {
                let mut done = HashSet::new();
                for name in names {
                    let (family, only) = match self.family(name) {
                        Some(f) => (Some(f), None),
                        None => match ["_bucket", "_sum", "_count"]
                            .iter()
                            .find_map(|sfx| name.strip_suffix(sfx).map(|base| (base, *sfx)))
                        {
                            Some((base, sfx)) => (
                                self.family(base).filter(|f| f.meta.kind == Kind::Histogram),
                                Some(sfx),
                            ),
                            None => (None, None),
                        },
                    };
                    if let Some(f) = family.filter(|f| f.meta.exposed) {
                        if done.insert((f.meta.name.clone(), only)) {
                            f.render(&mut out, only);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Why an auto-detected metric line is dropped.
enum Refusal {
    Malformed(String),
    Cardinality(String),
}

/// The metric name a line starts with, for "once per metric name" warnings about lines that do not
/// parse: the text before the first `.`, `:` or `|`, at most 100 characters.
fn line_name(text: &str) -> String {
    text.split(['.', ':', '|'])
        .next()
        .unwrap_or_default()
        .chars()
        .take(100)
        .collect()
}

/// The machine's host name, as TorchServe puts it in the Hostname label.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes a NUL-terminated name into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn request_counts_are_exact_and_names_unchanged() {
        let m = Metrics::for_tests();
        let mm = m.model("echo", "1.0");
        let t = Timings::new(Instant::now());
        for _ in 0..6 {
            mm.record_request(&t, 200, false);
        }
        m.host.count_response(404);
        let out = m.render(None);
        assert!(out.contains("ts_inference_requests_total{model_name=\"echo\",model_version=\"default\",hostname=\"testhost\",} 6.0\n"), "{out}");
        assert!(out.contains("Requests4XX{Level=\"Host\",Hostname=\"testhost\",} 1.0\n"));
        assert!(out.contains("# HELP GPUUtilization Torchserve prometheus gauge metric with unit: Percent\n# TYPE GPUUtilization gauge\n"));
        assert!(!out.contains("Requests2XX_total"));
    }

    #[test]
    fn filtering_by_family_and_sample_name() {
        let m = Metrics::for_tests();
        let mm = m.model("echo", "1.0");
        mm.record_request(&Timings::new(Instant::now()), 200, true);
        let out = m.render(Some(&[
            "Requests2XX".into(),
            "oxserve_request_duration_seconds_count".into(),
        ]));
        assert!(out.starts_with("# HELP Requests2XX "));
        assert!(out.contains("oxserve_request_duration_seconds_count{"));
        assert!(!out.contains("_bucket"));
        assert_eq!(m.render(Some(&["nope".into()])), "");
    }

    #[test]
    fn auto_detect_accepts_undeclared_metrics_with_their_type() {
        let m = Metrics::new(
            Spec::builtin(),
            MetricsMode::Prometheus,
            true,
            crate::config::DEFAULT_BUCKETS.to_vec(),
            None,
            "h".into(),
        );
        m.record_backend_line(
            "Tokens.Count:3|#ModelName:llm,Region:eu \"west\"|#type:COUNTER|#hostname:x,1",
            "llm",
        );
        m.record_backend_line(
            "Tokens.Count:2|#ModelName:llm,Region:eu \"west\"|#type:COUNTER|#hostname:x,1",
            "llm",
        );
        m.record_backend_line(
            "Lat.ms:0.2|#ModelName:llm|#type:HISTOGRAM|#hostname:x,1",
            "llm",
        );
        let out = m.render(None);
        assert!(out.contains("# TYPE Tokens counter\n"), "{out}");
        assert!(
            out.contains(
                "Tokens{ModelName=\"llm\",Region=\"eu \\\"west\\\"\",Hostname=\"h\",} 5.0\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("# TYPE Lat histogram\n")
                && out.contains("Lat_count{ModelName=\"llm\",Hostname=\"h\",} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("oxserve_backend_metric_lines_dropped_total{reason=\"undeclared\",} 0.0")
        );
    }

    #[test]
    fn backend_lines_declared_undeclared_malformed() {
        let m = Metrics::for_tests();
        m.record_backend_line(
            "HandlerTime.ms:5.5|#ModelName:echo,Level:Model|#type:GAUGE|#hostname:x,1,r",
            "echo",
        );
        m.record_backend_line(
            "Custom.Count:1|#ModelName:echo,Level:Model|#type:COUNTER|#hostname:x,1",
            "echo",
        );
        m.record_backend_line("garbage", "echo");
        let out = m.render(None);
        assert!(
            out.contains(
                "HandlerTime{ModelName=\"echo\",Level=\"Model\",Hostname=\"testhost\",} 5.5\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("oxserve_backend_metric_lines_dropped_total{reason=\"undeclared\",} 1.0")
        );
        assert!(
            out.contains("oxserve_backend_metric_lines_dropped_total{reason=\"malformed\",} 1.0")
        );
        assert!(!out.contains("Custom"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(32))]

            /// Whatever lines a handler prints, every handler family stays within the series
            /// cap, auto-detected families stay within it too, and the exposition stays parseable
            /// line by line (HELP, TYPE or a sample).
            #[test]
            fn handler_lines_stay_within_the_caps(
                lines in proptest::collection::vec(
                    ("[A-C][a-c_]{0,3}", "[a-z]{1,3}", "[0-9]{1,3}", proptest::collection::vec(("[a-c]{1,2}|le|__name__", "\\PC{0,6}"), 0..4), "GAUGE|COUNTER|HISTOGRAM"),
                    1..80,
                ),
            ) {
                let cap = 4;
                let m = Metrics::new(
                    Spec::builtin(),
                    MetricsMode::Prometheus,
                    true,
                    crate::config::DEFAULT_BUCKETS.to_vec(),
                    None,
                    "h".into(),
                )
                .with_max_series(cap);
                let builtin: HashSet<String> = m.families.read().unwrap().keys().cloned().collect();
                for (name, unit, value, dims, kind) in &lines {
                    let dims: Vec<String> = dims.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    m.record_backend_line(
                        &format!("{name}.{unit}:{value}|#{}|#type:{kind}|#hostname:x,1", dims.join(",")),
                        "model",
                    );
                }
                let families = m.families.read().unwrap();
                let auto: Vec<&Arc<Family>> = families
                    .iter()
                    .filter(|(k, _)| !builtin.contains(*k))
                    .map(|(_, f)| f)
                    .collect();
                prop_assert!(auto.len() <= cap);
                for f in families.values().filter(|f| f.meta.model_origin) {
                    prop_assert!(f.len() <= cap, "{} has {} series", f.meta.name, f.len());
                    let mut names = f.meta.label_names.clone();
                    names.sort();
                    names.dedup();
                    prop_assert_eq!(names.len(), f.meta.label_names.len());
                }
                drop(families);
                for line in m.render(None).lines() {
                    prop_assert!(
                        line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.contains(' '),
                        "{line:?}"
                    );
                }
            }
        }
    }
}
