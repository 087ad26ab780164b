//! The dashboard's memory: a bounded, in-process history of the metric registry.
//!
//! Once a second the sampler reads the registry (the same series /metrics renders) and turns the
//! cumulative counters and histograms into what a person looks at: requests per second, error
//! percentages, latency quantiles, gauges. Each derived point covers the trailing
//! [`WINDOW_SAMPLES`] samples, like Prometheus' `rate(x[5s])` and `histogram_quantile` over
//! `rate(x_bucket[5s])`, so the page, `oxserve top` and a Grafana panel agree on what a number means.
//!
//! TorchServe has no such history (its metrics leave the process, to logs or to a scraper); this
//! exists so that a server started without Prometheus or Grafana can still show its dashboards.
//!
//! Memory is bounded by construction: per tracked entity (model, GPU, the host) and per column,
//! one ring of [`FINE_POINTS`] points at 1 s (15 minutes) and one of [`COARSE_POINTS`] points
//! every [`COARSE_EVERY`] samples (60 minutes), as `f32`. A column's rings are allocated only once
//! it has had a value, so families that never get data (no GPU, no streaming, no LLM) cost nothing,
//! and at most [`MAX_MODELS`] models are tracked. docs/dashboard.md has the figures.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

use crate::metrics::families as f;
use crate::metrics::registry::{Cells, Series};
use crate::metrics::Metrics;

/// Derived points cover this many sample intervals (5 s at the 1 s sampling period).
pub const WINDOW_SAMPLES: usize = 5;
/// Points kept at full (1 s) resolution: 15 minutes.
pub const FINE_POINTS: usize = 900;
/// Every how many samples a point goes into the coarse tier: one per 5 s.
pub const COARSE_EVERY: u64 = 5;
/// Points kept in the coarse tier: 60 minutes at 5 s.
pub const COARSE_POINTS: usize = 720;
/// Models tracked at most; more are counted as untracked (memory stays bounded whatever is
/// registered).
pub const MAX_MODELS: usize = 100;
/// GPUs tracked at most.
pub const MAX_GPUS: usize = 16;
/// Time ranges the page offers, in seconds.
pub const RANGES: [u32; 3] = [300, 900, 3600];

/// Whose series a column reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    /// One model (all its versions summed), told apart by `model_name` or `ModelName`.
    Model,
    /// Server-level series.
    Host,
    /// One GPU, told apart by `DeviceId`.
    Gpu,
}

impl Entity {
    /// Label names that carry the entity's key, in order of preference.
    fn key_labels(self) -> &'static [&'static str] {
        match self {
            Entity::Model => &["model_name", "ModelName"],
            Entity::Host => &[],
            Entity::Gpu => &["DeviceId"],
        }
    }
}

/// The series of a family a column reads: all of the entity's, or those whose label has a value.
#[derive(Debug, Clone, Copy)]
pub struct Sel {
    pub family: &'static str,
    pub only: Option<(&'static str, &'static str)>,
}

const fn all(family: &'static str) -> Sel {
    Sel { family, only: None }
}

const fn only(family: &'static str, label: &'static str, value: &'static str) -> Sel {
    Sel {
        family,
        only: Some((label, value)),
    }
}

/// How a column's value is derived from the registry.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// The gauges' current value (summed over the selected series).
    Gauge(Sel),
    /// The counters' increase per second over the window.
    Rate(Sel),
    /// 100 x increase of `num` / increase of the `den` counters over the window (no traffic: none).
    Percent { num: Sel, den: &'static [Sel] },
    /// The `q` quantile of the histogram's observations in the window (Prometheus'
    /// histogram_quantile: linear within the bucket).
    Quantile { sel: Sel, q: f64 },
}

impl Source {
    fn sels(&self) -> Vec<Sel> {
        match self {
            Source::Gauge(s) | Source::Rate(s) | Source::Quantile { sel: s, .. } => vec![*s],
            Source::Percent { num, den } => {
                std::iter::once(*num).chain(den.iter().copied()).collect()
            }
        }
    }
}

/// One derived time series per entity: the unit of storage, and a field of `/dashboard/api/latest`.
#[derive(Debug)]
pub struct Column {
    pub key: &'static str,
    pub entity: Entity,
    pub label: &'static str,
    pub unit: &'static str,
    pub source: Source,
    /// Multiplies the value (seconds to ms).
    pub scale: f64,
}

const fn col(
    key: &'static str,
    entity: Entity,
    label: &'static str,
    unit: &'static str,
    source: Source,
    scale: f64,
) -> Column {
    Column {
        key,
        entity,
        label,
        unit,
        source,
        scale,
    }
}

const RESPONSES: &str = f::MODEL_RESPONSES;
const ALL_RESPONSES: &[Sel] = &[all(RESPONSES)];
const HOST_REQUESTS: &[Sel] = &[
    all(f::REQUESTS_2XX),
    all(f::REQUESTS_4XX),
    all(f::REQUESTS_5XX),
];
const DURATION: &str = f::REQUEST_DURATION;
/// The family whose series exist exactly while a model version is registered.
const MODEL_PRESENCE: &str = f::QUEUE_CAPACITY;
/// The family whose series name the GPUs NVML reports.
const GPU_PRESENCE: &str = f::GPU_MEMORY_USED;

/// Families of the LLM panels, all oxserve's own (src/metrics). Time to first token is the
/// first-chunk histogram: for a token stream the first chunk is the first token, and one family
/// for both keeps the two from disagreeing. Their panels appear once a model has data in them
/// (a stream, or a reply carrying an OpenAI `usage`).
pub const LLM_TTFT: &str = f::TIME_TO_FIRST_CHUNK;
pub const LLM_ITL: &str = f::INTER_TOKEN_LATENCY;
pub const LLM_TOKENS: &str = f::GENERATED_TOKENS;

use Entity::{Gpu, Host, Model};

/// Every column, defined once: the sampler, the page's panels and `oxserve top` read this table.
#[rustfmt::skip]
pub const COLUMNS: &[Column] = &[
    col("req_per_s", Model, "requests/s", "req/s", Source::Rate(all(f::TS_INFERENCE_REQUESTS)), 1.0),
    col("err_5xx_per_s", Model, "5xx/s", "req/s", Source::Rate(only(RESPONSES, "status_class", "5xx")), 1.0),
    col("err_4xx_per_s", Model, "4xx/s", "req/s", Source::Rate(only(RESPONSES, "status_class", "4xx")), 1.0),
    col("err_5xx_pct", Model, "5xx % of this model's requests", "%", Source::Percent { num: only(RESPONSES, "status_class", "5xx"), den: ALL_RESPONSES }, 1.0),
    col("err_4xx_pct", Model, "4xx % of this model's requests", "%", Source::Percent { num: only(RESPONSES, "status_class", "4xx"), den: ALL_RESPONSES }, 1.0),
    col("p50_ms", Model, "p50", "ms", Source::Quantile { sel: all(DURATION), q: 0.5 }, 1000.0),
    col("p90_ms", Model, "p90", "ms", Source::Quantile { sel: all(DURATION), q: 0.9 }, 1000.0),
    col("p99_ms", Model, "p99", "ms", Source::Quantile { sel: all(DURATION), q: 0.99 }, 1000.0),
    col("handler_ms", Model, "HandlerTime", "ms", Source::Gauge(all(f::HANDLER_TIME)), 1.0),
    col("prediction_ms", Model, "PredictionTime", "ms", Source::Gauge(all(f::PREDICTION_TIME)), 1.0),
    col("queue_wait_p99_ms", Model, "queue wait p99", "ms", Source::Quantile { sel: all(f::QUEUE_WAIT), q: 0.99 }, 1000.0),
    col("queue_depth", Model, "queue depth", "requests", Source::Gauge(all(f::QUEUE_DEPTH)), 1.0),
    col("requests_running", Model, "running in workers", "requests", Source::Gauge(all(f::REQUESTS_RUNNING)), 1.0),
    col("queue_capacity", Model, "queue capacity", "requests", Source::Gauge(all(MODEL_PRESENCE)), 1.0),
    col("workers_starting", Model, "starting", "workers", Source::Gauge(only(f::WORKERS, "state", "starting")), 1.0),
    col("workers_ready", Model, "ready", "workers", Source::Gauge(only(f::WORKERS, "state", "ready")), 1.0),
    col("workers_busy", Model, "busy", "workers", Source::Gauge(only(f::WORKERS, "state", "busy")), 1.0),
    col("workers_stopping", Model, "stopping", "workers", Source::Gauge(only(f::WORKERS, "state", "stopping")), 1.0),
    col("ttft_p50_ms", Model, "TTFT p50", "ms", Source::Quantile { sel: all(LLM_TTFT), q: 0.5 }, 1000.0),
    col("ttft_p99_ms", Model, "TTFT p99", "ms", Source::Quantile { sel: all(LLM_TTFT), q: 0.99 }, 1000.0),
    col("itl_p50_ms", Model, "inter-token p50", "ms", Source::Quantile { sel: all(LLM_ITL), q: 0.5 }, 1000.0),
    col("itl_p99_ms", Model, "inter-token p99", "ms", Source::Quantile { sel: all(LLM_ITL), q: 0.99 }, 1000.0),
    col("tokens_per_s", Model, "tokens/s", "tokens/s", Source::Rate(all(LLM_TOKENS)), 1.0),
    col("host_5xx_pct", Host, "5xx % of all responses (Requests5XX)", "%", Source::Percent { num: all(f::REQUESTS_5XX), den: HOST_REQUESTS }, 1.0),
    col("queue_time_ms", Host, "QueueTime (last request)", "ms", Source::Gauge(all(f::QUEUE_TIME)), 1.0),
    col("cpu_pct", Host, "CPU", "%", Source::Gauge(all(f::CPU_UTILIZATION)), 1.0),
    col("mem_pct", Host, "memory", "%", Source::Gauge(all(f::MEMORY_UTILIZATION)), 1.0),
    col("mem_used_mb", Host, "memory used", "MB", Source::Gauge(all(f::MEMORY_USED)), 1.0),
    col("gpu_mem_pct", Gpu, "memory utilization", "%", Source::Gauge(all(f::GPU_MEMORY_UTILIZATION)), 1.0),
    col("gpu_mem_used_mb", Gpu, "memory used", "MB", Source::Gauge(all(GPU_PRESENCE)), 1.0),
    col("gpu_util_pct", Gpu, "utilization", "%", Source::Gauge(all(f::GPU_UTILIZATION)), 1.0),
];

/// A chart of the page: the columns it draws.
#[derive(Debug)]
pub struct Panel {
    pub id: &'static str,
    pub title: &'static str,
    /// Shown even without data (the four dashboards and the model's queue and workers); the
    /// others (GPU, streaming, LLM, host) appear once their families have data.
    pub always: bool,
    pub columns: &'static [&'static str],
}

/// Every panel, in page order.
#[rustfmt::skip]
pub const PANELS: &[Panel] = &[
    Panel { id: "throughput", title: "Throughput", always: true, columns: &["req_per_s"] },
    Panel { id: "latency", title: "Latency: HandlerTime, PredictionTime, QueueTime", always: true, columns: &["handler_ms", "prediction_ms", "queue_time_ms", "queue_wait_p99_ms"] },
    Panel { id: "quantiles", title: "Request latency quantiles", always: true, columns: &["p50_ms", "p90_ms", "p99_ms"] },
    Panel { id: "errors", title: "Error rate", always: true, columns: &["err_5xx_pct", "err_4xx_pct", "host_5xx_pct"] },
    Panel { id: "queue", title: "Queue depth vs capacity", always: true, columns: &["queue_depth", "requests_running", "queue_capacity"] },
    Panel { id: "workers", title: "Workers by state", always: true, columns: &["workers_ready", "workers_busy", "workers_starting", "workers_stopping"] },
    Panel { id: "gpu_memory", title: "GPU memory", always: false, columns: &["gpu_mem_pct", "gpu_mem_used_mb"] },
    Panel { id: "host", title: "Host CPU and memory", always: false, columns: &["cpu_pct", "mem_pct"] },
    Panel { id: "llm_ttft", title: "Streaming: time to first chunk (LLM: first token)", always: false, columns: &["ttft_p50_ms", "ttft_p99_ms"] },
    Panel { id: "llm_itl", title: "LLM: inter-token latency", always: false, columns: &["itl_p50_ms", "itl_p99_ms"] },
    Panel { id: "llm_tokens", title: "LLM: tokens/s", always: false, columns: &["tokens_per_s"] },
];

fn column(key: &str) -> Option<(usize, &'static Column)> {
    COLUMNS.iter().enumerate().find(|(_, c)| c.key == key)
}

/// The columns of one entity kind, as indexes into [`COLUMNS`].
fn columns_of(entity: Entity) -> Vec<usize> {
    (0..COLUMNS.len())
        .filter(|&i| COLUMNS[i].entity == entity)
        .collect()
}

/// One reading of one column's series for one entity, before derivation.
#[derive(Debug, Clone, Default)]
struct Raw {
    /// Whether any selected series exists.
    seen: bool,
    /// Gauge or counter sum, or the numerator of a percentage.
    a: f64,
    /// Denominator of a percentage.
    b: f64,
    /// Per-bucket (not cumulative) counts of a histogram, summed; the last is +Inf.
    hist: Vec<u64>,
}

/// The state of one tracked entity.
struct Track {
    /// Readings of the last WINDOW_SAMPLES + 1 samples, oldest first: (time, one Raw per column).
    recent: VecDeque<(f64, Vec<Raw>)>,
    /// Global index (per tier) of the entity's first point: earlier points are null for it.
    first: [u64; 2],
    /// Per column of the entity kind, per tier: the ring, once the column has had a value.
    rings: Vec<[Option<Box<[f32]>>; 2]>,
}

impl Track {
    fn new(n_columns: usize, first: [u64; 2]) -> Track {
        Track {
            recent: VecDeque::with_capacity(WINDOW_SAMPLES + 1),
            first,
            rings: (0..n_columns).map(|_| [None, None]).collect(),
        }
    }

    fn heap_bytes(&self) -> usize {
        let rings: usize = self
            .rings
            .iter()
            .flatten()
            .flatten()
            .map(|r| r.len() * std::mem::size_of::<f32>())
            .sum();
        let recent: usize = self
            .recent
            .iter()
            .map(|(_, raws)| {
                raws.len() * std::mem::size_of::<Raw>()
                    + raws.iter().map(|r| r.hist.capacity() * 8).sum::<usize>()
            })
            .sum();
        rings + recent + self.rings.capacity() * std::mem::size_of::<[Option<Box<[f32]>>; 2]>()
    }
}

const TIER_CAP: [usize; 2] = [FINE_POINTS, COARSE_POINTS];
const TIER_STEP: [u32; 2] = [1, COARSE_EVERY as u32];

/// The history. One sampler writes it once a second; handlers read it.
pub struct History {
    /// Points written per tier so far.
    count: [u64; 2],
    /// Wall-clock time (Unix seconds) of each point, per tier, as rings.
    times: [Vec<f64>; 2],
    host: Track,
    gpus: BTreeMap<String, Track>,
    models: BTreeMap<String, Track>,
    /// Registered models not tracked because MAX_MODELS are.
    untracked: usize,
    model_columns: Vec<usize>,
    host_columns: Vec<usize>,
    gpu_columns: Vec<usize>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

/// What the JSON endpoints can refuse.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HistoryError {
    #[error("Model not found: {0}")]
    UnknownModel(String),
    #[error("range {0} is not one of 300, 900, 3600 (seconds)")]
    BadRange(String),
}

impl History {
    pub fn new() -> History {
        let model_columns = columns_of(Model);
        let host_columns = columns_of(Host);
        let gpu_columns = columns_of(Gpu);
        History {
            count: [0, 0],
            times: [vec![f64::NAN; FINE_POINTS], vec![f64::NAN; COARSE_POINTS]],
            host: Track::new(host_columns.len(), [0, 0]),
            gpus: BTreeMap::new(),
            models: BTreeMap::new(),
            untracked: 0,
            model_columns,
            host_columns,
            gpu_columns,
        }
    }

    /// Heap memory the history holds, in bytes (rings, recent readings, timelines).
    pub fn heap_bytes(&self) -> usize {
        let keys: usize = self
            .models
            .keys()
            .chain(self.gpus.keys())
            .map(|k| k.capacity() + 64)
            .sum();
        self.times.iter().map(|t| t.len() * 8).sum::<usize>()
            + self.host.heap_bytes()
            + self.gpus.values().map(Track::heap_bytes).sum::<usize>()
            + self.models.values().map(Track::heap_bytes).sum::<usize>()
            + keys
    }

    /// Names of the tracked models.
    pub fn models(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// Takes one sample of the registry at wall-clock time `now` (Unix seconds).
    pub fn sample(&mut self, metrics: &Metrics, now: f64) {
        // Which entities exist now: registered models, GPUs NVML reported.
        let registered = entity_keys(metrics, Model, MODEL_PRESENCE);
        let gpus = entity_keys(metrics, Gpu, GPU_PRESENCE);
        let next = self.count;
        // The entity's first point in each tier is the next one written there.
        let first = next;
        // An unregistered model's history goes with it (counters stay in the registry, but the
        // page has nothing to show for a model that no longer serves).
        self.models.retain(|k, _| registered.contains(k));
        self.untracked = 0;
        for name in &registered {
            if !self.models.contains_key(name) {
                if self.models.len() >= MAX_MODELS {
                    self.untracked += 1;
                    continue;
                }
                let track = Track::new(self.model_columns.len(), first);
                self.models.insert(name.clone(), track);
            }
        }
        self.gpus.retain(|k, _| gpus.contains(k));
        for id in gpus.iter().take(MAX_GPUS) {
            if !self.gpus.contains_key(id) {
                let track = Track::new(self.gpu_columns.len(), first);
                self.gpus.insert(id.clone(), track);
            }
        }

        let readings = [
            read(metrics, Model, &self.model_columns, &self.models),
            read(metrics, Gpu, &self.gpu_columns, &self.gpus),
        ];
        let host_reading = read_host(metrics, &self.host_columns);
        let coarse = next[0].is_multiple_of(COARSE_EVERY);
        self.times[0][(next[0] % FINE_POINTS as u64) as usize] = now;
        if coarse {
            self.times[1][(next[1] % COARSE_POINTS as u64) as usize] = now;
        }
        let [models_read, gpus_read] = readings;
        for (track, raws) in self.models.values_mut().zip(models_read) {
            record(track, &self.model_columns, metrics, now, raws, next, coarse);
        }
        for (track, raws) in self.gpus.values_mut().zip(gpus_read) {
            record(track, &self.gpu_columns, metrics, now, raws, next, coarse);
        }
        record(
            &mut self.host,
            &self.host_columns,
            metrics,
            now,
            host_reading,
            next,
            coarse,
        );
        self.count[0] += 1;
        if coarse {
            self.count[1] += 1;
        }
    }

    /// The points of the last `range` seconds for one model (default: the first one), with the
    /// host and GPU panels: what the page draws.
    pub fn history(&self, model: Option<&str>, range: u32) -> Result<HistoryView, HistoryError> {
        if !RANGES.contains(&range) {
            return Err(HistoryError::BadRange(range.to_string()));
        }
        let model_name = match model {
            Some(m) if self.models.contains_key(m) => Some(m.to_string()),
            Some(m) => return Err(HistoryError::UnknownModel(m.to_string())),
            None => self.models.keys().next().cloned(),
        };
        let tier = usize::from(range > (FINE_POINTS as u32) * TIER_STEP[0]);
        let step = TIER_STEP[tier];
        let n = self.count[tier];
        let k = ((range / step) as u64).min(n).min(TIER_CAP[tier] as u64);
        let indexes = n - k..n;
        let times: Vec<f64> = indexes
            .clone()
            .map(|i| self.times[tier][(i % TIER_CAP[tier] as u64) as usize])
            .collect();
        let track_model = model_name.as_ref().and_then(|m| self.models.get(m));
        let mut panels = Vec::new();
        for p in PANELS {
            let mut series = Vec::new();
            for key in p.columns {
                let Some((ci, c)) = column(key) else { continue };
                let mut push = |track: &Track, cols: &[usize], label: String, key: String| {
                    let pos = cols.iter().position(|&x| x == ci);
                    let values = pos
                        .and_then(|pos| track.rings[pos][tier].as_ref())
                        .map(|ring| {
                            indexes
                                .clone()
                                .map(|i| {
                                    let v = ring[(i % TIER_CAP[tier] as u64) as usize];
                                    (i >= track.first[tier] && v.is_finite()).then_some(v)
                                })
                                .collect::<Vec<_>>()
                        });
                    if let Some(values) = values {
                        series.push(SeriesView {
                            key,
                            label,
                            unit: c.unit,
                            values,
                        });
                    }
                };
                match c.entity {
                    Model => {
                        if let Some(t) = track_model {
                            push(t, &self.model_columns, c.label.to_string(), c.key.into());
                        }
                    }
                    Host => push(&self.host, &self.host_columns, c.label.into(), c.key.into()),
                    Gpu => {
                        for (id, t) in &self.gpus {
                            push(
                                t,
                                &self.gpu_columns,
                                format!("GPU {id} {}", c.label),
                                format!("{}:{id}", c.key),
                            );
                        }
                    }
                }
            }
            let has_data = series.iter().any(|s| s.values.iter().any(Option::is_some));
            if p.always || has_data {
                panels.push(PanelView {
                    id: p.id,
                    title: p.title,
                    series,
                });
            }
        }
        Ok(HistoryView {
            model: model_name,
            models: self.models(),
            untracked_models: self.untracked,
            range_s: range,
            step_s: step,
            times,
            panels,
            memory_bytes: self.heap_bytes(),
        })
    }

    /// The newest point of every column of every entity: what `oxserve top` prints.
    pub fn latest(&self) -> LatestView {
        let Some(i) = self.count[0].checked_sub(1) else {
            return LatestView::default();
        };
        let at = (i % FINE_POINTS as u64) as usize;
        let values = |track: &Track, cols: &[usize]| -> BTreeMap<&'static str, Option<f32>> {
            cols.iter()
                .zip(&track.rings)
                .map(|(&ci, rings)| {
                    let v = rings[0]
                        .as_ref()
                        .map(|r| r[at])
                        .filter(|v| v.is_finite() && i >= track.first[0]);
                    (COLUMNS[ci].key, v)
                })
                .collect()
        };
        LatestView {
            time: Some(self.times[0][at]),
            host: values(&self.host, &self.host_columns),
            gpus: self
                .gpus
                .iter()
                .map(|(k, t)| (k.clone(), values(t, &self.gpu_columns)))
                .collect(),
            models: self
                .models
                .iter()
                .map(|(k, t)| (k.clone(), values(t, &self.model_columns)))
                .collect(),
            untracked_models: self.untracked,
        }
    }
}

/// `/dashboard/api/history`: what the page draws.
#[derive(Debug, Serialize)]
pub struct HistoryView {
    pub model: Option<String>,
    pub models: Vec<String>,
    pub untracked_models: usize,
    pub range_s: u32,
    pub step_s: u32,
    /// Unix seconds of each point.
    pub times: Vec<f64>,
    pub panels: Vec<PanelView>,
    pub memory_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct PanelView {
    pub id: &'static str,
    pub title: &'static str,
    pub series: Vec<SeriesView>,
}

#[derive(Debug, Serialize)]
pub struct SeriesView {
    pub key: String,
    pub label: String,
    pub unit: &'static str,
    /// One per time; null where the column had no value.
    pub values: Vec<Option<f32>>,
}

/// `/dashboard/api/latest`: the newest point of everything.
#[derive(Debug, Default, Serialize)]
pub struct LatestView {
    pub time: Option<f64>,
    pub host: BTreeMap<&'static str, Option<f32>>,
    pub gpus: BTreeMap<String, BTreeMap<&'static str, Option<f32>>>,
    pub models: BTreeMap<String, BTreeMap<&'static str, Option<f32>>>,
    pub untracked_models: usize,
}

/// Index of the label that carries an entity's key in a family, if the family has one.
fn key_label(entity: Entity, label_names: &[String]) -> Option<usize> {
    entity
        .key_labels()
        .iter()
        .find_map(|want| label_names.iter().position(|n| n == want))
}

/// The entity keys that have a series in `family` (sorted).
fn entity_keys(metrics: &Metrics, entity: Entity, family: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(f) = metrics.family(family) {
        if let Some(i) = key_label(entity, &f.meta.label_names) {
            f.for_each_series(|s| {
                if let Some(v) = s.label_values.get(i) {
                    out.insert(v.clone());
                }
            });
        }
    }
    out
}

/// Adds one series into a Raw (a value to a, b or both; histogram buckets to hist).
fn accumulate(raw: &mut Raw, s: &Series, into_a: bool, into_b: bool) {
    raw.seen = true;
    match &s.cells {
        Cells::Value(v) => {
            let v = v.get();
            if into_a {
                raw.a += v;
            }
            if into_b {
                raw.b += v;
            }
        }
        Cells::Histogram { counts, .. } => {
            if raw.hist.len() < counts.len() {
                raw.hist.resize(counts.len(), 0);
            }
            for (h, c) in raw.hist.iter_mut().zip(counts.iter()) {
                *h += c.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Whether a series passes a selector's label filter.
fn passes(sel: &Sel, label_names: &[String], s: &Series) -> bool {
    match sel.only {
        None => true,
        Some((label, value)) => label_names
            .iter()
            .position(|n| n == label)
            .is_some_and(|i| s.label_values.get(i).map(String::as_str) == Some(value)),
    }
}

/// Reads one Raw per (entity, column) for keyed entities (models, GPUs), in the map's order.
fn read(
    metrics: &Metrics,
    entity: Entity,
    cols: &[usize],
    tracks: &BTreeMap<String, Track>,
) -> Vec<Vec<Raw>> {
    let index: BTreeMap<&str, usize> = tracks
        .keys()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let mut out = vec![vec![Raw::default(); cols.len()]; tracks.len()];
    if tracks.is_empty() {
        return out;
    }
    for (j, &ci) in cols.iter().enumerate() {
        let c = &COLUMNS[ci];
        for (n, sel) in c.source.sels().iter().enumerate() {
            let Some(f) = metrics.family(sel.family) else {
                continue;
            };
            let Some(ki) = key_label(entity, &f.meta.label_names) else {
                continue;
            };
            let (into_a, into_b) = into(&c.source, n);
            f.for_each_series(|s| {
                if !passes(sel, &f.meta.label_names, s) {
                    return;
                }
                let Some(e) = s.label_values.get(ki).and_then(|k| index.get(k.as_str())) else {
                    return;
                };
                accumulate(&mut out[*e][j], s, into_a, into_b);
            });
        }
    }
    out
}

/// Reads the host's columns (every selected series counts).
fn read_host(metrics: &Metrics, cols: &[usize]) -> Vec<Raw> {
    let mut out = vec![Raw::default(); cols.len()];
    for (j, &ci) in cols.iter().enumerate() {
        let c = &COLUMNS[ci];
        for (n, sel) in c.source.sels().iter().enumerate() {
            let Some(f) = metrics.family(sel.family) else {
                continue;
            };
            let (into_a, into_b) = into(&c.source, n);
            f.for_each_series(|s| {
                if passes(sel, &f.meta.label_names, s) {
                    accumulate(&mut out[j], s, into_a, into_b);
                }
            });
        }
    }
    out
}

/// Where the n-th selector of a source adds: a percentage's numerator (first) into a, its
/// denominator's selectors (after it) into b; every other source has one selector, into a.
fn into(source: &Source, n: usize) -> (bool, bool) {
    match source {
        Source::Percent { .. } => (n == 0, n > 0),
        _ => (true, false),
    }
}

/// Derives every column's value from the window's readings and writes it into the rings.
fn record(
    track: &mut Track,
    cols: &[usize],
    metrics: &Metrics,
    now: f64,
    raws: Vec<Raw>,
    next: [u64; 2],
    coarse: bool,
) {
    if track.recent.len() > WINDOW_SAMPLES {
        track.recent.pop_front();
    }
    track.recent.push_back((now, raws));
    let (t_new, new) = track.recent.back().expect("just pushed");
    let (t_old, old) = track.recent.front().expect("not empty");
    let dt = t_new - t_old;
    for (j, &ci) in cols.iter().enumerate() {
        let c = &COLUMNS[ci];
        let v = derive(c, &old[j], &new[j], dt, metrics) * c.scale;
        let v = v as f32;
        for tier in 0..2 {
            if tier == 1 && !coarse {
                continue;
            }
            let ring = &mut track.rings[j][tier];
            if ring.is_none() && v.is_finite() {
                *ring = Some(vec![f32::NAN; TIER_CAP[tier]].into_boxed_slice());
            }
            if let Some(r) = ring {
                r[(next[tier] % TIER_CAP[tier] as u64) as usize] = v;
            }
        }
    }
}

/// A counter's increase between two readings; a decrease is a reset (Prometheus' rule).
fn increase(old: f64, new: f64) -> f64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

/// One column's value from the oldest and newest reading of the window (NaN: no value). A series
/// missing from the oldest reading counts from zero: counters and histograms are created by their
/// first update (a handler's first [METRICS] line), which must count. With a single reading (a new
/// entity) `dt` is 0 and rates have no value yet.
fn derive(c: &Column, old: &Raw, new: &Raw, dt: f64, metrics: &Metrics) -> f64 {
    if !new.seen {
        return f64::NAN;
    }
    match c.source {
        Source::Gauge(_) => new.a,
        Source::Rate(_) => {
            if dt > 0.0 {
                increase(old.a, new.a) / dt
            } else {
                f64::NAN
            }
        }
        Source::Percent { .. } => {
            let den = if dt > 0.0 {
                increase(old.b, new.b)
            } else {
                0.0
            };
            if den > 0.0 {
                100.0 * increase(old.a, new.a) / den
            } else {
                f64::NAN
            }
        }
        Source::Quantile { sel, q } => {
            if dt <= 0.0 {
                return f64::NAN;
            }
            let Some(f) = metrics.family(sel.family) else {
                return f64::NAN;
            };
            let deltas: Vec<u64> = new
                .hist
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(old.hist.get(i).copied().unwrap_or(0)))
                .collect();
            quantile(q, &f.meta.buckets, &deltas)
        }
    }
}

/// Prometheus' histogram_quantile over per-bucket counts (`counts` has one more entry than
/// `bounds`: +Inf). The first bucket's lower edge is 0; a rank in +Inf answers the largest bound.
pub fn quantile(q: f64, bounds: &[f64], counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 || !(0.0..=1.0).contains(&q) {
        return f64::NAN;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied().unwrap_or(f64::NAN);
            };
            let lower = if i == 0 {
                0.0f64.min(upper)
            } else {
                bounds[i - 1]
            };
            return lower + (upper - lower) * (rank - below as f64) / n as f64;
        }
        below += n;
    }
    bounds.last().copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::spec::Spec;
    use crate::metrics::Timings;
    use std::time::{Duration, Instant};

    fn registry() -> Metrics {
        // auto-detect on, so a test can create the LLM families the way a handler would.
        Metrics::new(
            &Spec::builtin(),
            crate::metrics::Settings {
                auto_detect: true,
                hostname: "h".into(),
                ..crate::metrics::Settings::for_tests()
            },
        )
    }

    fn request(mm: &crate::metrics::ModelMetrics, ms: u64, status: u16) {
        let now = Instant::now();
        let mut t = Timings::new(now);
        t.enqueued = Some(now);
        t.batch_start = Some(now + Duration::from_millis(1));
        t.first_chunk = Some(now + Duration::from_millis(ms / 2));
        t.responded = Some(now + Duration::from_millis(ms));
        mm.record_request(&t, status, false);
    }

    fn latest(h: &History, model: &str, key: &str) -> Option<f32> {
        h.latest().models[model][key]
    }

    fn close(a: Option<f32>, b: f64) -> bool {
        a.is_some_and(|a| ((a as f64) - b).abs() <= 1e-4 * b.abs().max(1.0))
    }

    #[test]
    fn quantiles_follow_histogram_quantile() {
        let bounds = [0.1, 0.5, 1.0];
        assert_eq!(quantile(0.5, &bounds, &[2, 2, 0, 0]), 0.1);
        assert!((quantile(0.75, &bounds, &[2, 2, 0, 0]) - 0.3).abs() < 1e-12);
        assert!((quantile(0.25, &bounds, &[4, 0, 0, 0]) - 0.025).abs() < 1e-12);
        // A rank in +Inf answers the largest finite bound, like Prometheus.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0, 1]), 1.0);
        assert!(quantile(0.5, &bounds, &[0, 0, 0, 0]).is_nan());
        assert!(quantile(1.5, &bounds, &[1, 0, 0, 0]).is_nan());
    }

    #[test]
    fn rates_percentages_quantiles_and_gauges_are_exact() {
        let m = registry();
        let mm = m.model("m", "1.0");
        mm.queue_depth.set(7.0);
        let mut h = History::new();
        h.sample(&m, 1000.0);
        // Nothing to derive a rate from yet; gauges are there at once.
        assert_eq!(latest(&h, "m", "req_per_s"), None);
        assert_eq!(latest(&h, "m", "queue_depth"), Some(7.0));
        // Each second: 8 requests of 20 ms (one of them a 503) and 2 of 200 ms.
        for s in 1..=7 {
            for i in 0..8 {
                request(&mm, 20, if i == 0 { 503 } else { 200 });
            }
            request(&mm, 200, 200);
            request(&mm, 200, 200);
            h.sample(&m, 1000.0 + s as f64);
        }
        assert!(close(latest(&h, "m", "req_per_s"), 10.0));
        assert!(close(latest(&h, "m", "err_5xx_per_s"), 1.0));
        assert!(close(latest(&h, "m", "err_5xx_pct"), 10.0));
        assert!(close(latest(&h, "m", "err_4xx_pct"), 0.0));
        // Window of 5 s: 40 observations in (0.01, 0.025], 10 in (0.1, 0.25].
        assert!(close(
            latest(&h, "m", "p50_ms"),
            (0.01 + 0.015 * 25.0 / 40.0) * 1000.0
        ));
        assert!(close(
            latest(&h, "m", "p90_ms"),
            (0.1 + 0.15 * 5.0 / 10.0) * 1000.0
        ));
        assert!(close(
            latest(&h, "m", "p99_ms"),
            (0.1 + 0.15 * 9.5 / 10.0) * 1000.0
        ));
        assert_eq!(latest(&h, "m", "workers_ready"), Some(0.0));
        // Families with no data for the model have no value, not zero.
        assert_eq!(latest(&h, "m", "itl_p50_ms"), None);
        assert_eq!(latest(&h, "m", "tokens_per_s"), None);
        // The host's 5xx share: every response counted by the listeners (none here).
        m.host.count_response(200);
        m.host.count_response(200);
        m.host.count_response(500);
        m.host.count_response(404);
        h.sample(&m, 1008.0);
        assert!(close(h.latest().host["host_5xx_pct"], 25.0));
        // A half-second sampling gap counts as half a second.
        for _ in 0..5 {
            request(&mm, 20, 200);
        }
        h.sample(&m, 1008.5);
        let expect = (10.0 * 3.0 + 5.0) / 4.5; // window: samples at 1004 .. 1008.5
        assert!(
            close(latest(&h, "m", "req_per_s"), expect),
            "{:?}",
            latest(&h, "m", "req_per_s")
        );
    }

    /// Records what a token stream records for a model: chunks with gaps and a usage.
    fn llm_traffic(m: &Metrics, model: &str) {
        let mm = m.model(model, "1");
        mm.record_chunk(None);
        mm.record_chunk(Some(Duration::from_millis(4)));
        mm.record_usage(crate::metrics::Usage {
            prompt_tokens: 8,
            completion_tokens: 32,
        });
    }

    #[test]
    fn unregistered_models_leave_the_history() {
        let m = registry();
        let (a, _b) = (m.model("a", "1"), m.model("b", "1"));
        let mut h = History::new();
        for s in 0..3 {
            request(&a, 5, 200);
            h.sample(&m, s as f64);
        }
        assert_eq!(h.models(), ["a", "b"]);
        let before = h.heap_bytes();
        m.forget_model("a", "1");
        h.sample(&m, 3.0);
        assert_eq!(h.models(), ["b"]);
        assert!(h.heap_bytes() < before);
        assert_eq!(
            h.history(Some("a"), 300).unwrap_err(),
            HistoryError::UnknownModel("a".into())
        );
        assert!(!h.latest().models.contains_key("a"));
        // Registered again: a fresh history, no points from before.
        let _a = m.model("a", "1");
        h.sample(&m, 4.0);
        let v = h.history(Some("a"), 300).unwrap();
        let q = v.panels.iter().find(|p| p.id == "queue").unwrap();
        let points = q.series[0].values.iter().filter(|v| v.is_some()).count();
        assert_eq!(points, 1);
        assert_eq!(q.series[0].values.len(), 5);
    }

    #[test]
    fn views_pick_the_tier_and_show_panels_with_data() {
        let m = registry();
        let mm = m.model("m", "1");
        let mut h = History::new();
        assert_eq!(
            h.history(None, 301).unwrap_err(),
            HistoryError::BadRange("301".into())
        );
        for s in 0..1000u32 {
            request(&mm, 5, 200);
            if s == 990 {
                llm_traffic(&m, "m");
            }
            h.sample(&m, f64::from(s));
        }
        let fine = h.history(None, 300).unwrap();
        assert_eq!((fine.model.as_deref(), fine.step_s), (Some("m"), 1));
        assert_eq!(fine.times.len(), 300);
        assert_eq!(fine.times.last(), Some(&999.0));
        let mid = h.history(None, 900).unwrap();
        assert_eq!(mid.times.len(), 900);
        let coarse = h.history(Some("m"), 3600).unwrap();
        assert_eq!((coarse.step_s, coarse.times.len()), (5, 200));
        // The coarse tier holds every fifth sample, with the same values as the fine tier.
        assert_eq!(coarse.times.last(), Some(&995.0));
        let req = |v: &HistoryView, at: f64| {
            let i = v.times.iter().position(|t| *t == at).unwrap();
            v.panels[0].series[0].values[i]
        };
        assert_eq!(req(&coarse, 990.0), req(&fine, 990.0));
        let ids: Vec<&str> = fine.panels.iter().map(|p| p.id).collect();
        // No GPU here, no host sampler in this test: those panels are absent; the streaming and
        // LLM panels appeared with their families' data (the test requests have a first chunk).
        assert_eq!(
            ids,
            [
                "throughput",
                "latency",
                "quantiles",
                "errors",
                "queue",
                "workers",
                "llm_ttft",
                "llm_itl",
                "llm_tokens"
            ]
        );
        let tokens = fine.panels.iter().find(|p| p.id == "llm_tokens").unwrap();
        assert!(tokens.series[0].values.iter().flatten().any(|v| *v > 0.0));
        // The JSON spells a missing value null.
        let json = serde_json::to_string(&fine).unwrap();
        assert!(json.contains("null") && !json.contains("NaN"));
    }

    #[test]
    fn memory_is_bounded_for_50_models_over_an_hour() {
        let m = registry();
        let models: Vec<_> = (0..50)
            .map(|i| m.model(&format!("model-{i}"), "1"))
            .collect();
        let mut h = History::new();
        let mut t = 0.0;
        // Every column of every model gets data (so every ring of both tiers is allocated), then an
        // hour passes.
        for _ in 0..=COARSE_EVERY {
            for (i, mm) in models.iter().enumerate() {
                request(mm, 5, 200);
                llm_traffic(&m, &format!("model-{i}"));
            }
            t += 1.0;
            h.sample(&m, t);
        }
        let allocated = |h: &History| {
            h.models
                .values()
                .flat_map(|t| t.rings.iter().flatten())
                .filter(|r| r.is_some())
                .count()
        };
        let model_columns = columns_of(Model);
        let t0 = &h.models["model-0"];
        let missing: Vec<&str> = model_columns
            .iter()
            .zip(&t0.rings)
            .filter(|(_, r)| r.iter().any(Option::is_none))
            .map(|(c, _)| COLUMNS[*c].key)
            .collect();
        assert!(missing.is_empty(), "{missing:?}");
        assert_eq!(allocated(&h), 50 * model_columns.len() * 2);
        for _ in 0..3600 {
            t += 1.0;
            h.sample(&m, t);
        }
        let hour = h.heap_bytes();
        assert!(hour <= 10 * 1024 * 1024, "{hour} bytes");
        for _ in 0..600 {
            t += 1.0;
            h.sample(&m, t);
        }
        assert_eq!(
            h.heap_bytes(),
            hour,
            "the history does not grow past its rings"
        );
        println!("50 models, every column, one hour: {hour} bytes");
    }

    #[test]
    fn models_beyond_the_cap_are_counted_not_tracked() {
        let m = registry();
        let _models: Vec<_> = (0..MAX_MODELS + 7)
            .map(|i| m.model(&format!("m{i:03}"), "1"))
            .collect();
        let mut h = History::new();
        h.sample(&m, 0.0);
        assert_eq!(h.models().len(), MAX_MODELS);
        assert_eq!(h.latest().untracked_models, 7);
        assert_eq!(h.history(None, 300).unwrap().untracked_models, 7);
    }

    #[test]
    fn gpus_get_their_own_series_when_nvml_reports_them() {
        let m = registry();
        let _mm = m.model("m", "1");
        let mut h = History::new();
        h.sample(&m, 0.0);
        assert!(h.latest().gpus.is_empty());
        let ids = |h: &History| -> Vec<&'static str> {
            h.history(None, 300)
                .unwrap()
                .panels
                .iter()
                .map(|p| p.id)
                .collect()
        };
        assert!(!ids(&h).contains(&"gpu_memory"));
        for (id, used) in [(0, 1000.0), (1, 2500.0)] {
            let g = m.gpu(id);
            g.memory_used.set(used);
            g.memory_utilization.set(used / 100.0);
            g.utilization.set(50.0);
        }
        h.sample(&m, 1.0);
        let latest = h.latest();
        assert_eq!(latest.gpus["1"]["gpu_mem_used_mb"], Some(2500.0));
        assert_eq!(latest.gpus["0"]["gpu_mem_pct"], Some(10.0));
        let view = h.history(None, 300).unwrap();
        let gpu = view.panels.iter().find(|p| p.id == "gpu_memory").unwrap();
        let labels: Vec<&str> = gpu.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "GPU 0 memory utilization",
                "GPU 1 memory utilization",
                "GPU 0 memory used",
                "GPU 1 memory used"
            ]
        );
        assert_eq!(gpu.series[3].values.last(), Some(&Some(2500.0)));
    }

    #[test]
    fn panels_name_existing_columns_once() {
        let mut keys: Vec<&str> = COLUMNS.iter().map(|c| c.key).collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "column keys are unique");
        for p in PANELS {
            for key in p.columns {
                assert!(
                    column(key).is_some(),
                    "panel {} names unknown column {key}",
                    p.id
                );
            }
        }
    }
}
