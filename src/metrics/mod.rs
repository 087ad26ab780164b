//! The one metric registry. Everything that records a metric records it here; /metrics and the log
//! files read it from here.
//!
//! Families come from metrics.yaml (TorchServe's names, types and dimensions, exactly) plus oxserve's
//! own `oxserve_` families. Recorders hold pre-resolved [`Handle`]s ([`ModelMetrics`] per model
//! version, [`HostMetrics`] for the server), so the request path does atomic adds and nothing else.

pub mod families;
mod handles;
pub mod line;
pub mod log;
pub mod registry;
pub mod spec;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{Config, MetricsMode};
use families as f;
use log::LogSink;
use registry::{Family, FamilyDef, Sink};
pub use spec::SpecError;
use spec::{Kind, MetricSpec, Origin, Spec};

use handles::TsCounters;
pub use handles::{
    GpuMetrics, Handle, HostMetrics, LazyHandle, ModelMetrics, Timings, Usage, WorkerState,
};

/// How the registry is built, besides metrics.yaml.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: MetricsMode,
    /// Accept handler metrics that metrics.yaml does not declare (`model_metrics_auto_detect`).
    pub auto_detect: bool,
    /// Buckets of oxserve's latency histograms and of auto-detected handler histograms.
    pub buckets: Vec<f64>,
    /// Most series per handler family, and most auto-detected families (`model_metrics_max_series`).
    pub max_series: usize,
    /// The `Hostname` label's value.
    pub hostname: String,
    /// Where logged families' updates go (the metric log files); `None` logs nothing.
    pub sink: Option<Arc<dyn Sink>>,
}

impl Settings {
    /// Prometheus mode, default buckets and caps, host "testhost", no log: for tests and benchmarks.
    pub fn for_tests() -> Settings {
        Settings {
            mode: MetricsMode::Prometheus,
            auto_detect: false,
            buckets: crate::config::DEFAULT_BUCKETS.to_vec(),
            max_series: crate::config::DEFAULT_MODEL_METRICS_MAX_SERIES,
            hostname: "testhost".into(),
            sink: None,
        }
    }
}

/// The registry.
pub struct Metrics {
    pub mode: MetricsMode,
    families: Families,
    auto_detect: bool,
    buckets: Vec<f64>,
    pub host: Arc<HostMetrics>,
    dropped_malformed: Handle,
    dropped_undeclared: Handle,
    dropped_cardinality: Handle,
    /// Most series per handler family, and most auto-detected families (`model_metrics_max_series`).
    max_series: usize,
    /// Families created by auto-detection so far.
    auto_families: AtomicUsize,
    /// (reason, metric name) pairs already reported as dropped, so each is logged once.
    warned: Mutex<HashSet<String>>,
    /// metrics.yaml's handler metrics as JSON, for Python workers ([`Spec::handler_metrics_json`]).
    handler_metrics_json: String,
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

/// The families by name, and what every new family or series needs: the mode (which decides where
/// a family's updates go), the log sink, and the host name (the `Hostname` label).
struct Families {
    mode: MetricsMode,
    sink: Option<Arc<dyn Sink>>,
    hostname: String,
    map: RwLock<BTreeMap<String, Arc<Family>>>,
}

impl Families {
    /// Adds a family, or returns the one of that name that exists already (the first definition
    /// wins: a metrics.yaml family shadows an oxserve one of the same name).
    fn add(&self, def: FamilyDef) -> Arc<Family> {
        // TorchServe's MetricBuilder: a metric is either a Prometheus metric or a LogMetric, never
        // both, so prometheus mode logs no metric lines (its metric log files stay empty).
        let (exposed, logged) = match self.mode {
            MetricsMode::Prometheus => (true, false),
            MetricsMode::Log => (false, true),
            MetricsMode::Legacy => {
                let kept = f::LEGACY_EXPOSED.contains(&def.name.as_str());
                (kept, !kept)
            }
        };
        let mut map = self.map.write().unwrap();
        if let Some(existing) = map.get(&def.name) {
            return existing.clone();
        }
        let sink = if logged { self.sink.clone() } else { None };
        let name = def.name.clone();
        let family = Arc::new(Family::new(def, exposed, sink));
        map.insert(name, family.clone());
        family
    }

    fn get(&self, name: &str) -> Option<Arc<Family>> {
        self.map.read().unwrap().get(name).cloned()
    }

    fn series(&self, name: &str, values: &[&str]) -> Handle {
        Handle(self.get(name).map(|f| f.series(values)))
    }

    /// A series whose label values are filled by dimension name (see [`Families::resolve`]), any
    /// dimension not known being "".
    fn by_dimension(&self, name: &str, level: &str, known: &[(&str, &str)]) -> Handle {
        let Some(family) = self.get(name) else {
            return Handle::default();
        };
        let lookup = |label: &str| known.iter().find(|(k, _)| *k == label).map(|(_, v)| *v);
        let values = self.resolve(&family.meta.label_names, level, lookup, Some(""));
        Handle(values.ok().map(|v| family.series(&v)))
    }

    /// The one label resolver: the values of `labels`, in order. A label takes its value from
    /// `given` first; failing that, `Level` is `level` ("Host" for frontend series, "Model" for
    /// handler ones, as TorchServe fills it), `Hostname` is this host, and any other label is
    /// `missing`, or, without one, resolution fails naming the label.
    fn resolve<'a>(
        &'a self,
        labels: &'a [String],
        level: &'a str,
        given: impl Fn(&str) -> Option<&'a str>,
        missing: Option<&'a str>,
    ) -> Result<Vec<&'a str>, &'a str> {
        labels
            .iter()
            .map(|label| {
                given(label)
                    .or(match label.as_str() {
                        "Level" => Some(level),
                        "Hostname" | "hostname" => Some(self.hostname.as_str()),
                        _ => missing,
                    })
                    .ok_or(label.as_str())
            })
            .collect()
    }
}

/// The definition of a metrics.yaml entry. Handler metrics get a Hostname dimension if they lack
/// one: every `[METRICS]` line carries its host, and TorchServe labels them with it.
fn declared(s: &MetricSpec) -> FamilyDef {
    let help = format!(
        "Torchserve prometheus {} metric with unit: {}",
        s.kind.as_str(),
        s.unit
    );
    let mut labels = s.dimensions.clone();
    if s.origin == Origin::Model && !labels.iter().any(|d| d == "Hostname") {
        labels.push("Hostname".to_string());
    }
    let def = FamilyDef::new(&s.name, s.kind, help)
        .unit(&s.unit)
        .labels(&labels)
        .buckets(s.buckets.as_deref().unwrap_or(f::TORCHSERVE_BUCKETS));
    match s.origin {
        Origin::Model => def.from_handlers(),
        Origin::Frontend => def,
    }
}

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
        let log =
            LogSink::open(&config.metrics_log_dir, config.metrics_log_max_bytes).map_err(|e| {
                MetricsError::LogDir {
                    dir: config.metrics_log_dir.clone(),
                    source: e,
                }
            })?;
        Ok(Metrics::new(
            &spec,
            Settings {
                mode: config.metrics_mode,
                auto_detect: config.model_metrics_auto_detect,
                buckets: config.histogram_buckets.clone(),
                max_series: config.model_metrics_max_series,
                hostname: hostname(),
                sink: Some(Arc::new(log)),
            },
        ))
    }

    /// Waits until the metric log lines recorded so far are in their files: call at shutdown, so
    /// that the last events (written by a background thread) are not lost.
    pub fn flush_log(&self) {
        if let Some(sink) = &self.families.sink {
            sink.flush();
        }
    }

    /// The registry of the families `spec` declares and oxserve's own, with the server-wide
    /// series resolved.
    pub fn new(spec: &Spec, settings: Settings) -> Metrics {
        let families = Families {
            mode: settings.mode,
            sink: settings.sink,
            hostname: settings.hostname,
            map: RwLock::new(BTreeMap::new()),
        };
        for def in spec
            .metrics
            .iter()
            .map(declared)
            .chain(f::own(&settings.buckets))
        {
            families.add(def);
        }
        families
            .series(f::BUILD_INFO, &[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        // Present at 0 from the start, so that an alert on their rate sees the series.
        let dropped = |reason: &str| {
            let h = families.series(f::BACKEND_LINES_DROPPED, &[reason]);
            h.inc_by(0.0);
            h
        };
        let host_series = |name: &str| families.by_dimension(name, "Host", &[]);
        let host = HostMetrics {
            requests: [f::REQUESTS_2XX, f::REQUESTS_4XX, f::REQUESTS_5XX].map(host_series),
            queue_time: host_series(f::QUEUE_TIME),
            worker_thread_time: host_series(f::WORKER_THREAD_TIME),
        };
        Metrics {
            mode: settings.mode,
            auto_detect: settings.auto_detect,
            buckets: settings.buckets,
            host: Arc::new(host),
            dropped_malformed: dropped("malformed"),
            dropped_undeclared: dropped("undeclared"),
            dropped_cardinality: dropped("cardinality"),
            max_series: settings.max_series,
            auto_families: AtomicUsize::new(0),
            warned: Mutex::new(HashSet::new()),
            handler_metrics_json: spec.handler_metrics_json(),
            families,
        }
    }

    /// A registry with the built-in metric set, for tests and benchmarks.
    pub fn for_tests() -> Metrics {
        Metrics::new(&Spec::builtin(), Settings::for_tests())
    }

    /// The handler metrics metrics.yaml declares, as JSON in its shape: handed to Python workers,
    /// which declare them in `context.metrics` without reading YAML.
    pub fn handler_metrics_json(&self) -> &str {
        &self.handler_metrics_json
    }

    /// The `Hostname` label's value.
    pub fn hostname(&self) -> &str {
        &self.families.hostname
    }

    /// A family by name.
    pub fn family(&self, name: &str) -> Option<Arc<Family>> {
        self.families.get(name)
    }

    /// The series of family `name` with these label values; nothing if the family does not exist.
    pub fn series(&self, name: &str, values: &[&str]) -> Handle {
        self.families.series(name, values)
    }

    /// A frontend series whose label values are filled by dimension name: Level -> Host,
    /// Hostname -> this host, the rest from `known`; a dimension nobody knows gets "".
    pub fn ts(&self, name: &str, known: &[(&str, &str)]) -> Handle {
        self.families.by_dimension(name, "Host", known)
    }

    /// Resolves every series a model version records into.
    pub fn model(&self, model_name: &str, model_version: &str) -> Arc<ModelMetrics> {
        let ts_counters = |label_version: &str| {
            let k = [("model_name", model_name), ("model_version", label_version)];
            TsCounters {
                requests: self.ts(f::TS_INFERENCE_REQUESTS, &k),
                latency_us: self.ts(f::TS_INFERENCE_LATENCY, &k),
                queue_latency_us: self.ts(f::TS_QUEUE_LATENCY, &k),
            }
        };
        let mv = [model_name, model_version];
        let s = |name: &str| self.series(name, &mv);
        let lazy = |name: &str| LazyHandle {
            family: self.family(name),
            values: vec![model_name.to_string(), model_version.to_string()],
            cell: std::sync::OnceLock::new(),
        };
        let state = |st: WorkerState| {
            let h = self.series(f::WORKERS, &[model_name, model_version, st.as_str()]);
            h.set(0.0);
            h
        };
        let class = |c: &str| {
            let h = self.series(f::MODEL_RESPONSES, &[model_name, model_version, c]);
            h.inc_by(0.0);
            h
        };
        let scale = |direction: &str, trigger: &str| {
            let h = self.series(
                f::WORKER_SCALE_EVENTS,
                &[model_name, model_version, direction, trigger],
            );
            h.inc_by(0.0);
            h
        };
        let model_gauge = |name: &str| {
            self.families
                .by_dimension(name, "Model", &[("ModelName", model_name)])
        };
        Arc::new(ModelMetrics {
            model_name: model_name.to_string(),
            model_version: model_version.to_string(),
            url_default: ts_counters("default"),
            url_version: ts_counters(model_version),
            request_duration: s(f::REQUEST_DURATION),
            queue_wait: s(f::QUEUE_WAIT),
            backend_duration: s(f::BACKEND_DURATION),
            batch_size: s(f::BATCH_SIZE),
            first_chunk: s(f::TIME_TO_FIRST_CHUNK),
            queue_depth: s(f::QUEUE_DEPTH),
            requests_running: s(f::REQUESTS_RUNNING),
            inter_chunk: s(f::INTER_TOKEN_LATENCY),
            stream_chunks: lazy(f::STREAM_CHUNKS),
            prompt_tokens: lazy(f::PROMPT_TOKENS),
            generated_tokens: lazy(f::GENERATED_TOKENS),
            requests_cancelled: lazy(f::REQUESTS_CANCELLED),
            queue_capacity: s(f::QUEUE_CAPACITY),
            workers_min: s(f::WORKERS_MIN),
            workers_max: s(f::WORKERS_MAX),
            workers: WorkerState::ALL.map(state),
            scale_events: [
                [scale("up", "request"), scale("up", "autoscale")],
                [scale("down", "request"), scale("down", "autoscale")],
            ],
            responses: ["2xx", "4xx", "5xx"].map(class),
            handler_time: model_gauge(f::HANDLER_TIME),
            prediction_time: model_gauge(f::PREDICTION_TIME),
            host: self.host.clone(),
        })
    }

    /// Removes a model version's gauges (queue, workers) once it is unregistered. Counters and
    /// histograms stay: they are cumulative, and Prometheus' rate() needs them not to vanish.
    pub fn forget_model(&self, model_name: &str, model_version: &str) {
        for name in [
            f::QUEUE_DEPTH,
            f::REQUESTS_RUNNING,
            f::QUEUE_CAPACITY,
            f::WORKERS_MIN,
            f::WORKERS_MAX,
        ] {
            if let Some(family) = self.family(name) {
                family.remove(&[model_name, model_version]);
            }
        }
        if let Some(family) = self.family(f::WORKERS) {
            for st in WorkerState::ALL {
                family.remove(&[model_name, model_version, st.as_str()]);
            }
        }
    }

    /// WorkerLoadTime of one worker, in ms.
    pub fn worker_load_time(&self, worker_name: &str) -> Handle {
        self.ts(f::WORKER_LOAD_TIME, &[("WorkerName", worker_name)])
    }

    /// Removes a retired worker's WorkerLoadTime series.
    pub fn forget_worker(&self, worker_name: &str) {
        if let Some(family) = self.family(f::WORKER_LOAD_TIME) {
            family.remove_where("WorkerName", worker_name);
        }
    }

    /// The series of one GPU.
    pub fn gpu(&self, device_id: u32) -> GpuMetrics {
        let id = device_id.to_string();
        let k = [("DeviceId", id.as_str())];
        GpuMetrics {
            utilization: self.ts(f::GPU_UTILIZATION, &k),
            memory_utilization: self.ts(f::GPU_MEMORY_UTILIZATION, &k),
            memory_used: self.ts(f::GPU_MEMORY_USED, &k),
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
                self.drop_malformed(&line_name(text), &reason.to_string(), text);
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
        let given = |label: &str| {
            let from_line = parsed.dimensions.iter().find(|(k, _)| k == label);
            match from_line {
                Some((_, v)) => Some(v.as_str()),
                None if label == "ModelName" => Some(model_name),
                None => None,
            }
        };
        let values = match self
            .families
            .resolve(&family.meta.label_names, "Model", given, None)
        {
            Ok(values) => values,
            Err(missing) => {
                self.drop_undeclared(
                    &parsed.name,
                    &format!("the line lacks dimension {missing:?} declared in metrics.yaml"),
                );
                return;
            }
        };
        match family.series_within(&values, self.max_series) {
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
        if self.auto_families.load(Ordering::Relaxed) >= self.max_series {
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
        let def = FamilyDef::new(&parsed.name, kind, help)
            .unit(&parsed.unit)
            .labels(&dims)
            .buckets(&self.buckets)
            .from_handlers();
        let before = self.families.map.read().unwrap().len();
        let family = self.families.add(def);
        if self.families.map.read().unwrap().len() > before {
            self.auto_families.fetch_add(1, Ordering::Relaxed);
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
                let families: Vec<Arc<Family>> = self
                    .families
                    .map
                    .read()
                    .unwrap()
                    .values()
                    .cloned()
                    .collect();
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
            &Spec::builtin(),
            Settings {
                auto_detect: true,
                hostname: "h".into(),
                ..Settings::for_tests()
            },
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
                && out.contains("Lat_count{ModelName=\"llm\",Hostname=\"h\",} 1.0\n"),
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
                    &Spec::builtin(),
                    Settings {
                        auto_detect: true,
                        max_series: cap,
                        hostname: "h".into(),
                        ..Settings::for_tests()
                    },
                );
                let builtin: HashSet<String> = m.families.map.read().unwrap().keys().cloned().collect();
                for (name, unit, value, dims, kind) in &lines {
                    let dims: Vec<String> = dims.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    m.record_backend_line(
                        &format!("{name}.{unit}:{value}|#{}|#type:{kind}|#hostname:x,1", dims.join(",")),
                        "model",
                    );
                }
                let families = m.families.map.read().unwrap();
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
