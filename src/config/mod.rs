//! One typed, validated [`Config`] from config.properties, `TS_*` environment variables and CLI flags.
//!
//! Precedence is TorchServe's: flags over environment (only with `enable_envvars_config=true`) over
//! the properties file over defaults. Every value is checked here, once, so the rest of the server
//! never sees a half-valid setting: a bad value stops start-up with one line naming key and value.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;

/// How metrics leave the server (`metrics_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsMode {
    /// Everything on /metrics (oxserve's default; TorchServe defaults to `log`).
    Prometheus,
    /// Everything written to ts_metrics.log / model_metrics.log; /metrics says so in a comment.
    Log,
    /// Only the three ts_* counters on /metrics; the rest logged.
    Legacy,
}

/// Which Python program runs handler workers (`worker_runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerRuntime {
    /// oxserve's standard-library worker (python/ in this repo); needs no torch.
    Oxserve,
    /// TorchServe's own `ts/model_service_worker.py` from the torchserve package.
    TorchServe,
}

/// How the log files are written (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// TorchServe's log4j2 line layouts, byte for byte.
    Text,
    /// One JSON object per line with stable field names (oxserve's own; see docs/logging.md).
    Json,
}

/// How the Python worker wraps requests and replies (`service_envelope`, TorchServe's
/// `ts/torch_handler/request_envelope/`): the name travels to the worker in the load message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceEnvelope {
    /// No envelope: the handler sees TorchServe's request rows as they are.
    None,
    /// KServe v1: `{"instances": [...]}` in, `{"predictions"|"explanations": [...]}` out.
    KServe,
    /// KServe v2 (Open Inference Protocol): `{"inputs": [tensors]}` in, `{"outputs": [...]}` out.
    KServeV2,
}

impl ServiceEnvelope {
    /// The name the worker protocol carries (TorchServe's values; "" for none).
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceEnvelope::None => "",
            ServiceEnvelope::KServe => "kserve",
            ServiceEnvelope::KServeV2 => "kservev2",
        }
    }
}

/// The PEM files of the HTTPS listeners (`private_key_file`, `certificate_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub private_key_file: PathBuf,
    pub certificate_file: PathBuf,
}

/// Which listeners serve HTTPS (their address starts with `https://`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsListeners {
    pub inference: bool,
    pub management: bool,
    pub metrics: bool,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub inference_address: SocketAddr,
    pub management_address: SocketAddr,
    pub metrics_address: SocketAddr,
    /// TorchServe's gRPC inference listener: `grpc_inference_address` (a host) and
    /// `grpc_inference_port`.
    pub grpc_inference_address: SocketAddr,
    /// TorchServe's gRPC management listener: `grpc_management_address` and `grpc_management_port`.
    pub grpc_management_address: SocketAddr,
    pub enable_metrics_api: bool,
    /// Listeners with an `https://` address.
    pub tls_listeners: TlsListeners,
    /// Key and certificate chain; set whenever a listener is HTTPS or gRPC uses TLS.
    pub tls: Option<TlsFiles>,
    /// `enable_grpc_ssl`: both gRPC listeners serve TLS with `tls`'s key and certificate.
    pub grpc_ssl: bool,
    /// `service_envelope`: how Python workers wrap requests and replies.
    pub service_envelope: ServiceEnvelope,
    /// The live dashboard on the metrics listener and its in-process history (`enable_dashboard`).
    pub enable_dashboard: bool,
    pub metrics_mode: MetricsMode,
    pub metrics_config: Option<PathBuf>,
    pub model_metrics_auto_detect: bool,
    pub disable_system_metrics: bool,
    pub metric_time_interval: Duration,
    pub model_store: Option<PathBuf>,
    /// Where workflow archives (.war) are looked up and downloaded to (`workflow_store`, or
    /// `--workflow-store`); workflows cannot be registered without one, as in TorchServe.
    pub workflow_store: Option<PathBuf>,
    /// `all`, or entries `name=file.mar` / `file.mar`.
    pub load_models: Vec<String>,
    pub default_workers_per_model: u32,
    /// Whether default_workers_per_model was set (not derived from the CPU count): TorchServe's
    /// register API starts that many workers when set, and none otherwise.
    pub default_workers_per_model_configured: bool,
    pub job_queue_size: usize,
    /// Threads that run the listeners, their connections and the schedulers
    /// (`number_of_netty_threads`, TorchServe's frontend event-loop threads); default: one per
    /// CPU, as in TorchServe.
    pub frontend_threads: usize,
    pub default_response_timeout: Duration,
    pub default_startup_timeout: Duration,
    pub batch_size: u32,
    pub max_batch_delay: Duration,
    pub max_request_size: usize,
    pub max_response_size: usize,
    pub enable_model_api: bool,
    pub disable_token_authorization: bool,
    /// How long a management or inference key stays valid (`token_expiration_min`).
    pub token_expiration: Duration,
    pub allowed_urls: Vec<Regex>,
    pub initial_worker_port: u32,
    /// Bearer token required on /metrics when set (oxserve's own key `metrics_auth_token`).
    pub metrics_auth_token: Option<String>,
    /// Bucket bounds in seconds for oxserve's latency histograms.
    pub histogram_buckets: Vec<f64>,
    pub python_executable: String,
    pub worker_runtime: WorkerRuntime,
    /// Where the metric log files go (METRICS_LOCATION, else ./logs, as in TorchServe).
    pub metrics_log_dir: PathBuf,
    /// Rotate a metrics log file once it grows past this many bytes.
    pub metrics_log_max_bytes: u64,
    /// Where access_log.log, model_log.log and ts_log.log go (LOG_LOCATION, else ./logs).
    pub log_dir: PathBuf,
    /// Write config snapshots to `{log_dir}/config` (off with --ncs; model::snapshot).
    pub snapshots: bool,
    /// The properties as read (file, environment, flags), written back into every snapshot.
    pub properties: BTreeMap<String, String>,
    /// The `model_snapshot` to restore at start (TorchServe restores it instead of load_models).
    pub model_snapshot: Option<crate::model::snapshot::Snapshot>,
    pub log_format: LogFormat,
    /// Roll a log file over once it would grow past this many bytes (TorchServe: 100 MB).
    pub log_max_bytes: u64,
    /// Rolled (gzipped) files kept per log file.
    pub log_max_files: usize,
    /// Longest log message written; a longer one (worker output included) is cut and marked.
    pub log_max_line_bytes: usize,
    /// One access_log.log line per request when true.
    pub enable_access_log: bool,
    /// No built-in demo model when false (set when the user names models or a store).
    pub builtin_default_model: bool,
    /// GPUs workers are spread over (`number_of_gpu`); the server caps it at the GPUs NVML finds.
    pub number_of_gpu: Option<u32>,
    /// Per model version settings from TorchServe's `models` key: model name -> version -> settings.
    pub models: BTreeMap<String, BTreeMap<String, ModelSettings>>,
    /// Ceiling of any model's batch size, wherever it is set (`max_batch_size`).
    pub max_batch_size: u32,
    /// Ceiling of any model version's worker count, wherever it is set (`max_workers_per_model`).
    pub max_workers_per_model: u32,
    /// Most bytes a `.mar` may unpack to, all entries together (`max_archive_unpacked_bytes`).
    pub max_archive_unpacked_bytes: u64,
    /// Most entries (files and folders) a `.mar` may hold (`max_archive_entries`).
    pub max_archive_entries: u64,
    /// Most series one handler metric family may hold (`model_metrics_max_series`).
    pub model_metrics_max_series: usize,
    /// Server-wide autoscaling rule (`autoscale_*` keys); models may override each part.
    pub autoscale: crate::worker::AutoscaleRule,
    /// Limits every listener's connections live under (docs/security.md).
    pub http: HttpLimits,
    /// Limits of a registration from an http:// URL.
    pub download: DownloadLimits,
    /// Address space of the child process that test-loads an ONNX model before the server loads
    /// it (`onnx_load_memory_limit`, bytes; `None`: [`default_onnx_load_memory_limit`]).
    pub onnx_load_memory_limit: Option<u64>,
    /// How long that test load may take (`onnx_load_timeout`, seconds).
    pub onnx_load_timeout: Duration,
    /// pip-installs a Python model's `requirementsFile` before its workers start
    /// (`install_py_dep_per_model`, TorchServe's key; docs/python-workers.md).
    pub install_py_dep_per_model: bool,
    /// How long that pip install may take (`install_py_dep_timeout`, seconds; oxserve's own).
    pub install_py_dep_timeout: Duration,
}

/// Default of `onnx_load_memory_limit` for a model file of `file_size` bytes: 4 GiB, or 8 times
/// the file for a larger model (tract holds the weights, their optimized copies and the parse
/// tree at once). Generous for a real model; a hostile one that declares a tensor of terabytes
/// still hits it long before the host runs out of memory.
pub fn default_onnx_load_memory_limit(file_size: u64) -> u64 {
    (4u64 << 30).max(file_size.saturating_mul(8))
}

/// Default of `install_py_dep_timeout` in seconds: room for a few large wheels on a slow link.
pub const DEFAULT_INSTALL_PY_DEP_TIMEOUT: u64 = 600;

/// Default of `onnx_load_timeout` in seconds.
pub const DEFAULT_ONNX_LOAD_TIMEOUT: u64 = 300;

/// Default of `max_archive_unpacked_bytes`: 64 GiB, room for the weights of a large LLM, yet
/// finite, so a zip bomb stops long before a disk is full.
pub const DEFAULT_MAX_ARCHIVE_UNPACKED_BYTES: u64 = 64 << 30;

/// Default of `max_archive_entries`.
pub const DEFAULT_MAX_ARCHIVE_ENTRIES: u64 = 100_000;

/// Default of `model_metrics_max_series`.
pub const DEFAULT_MODEL_METRICS_MAX_SERIES: usize = 1000;

/// Most bytes read from a small structured file: MANIFEST.json, model-config.yaml,
/// config.properties, metrics.yaml. They are read whole and parsed into trees many times their size,
/// so a file past this is refused before it is read.
pub const MAX_SMALL_FILE_BYTES: u64 = 1024 * 1024;

/// Ceiling of `job_queue_size`: a queue is a bound the operator chose, but a typo such as an extra
/// few digits should not silently turn into an unbounded queue.
pub const MAX_JOB_QUEUE_SIZE: u64 = 1_000_000;

/// Ceiling of `number_of_netty_threads`: a thread per CPU of the largest hosts, not a typo's
/// hundred thousand threads.
pub const MAX_FRONTEND_THREADS: u64 = 1024;

/// Ceiling of the timeout keys (seconds; milliseconds for max_batch_delay): a deadline that far
/// ahead is "never", and larger values overflow clock arithmetic.
pub const MAX_TIMEOUT: u64 = u32::MAX as u64;

/// `token_expiration_min`: minutes, fractions allowed as in TorchServe (`0.25` is 15 s), more
/// than 0 and at most [`MAX_TIMEOUT`] seconds. TorchServe logs a bad value and keeps 60; oxserve
/// refuses to start, as for every other key.
fn token_expiration(value: Option<&str>) -> Result<Duration, ConfigError> {
    let Some(v) = value else {
        return Ok(Duration::from_secs(60 * 60));
    };
    match v.parse::<f64>() {
        Ok(min) if min.is_finite() && min > 0.0 && min * 60.0 <= MAX_TIMEOUT as f64 => {
            Ok(Duration::from_secs_f64(min * 60.0))
        }
        _ => err(format!(
            "config key token_expiration_min: {v:?} is not a number of minutes above 0 and at most {}",
            MAX_TIMEOUT / 60
        )),
    }
}

/// Why a small structured file (config, manifest, spec) could not be read. `what` names the
/// file as the operator knows it (a path inside an archive, not a temporary folder).
#[derive(Debug, thiserror::Error)]
pub enum ReadFileError {
    /// Missing, unreadable, or not UTF-8.
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} is larger than the limit of {MAX_SMALL_FILE_BYTES} bytes")]
    TooLarge { what: String },
}

/// Reads a small structured file (see [`MAX_SMALL_FILE_BYTES`]) as text, refusing a larger one
/// without reading it. `what` names the file in errors.
pub fn read_small_file(path: &Path, what: &str) -> Result<String, ReadFileError> {
    use std::io::Read;
    let io = |source| ReadFileError::Io {
        what: what.to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    // Read one byte past the limit: a file that fills it is too large, whatever its metadata says
    // (a FIFO or /proc file has no useful length).
    file.take(MAX_SMALL_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_SMALL_FILE_BYTES {
        return Err(ReadFileError::TooLarge {
            what: what.to_string(),
        });
    }
    Ok(text)
}

/// Why a model's settings (an entry of the `models` key, or an archive's model-config.yaml) are
/// refused. `at` names the entry (`"m 1.0"`, `"model-config.yaml"`); for the autoscaling keys it
/// also names the key (`"m 1.0: autoscaleUpSamples"`, `"config key autoscale_up_samples"`).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{at}: must be an object")]
    NotObject { at: String },
    #[error("{at}: {key} {value} is not true or false")]
    NotBool {
        at: String,
        key: &'static str,
        value: serde_json::Value,
    },
    #[error("{at}: {key} {value} is not a non-negative integer")]
    NotCount {
        at: String,
        key: String,
        value: serde_json::Value,
    },
    #[error("{at}: {key} {value} must be an integer from {lo} to {hi}")]
    NotInRange {
        at: String,
        key: String,
        value: serde_json::Value,
        lo: u64,
        hi: u64,
    },
    #[error("{at}: {value} is outside {lo}..={hi}")]
    Outside {
        at: String,
        value: u64,
        lo: u64,
        hi: u64,
    },
    #[error(
        "{at}: sequenceBatching cannot be combined with asyncCommunication \
         (TorchServe has no such mode either)"
    )]
    SequenceWithAsync { at: String },
    #[error(
        "{at}: sequenceBatching needs sequenceMaxIdleMSec (how long an idle sequence \
         stays open, 1 to {max_ms} ms)"
    )]
    NoSequenceIdle { at: String, max_ms: u64 },
    #[error("{at}: minWorkers {min} is greater than maxWorkers {max}")]
    MinAboveMax { at: String, min: u32, max: u32 },
    #[error("{at}: batchSize 0 must be at least 1")]
    ZeroBatch { at: String },
    /// Over a server ceiling (`max_batch_size`, `max_workers_per_model`).
    #[error("{at}: {key} {value} is larger than {ceiling_key} {ceiling}")]
    OverCeiling {
        at: String,
        key: &'static str,
        value: u32,
        ceiling_key: &'static str,
        ceiling: u32,
    },
}

/// Connection limits of the three listeners (oxserve's own keys; TorchServe's Netty has none).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    /// The whole request head must arrive within this (`http_header_timeout`).
    pub header_timeout: Duration,
    /// Longest pause between two pieces of a request body (`http_body_timeout`).
    pub body_timeout: Duration,
    /// An idle keep-alive connection is closed after this (`http_keep_alive_timeout`).
    pub keep_alive_timeout: Duration,
    /// Open connections per listener (`http_max_connections`); `None`: derived from the
    /// open-file limit at start-up.
    pub max_connections: Option<usize>,
    /// Request line plus headers, in bytes (`http_max_header_size`).
    pub max_header_size: usize,
}

/// Limits of downloading an archive for registration.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadLimits {
    /// `download_connect_timeout`.
    pub connect_timeout: Duration,
    /// Longest pause between two pieces of the body (`download_read_timeout`).
    pub read_timeout: Duration,
    /// Refuse archives larger than this many bytes (`max_download_size`; `None`: no cap).
    pub max_size: Option<u64>,
}

/// One entry of the `models` key (TorchServe's per-model configuration).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSettings {
    pub mar_name: Option<String>,
    pub default_version: bool,
    pub min_workers: Option<u32>,
    pub max_workers: Option<u32>,
    pub batch_size: Option<u32>,
    pub max_batch_delay: Option<Duration>,
    pub response_timeout: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    /// oxserve's autoscaling rule, per model (`autoscaleIntervalMs`, ...).
    pub autoscale_interval: Option<Duration>,
    pub autoscale_queue_per_worker: Option<u32>,
    pub autoscale_up_samples: Option<u32>,
    pub autoscale_down_samples: Option<u32>,
    /// How requests reach the workers (`asyncCommunication`, `continuousBatching`, ...).
    pub batch_mode: Option<BatchMode>,
    /// `sequenceBatching: true` and its keys (stateful sessions pinned to one worker).
    pub sequence: Option<SequenceSettings>,
}

/// TorchServe's stateful-session keys (`sequenceBatching: true`; docs/scheduling.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSettings {
    /// Sessions open at once over the model version (`maxNumSequence`).
    pub max_sequences: u32,
    /// A session with nothing waiting or running for this long is closed (`sequenceMaxIdleMSec`).
    pub max_idle: Duration,
    /// A session is closed this long after it started (`sequenceTimeoutMSec`; None: never).
    pub timeout: Option<Duration>,
    /// Requests of one session waiting at once (`maxSequenceJobQueueSize`).
    pub max_queue: u32,
}

impl SequenceSettings {
    /// Ceiling of `maxNumSequence` and `maxSequenceJobQueueSize`: each session and each queued
    /// request holds memory, and a typo must not become an unbounded table.
    pub const MAX_COUNT: u32 = 100_000;

    /// Reads the keys when `sequenceBatching` is true. TorchServe's defaults: one sequence, a
    /// queue of one. `sequenceMaxIdleMSec` must be set: TorchServe treats 0 as "not stateful"
    /// and then fails every request of a sequence-batching model; oxserve refuses the model.
    fn from_fields(
        fields: &serde_json::Map<String, serde_json::Value>,
        at: &str,
    ) -> Result<Option<SequenceSettings>, SettingsError> {
        let at = || at.to_string();
        match fields.get("sequenceBatching") {
            None | Some(serde_json::Value::Bool(false)) => return Ok(None),
            Some(serde_json::Value::Bool(true)) => {}
            Some(v) => {
                return Err(SettingsError::NotBool {
                    at: at(),
                    key: "sequenceBatching",
                    value: v.clone(),
                })
            }
        }
        if fields.get("asyncCommunication").and_then(|v| v.as_bool()) == Some(true) {
            return Err(SettingsError::SequenceWithAsync { at: at() });
        }
        let number = |key: &str, default: u64, lo: u64, hi: u64| match fields.get(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => Err(SettingsError::NotInRange {
                    at: at(),
                    key: key.to_string(),
                    value: v.clone(),
                    lo,
                    hi,
                }),
            },
        };
        const DAY_MS: u64 = 24 * 3600 * 1000;
        let max_idle = number("sequenceMaxIdleMSec", 0, 0, DAY_MS)?;
        if max_idle == 0 {
            return Err(SettingsError::NoSequenceIdle {
                at: at(),
                max_ms: DAY_MS,
            });
        }
        let timeout = number("sequenceTimeoutMSec", 0, 0, 7 * DAY_MS)?;
        let most = u64::from(SequenceSettings::MAX_COUNT);
        Ok(Some(SequenceSettings {
            max_sequences: number("maxNumSequence", 1, 1, most)? as u32,
            max_idle: Duration::from_millis(max_idle),
            timeout: (timeout > 0).then(|| Duration::from_millis(timeout)),
            max_queue: number("maxSequenceJobQueueSize", 1, 1, most)? as u32,
        }))
    }
}

/// How a model version's requests reach its workers (docs/llm.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BatchMode {
    /// TorchServe's default: a worker takes a batch and answers it before it takes another.
    #[default]
    Classic,
    /// `asyncCommunication: true`: requests go to a worker as they arrive, many in flight, and
    /// replies come back in any order, matched by request id.
    Async,
    /// `continuousBatching: true`: a worker keeps its batch while replies carry
    /// `ts_stream_next: true` and freed slots are refilled from the queue at every step.
    Continuous,
}

impl BatchMode {
    /// The model-config.yaml keys that choose a mode, with the mode each selects.
    pub const KEYS: [(&'static str, BatchMode); 2] = [
        ("asyncCommunication", BatchMode::Async),
        ("continuousBatching", BatchMode::Continuous),
    ];

    /// The mode the boolean keys of `fields` select (None: none of them is set).
    fn from_fields(
        fields: &serde_json::Map<String, serde_json::Value>,
        at: &str,
    ) -> Result<Option<BatchMode>, SettingsError> {
        let mut mode = None;
        for (key, m) in BatchMode::KEYS {
            match fields.get(key) {
                None | Some(serde_json::Value::Bool(false)) => {}
                Some(serde_json::Value::Bool(true)) => mode = Some(m),
                Some(v) => {
                    return Err(SettingsError::NotBool {
                        at: at.to_string(),
                        key,
                        value: v.clone(),
                    })
                }
            }
        }
        Ok(mode)
    }
}

/// Limits of the autoscaling keys: (config.properties key, per-model field, min, max).
const AUTOSCALE_LIMITS: [(&str, &str, u64, u64); 4] = [
    (
        "autoscale_interval_ms",
        "autoscaleIntervalMs",
        10,
        3_600_000,
    ),
    (
        "autoscale_queue_per_worker",
        "autoscaleQueuePerWorker",
        1,
        1_000_000,
    ),
    ("autoscale_up_samples", "autoscaleUpSamples", 1, 1_000_000),
    (
        "autoscale_down_samples",
        "autoscaleDownSamples",
        1,
        1_000_000,
    ),
];

/// Checks one autoscaling value against [`AUTOSCALE_LIMITS`] (index `i`).
fn autoscale_value(i: usize, v: u64, at: &str) -> Result<u32, SettingsError> {
    let (_, _, lo, hi) = AUTOSCALE_LIMITS[i];
    // Every ceiling of the table fits in a u32, so the range check also makes the cast exact.
    u32::try_from(v)
        .ok()
        .filter(|_| (lo..=hi).contains(&v))
        .ok_or_else(|| SettingsError::Outside {
            at: at.to_string(),
            value: v,
            lo,
            hi,
        })
}

impl ModelSettings {
    /// Reads TorchServe's per-model fields (`minWorkers`, `batchSize`, ...) from a JSON object: an
    /// entry of the `models` key, or an archive's model-config.yaml. `at` names it in errors.
    pub fn from_fields(
        fields: &serde_json::Value,
        at: &str,
    ) -> Result<ModelSettings, SettingsError> {
        let fields = fields
            .as_object()
            .ok_or_else(|| SettingsError::NotObject { at: at.to_string() })?;
        let uint = |key: &str| match fields.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| SettingsError::NotCount {
                    at: at.to_string(),
                    key: key.to_string(),
                    value: v.clone(),
                }),
        };
        let settings = ModelSettings {
            mar_name: fields
                .get("marName")
                .and_then(|v| v.as_str())
                .map(String::from),
            default_version: fields
                .get("defaultVersion")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            min_workers: uint("minWorkers")?,
            max_workers: uint("maxWorkers")?,
            batch_size: uint("batchSize")?,
            max_batch_delay: uint("maxBatchDelay")?.map(|ms| Duration::from_millis(ms.into())),
            response_timeout: uint("responseTimeout")?.map(|s| Duration::from_secs(s.into())),
            startup_timeout: uint("startupTimeout")?.map(|s| Duration::from_secs(s.into())),
            autoscale_interval: None,
            autoscale_queue_per_worker: None,
            autoscale_up_samples: None,
            autoscale_down_samples: None,
            batch_mode: BatchMode::from_fields(fields, at)?,
            sequence: SequenceSettings::from_fields(fields, at)?,
        };
        let mut settings = settings;
        let mut scale = [None; 4];
        for (i, (_, field, _, _)) in AUTOSCALE_LIMITS.iter().enumerate() {
            if let Some(v) = uint(field)? {
                scale[i] = Some(autoscale_value(i, v.into(), &format!("{at}: {field}"))?);
            }
        }
        settings.autoscale_interval = scale[0].map(|ms| Duration::from_millis(ms.into()));
        settings.autoscale_queue_per_worker = scale[1];
        settings.autoscale_up_samples = scale[2];
        settings.autoscale_down_samples = scale[3];
        if let (Some(min), Some(max)) = (settings.min_workers, settings.max_workers) {
            if min > max {
                return Err(SettingsError::MinAboveMax {
                    at: at.to_string(),
                    min,
                    max,
                });
            }
        }
        if settings.batch_size == Some(0) {
            return Err(SettingsError::ZeroBatch { at: at.to_string() });
        }
        Ok(settings)
    }

    /// Checks the sizes against the server's ceilings (`max_batch_size`, `max_workers_per_model`).
    pub fn check_limits(
        &self,
        max_batch: u32,
        max_workers: u32,
        at: &str,
    ) -> Result<(), SettingsError> {
        for (key, v, ceiling_key, ceiling) in [
            ("batchSize", self.batch_size, "max_batch_size", max_batch),
            (
                "minWorkers",
                self.min_workers,
                "max_workers_per_model",
                max_workers,
            ),
            (
                "maxWorkers",
                self.max_workers,
                "max_workers_per_model",
                max_workers,
            ),
        ] {
            if let Some(value) = v.filter(|&n| n > ceiling) {
                return Err(SettingsError::OverCeiling {
                    at: at.to_string(),
                    key,
                    value,
                    ceiling_key,
                    ceiling,
                });
            }
        }
        Ok(())
    }

    /// Field by field: `self` where set, else `other`.
    pub fn or(self, other: ModelSettings) -> ModelSettings {
        ModelSettings {
            mar_name: self.mar_name.or(other.mar_name),
            default_version: self.default_version || other.default_version,
            min_workers: self.min_workers.or(other.min_workers),
            max_workers: self.max_workers.or(other.max_workers),
            batch_size: self.batch_size.or(other.batch_size),
            max_batch_delay: self.max_batch_delay.or(other.max_batch_delay),
            response_timeout: self.response_timeout.or(other.response_timeout),
            startup_timeout: self.startup_timeout.or(other.startup_timeout),
            autoscale_interval: self.autoscale_interval.or(other.autoscale_interval),
            autoscale_queue_per_worker: self
                .autoscale_queue_per_worker
                .or(other.autoscale_queue_per_worker),
            autoscale_up_samples: self.autoscale_up_samples.or(other.autoscale_up_samples),
            autoscale_down_samples: self.autoscale_down_samples.or(other.autoscale_down_samples),
            batch_mode: self.batch_mode.or(other.batch_mode),
            sequence: self.sequence.or(other.sequence),
        }
    }
}

/// Parses the `models` key: `{"name": {"1.0": {"marName": "x.mar", "minWorkers": 1, ...}}}`.
fn parse_models(
    value: &str,
    max_batch: u32,
    max_workers: u32,
) -> Result<BTreeMap<String, BTreeMap<String, ModelSettings>>, ConfigError> {
    let bad = |what: String| invalid(format!("config key models: {what}"));
    let refused = |source| ConfigError::Models { source };
    let json: serde_json::Value = serde_json::from_str(value)
        .map_err(|e| bad(format!("{value:?} is not valid JSON: {e}")))?;
    let models = json
        .as_object()
        .ok_or_else(|| bad("must be a JSON object of model names".into()))?;
    let mut out = BTreeMap::new();
    for (name, versions) in models {
        let versions = versions
            .as_object()
            .ok_or_else(|| bad(format!("{name}: must be an object of versions")))?;
        let mut parsed = BTreeMap::new();
        for (version, fields) in versions {
            let at = format!("{name} {version}");
            let settings = ModelSettings::from_fields(fields, &at).map_err(refused)?;
            settings
                .check_limits(max_batch, max_workers, &at)
                .map_err(refused)?;
            parsed.insert(version.clone(), settings);
        }
        out.insert(name.clone(), parsed);
    }
    Ok(out)
}

/// Default bounds for latency histograms: 0.5 ms to 60 s, roughly doubling.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// CLI flags that override the file and environment (the `torchserve --start` set).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub ts_config: Option<PathBuf>,
    pub model_store: Option<PathBuf>,
    pub workflow_store: Option<PathBuf>,
    pub models: Option<String>,
    pub disable_token_auth: bool,
    pub enable_model_api: bool,
    pub ncs: bool,
}

/// TorchServe keys oxserve accepts without reading them: the config file its snapshots name, the
/// keystore's password and type (a keystore is refused with advice, whatever they say), and
/// Netty's backend thread count (worker connections run on the frontend threads here).
const UNREAD_KEYS: &[&str] = &[
    "tsConfigFile",
    "keystore_pass",
    "keystore_type",
    "netty_client_threads",
];

/// Every key oxserve knows: the keys [`Config::from_sources`] reads (found once by parsing empty
/// sources and recording each lookup: the parser reads every key on every parse, so this list
/// cannot drift from the code), and [`UNREAD_KEYS`]. A key outside it is warned about, and only
/// these keys take `TS_<KEY>` environment overrides.
pub fn known_keys() -> &'static BTreeSet<String> {
    static KEYS: OnceLock<BTreeSet<String>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let read = RefCell::new(BTreeSet::new());
        // Empty sources parse with every default (a unit test checks it), reading each key.
        let _ = Config::parse_recording(HashMap::new(), &[], &Overrides::default(), None, &read);
        let mut keys = read.into_inner();
        keys.extend(UNREAD_KEYS.iter().map(|k| k.to_string()));
        keys
    })
}

/// A configuration error, one line: the server does not start with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read (missing, too large, not UTF-8).
    #[error(transparent)]
    Read(#[from] ReadFileError),
    /// The config file is not Java-properties text.
    #[error("cannot parse config file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: java_properties::PropertiesError,
    },
    /// An entry of the `models` key is refused.
    #[error("config key models: {source}")]
    Models { source: SettingsError },
    /// An autoscaling key is out of its range.
    #[error(transparent)]
    Autoscale(SettingsError),
    /// A key's value is refused; the message names the key and the offending value. (A
    /// sentence, not an enum: each of the many keys has its own rule, and nothing but a reader
    /// of the log or the start-up error looks at it.)
    #[error("{0}")]
    Invalid(String),
}

/// A checked key's value in the type the server holds it in. Range checks come first and keep
/// every value in range; this makes an `as` cast's silent truncation impossible if one is ever
/// loosened.
fn narrow<T: TryFrom<u64>>(key: &str, v: u64) -> Result<T, ConfigError> {
    T::try_from(v).map_err(|_| {
        invalid(format!(
            "config key {key}: \"{v}\" is larger than this platform can hold"
        ))
    })
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(invalid(msg))
}

/// Reads a Java-properties file into a map.
pub fn read_properties(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = read_small_file(path, &format!("config file {}", path.display()))?;
    parse_properties(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses Java-properties text (the testable core of [`read_properties`]).
pub fn parse_properties(
    text: &str,
) -> Result<HashMap<String, String>, java_properties::PropertiesError> {
    java_properties::read(text.as_bytes())
}

impl Config {
    /// Builds the configuration from the process environment and the given flags. Returns the
    /// config and the warnings (unknown keys) to log once logging is up.
    pub fn load(flags: &Overrides) -> Result<(Config, Vec<String>), ConfigError> {
        // Without a config named, TorchServe starts from the newest snapshot (unless --ncs),
        // then from ./config.properties.
        let path = flags.ts_config.clone().or_else(|| {
            std::env::var_os("TS_CONFIG_FILE")
                .map(PathBuf::from)
                .or_else(|| {
                    let last = (!flags.ncs)
                        .then(|| {
                            let log_dir = std::env::var_os("LOG_LOCATION")
                                .map(PathBuf::from)
                                .unwrap_or_else(|| PathBuf::from("logs"));
                            crate::model::snapshot::last(&crate::model::snapshot::dir(&log_dir))
                        })
                        .flatten();
                    last.or_else(|| {
                        Some(PathBuf::from("config.properties")).filter(|p| p.is_file())
                    })
                })
        });
        let file = match &path {
            Some(p) => read_properties(p)?,
            None => HashMap::new(),
        };
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::from_sources(file, &env, flags)
    }

    /// Builds the configuration from explicit sources (the testable core of [`Config::load`]).
    pub fn from_sources(
        file: HashMap<String, String>,
        env: &[(String, String)],
        flags: &Overrides,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let read = RefCell::new(BTreeSet::new());
        Config::parse_recording(file, env, flags, Some(known_keys()), &read)
    }

    /// [`Config::from_sources`], recording every key it looks up into `read`. `known` is `None`
    /// only while [`known_keys`] is being found (no warnings, no environment overrides then).
    fn parse_recording(
        file: HashMap<String, String>,
        env: &[(String, String)],
        flags: &Overrides,
        known: Option<&BTreeSet<String>>,
        read: &RefCell<BTreeSet<String>>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut warnings = Vec::new();
        let mut props: BTreeMap<String, String> = file
            .into_iter()
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let known_keys = known.into_iter().flatten();
        for key in props.keys() {
            if known.is_some_and(|k| !k.contains(key)) {
                warnings.push(format!("unknown config key {key:?} is ignored"));
            }
        }
        read.borrow_mut().insert("enable_envvars_config".into());
        let envvars_enabled = parse_bool(
            "enable_envvars_config",
            props
                .get("enable_envvars_config")
                .map(String::as_str)
                .unwrap_or("false"),
        )?;
        if let Some(store) = &flags.model_store {
            props.insert("model_store".into(), store.display().to_string());
        }
        if let Some(store) = &flags.workflow_store {
            props.insert("workflow_store".into(), store.display().to_string());
        }
        if let Some(models) = &flags.models {
            props.insert("load_models".into(), models.clone());
        }
        if flags.disable_token_auth {
            props.insert("disable_token_authorization".into(), "true".into());
        }
        if flags.enable_model_api {
            props.insert("enable_model_api".into(), "true".into());
        }
        // TorchServe applies the TS_* variables after the command line (ConfigManager's
        // setSystemVars runs last): `TS_DISABLE_TOKEN_AUTHORIZATION=false` turns token
        // authorization back on under `--disable-token-auth` (its test_priority_env_cmd).
        if envvars_enabled {
            for key in known_keys {
                let var = format!("TS_{}", key.to_ascii_uppercase());
                if let Some((_, v)) = env.iter().find(|(k, _)| *k == var) {
                    props.insert(key.to_string(), v.clone());
                }
            }
        }

        read.borrow_mut()
            .insert(crate::model::snapshot::MODEL_SNAPSHOT.into());
        let model_snapshot = match props.get(crate::model::snapshot::MODEL_SNAPSHOT) {
            Some(json) => Some(crate::model::snapshot::parse(json).map_err(|e| {
                invalid(format!(
                    "config key model_snapshot: invalid model_snapshot: {e}"
                ))
            })?),
            None => None,
        };
        if model_snapshot.is_some() && props.contains_key("load_models") {
            warnings.push(
                "restoring the models of model_snapshot: --models / load_models are ignored (as in TorchServe)".into(),
            );
            props.remove("load_models");
        }
        let get = |key: &str| {
            read.borrow_mut().insert(key.to_string());
            props.get(key).map(String::as_str)
        };
        let boolean = |key: &str, default: bool| match get(key) {
            Some(v) => parse_bool(key, v),
            None => Ok(default),
        };
        let number = |key: &str, default: u64| match get(key) {
            Some(v) => v.parse::<u64>().or_else(|_| {
                err(format!(
                    "config key {key}: {v:?} is not a non-negative whole number"
                ))
            }),
            None => Ok(default),
        };
        let positive = |key: &str, default: u64| match number(key, default)? {
            0 => err(format!("config key {key}: \"0\" must be at least 1")),
            v => Ok(v),
        };
        let address = |key: &str, default: &str| parse_address(key, get(key).unwrap_or(default));
        // TorchServe names the gRPC host and port in two keys each.
        let grpc_address = |host_key: &str, port_key: &str, default_port: u16| {
            // Named without brackets in the error, as the address is resolved.
            let host = get(host_key)
                .unwrap_or("127.0.0.1")
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = match get(port_key) {
                Some(v) => v.parse::<u16>().map_err(|_| {
                    invalid(format!(
                        "config key {port_key}: {v:?} is not a port number from 0 to 65535"
                    ))
                })?,
                None => default_port,
            };
            resolve(host, port).ok_or_else(|| {
                    invalid(format!(
                        "config key {host_key}: {host:?} is not a usable host (an IP address or name, no scheme or port)"
                    ))
                })
        };
        let grpc_ssl = boolean("enable_grpc_ssl", false)?;

        let https = |key: &str, default: &str| {
            get(key)
                .unwrap_or(default)
                .trim()
                .to_ascii_lowercase()
                .starts_with("https://")
        };
        let tls_listeners = TlsListeners {
            inference: https("inference_address", "http://127.0.0.1:8080"),
            management: https("management_address", "http://127.0.0.1:8081"),
            metrics: https("metrics_address", "http://127.0.0.1:8082"),
        };
        let tls = tls_files(
            tls_listeners,
            grpc_ssl,
            get("private_key_file"),
            get("certificate_file"),
            get("keystore"),
        )?;
        let service_envelope = match get("service_envelope").map(str::trim).unwrap_or("") {
            "" => ServiceEnvelope::None,
            v if v.eq_ignore_ascii_case("kserve") => ServiceEnvelope::KServe,
            v if v.eq_ignore_ascii_case("kservev2") => ServiceEnvelope::KServeV2,
            other => {
                return err(format!(
                    "config key service_envelope: {other:?} is not one of kserve, kservev2"
                ))
            }
        };

        let metrics_mode = one_of(
            "metrics_mode",
            &get("metrics_mode")
                .unwrap_or("prometheus")
                .to_ascii_lowercase(),
            &[
                ("prometheus", MetricsMode::Prometheus),
                ("log", MetricsMode::Log),
                ("legacy", MetricsMode::Legacy),
            ],
        )?;
        let worker_runtime = one_of(
            "worker_runtime",
            get("worker_runtime").unwrap_or("oxserve"),
            &[
                ("oxserve", WorkerRuntime::Oxserve),
                ("torchserve", WorkerRuntime::TorchServe),
            ],
        )?;
        let allowed_urls = get("allowed_urls")
            .unwrap_or(r"file://.*|http(s)?://.*")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    invalid(format!(
                        "config key allowed_urls: {s:?} is not a valid regex: {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let histogram_buckets = match get("histogram_buckets") {
            None => DEFAULT_BUCKETS.to_vec(),
            Some(v) => parse_buckets(v)?,
        };
        let from_one_to = |key: &str, default: u64, max: u64| match number(key, default)? {
            v if (1..=max).contains(&v) => Ok(v),
            v => err(format!("config key {key}: \"{v}\" must be from 1 to {max}")),
        };
        let max_batch_size = from_one_to("max_batch_size", 1024, u32::MAX.into())?;
        // The scheduler's own hard cap (crate::worker::MAX_WORKERS) bounds the configurable one.
        let max_workers_per_model = from_one_to(
            "max_workers_per_model",
            256,
            crate::worker::MAX_WORKERS.into(),
        )?;
        let at_most = |key: &str, v: u64, max: u64, max_key: &str| {
            if v > max {
                err(format!(
                    "config key {key}: \"{v}\" is larger than {max_key} ({max})"
                ))
            } else {
                Ok(v)
            }
        };
        let capped = |key: &str, default: u64, max: u64| {
            at_most(key, number(key, default)?, max, "the limit")
        };
        let timeout = |key: &str, default: u64| capped(key, default, MAX_TIMEOUT);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let default_workers_per_model = match get("default_workers_per_model") {
            Some(_) => positive("default_workers_per_model", 1)?,
            // One worker per CPU (at least 1), but never past the ceiling on a very large host.
            None => cpus.min(max_workers_per_model),
        };
        at_most(
            "default_workers_per_model",
            default_workers_per_model,
            max_workers_per_model,
            "max_workers_per_model",
        )?;
        // 0 (TorchServe's default value) means one per CPU, as it does in TorchServe.
        let frontend_threads = match number("number_of_netty_threads", 0)? {
            0 => cpus.min(MAX_FRONTEND_THREADS),
            n => at_most(
                "number_of_netty_threads",
                n,
                MAX_FRONTEND_THREADS,
                "the limit",
            )?,
        };
        let job_queue_size = at_most(
            "job_queue_size",
            positive("job_queue_size", 100)?,
            MAX_JOB_QUEUE_SIZE,
            "the limit",
        )?;
        let batch_size = at_most(
            "batch_size",
            positive("batch_size", 1)?,
            max_batch_size,
            "max_batch_size",
        )?;
        let metric_time_interval = number("metric_time_interval", 60)?;
        if metric_time_interval == 0 {
            return err("config key metric_time_interval: \"0\" must be at least 1 second");
        }
        let load_models: Vec<String> = get("load_models")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let model_store = get("model_store").map(PathBuf::from);
        let models = match get("models") {
            Some(v) if !v.is_empty() => parse_models(
                v,
                narrow("max_batch_size", max_batch_size)?,
                narrow("max_workers_per_model", max_workers_per_model)?,
            )?,
            _ => BTreeMap::new(),
        };
        let defaults = crate::worker::AutoscaleRule::default();
        let default_values = [
            defaults.interval.as_millis() as u64,
            u64::from(defaults.queue_per_worker),
            u64::from(defaults.up_samples),
            u64::from(defaults.down_samples),
        ];
        let mut scale = [0u32; 4];
        for (i, (key, _, _, _)) in AUTOSCALE_LIMITS.iter().enumerate() {
            let v = number(key, default_values[i])?;
            scale[i] = autoscale_value(i, v, &format!("config key {key}"))
                .map_err(ConfigError::Autoscale)?;
        }
        let autoscale = crate::worker::AutoscaleRule {
            interval: Duration::from_millis(scale[0].into()),
            queue_per_worker: scale[1],
            up_samples: scale[2],
            down_samples: scale[3],
        };
        let env_dir = |var: &str| {
            env.iter()
                .find(|(k, _)| k == var)
                .map(|(_, v)| PathBuf::from(v))
        };
        let log_dir = env_dir("LOG_LOCATION").unwrap_or_else(|| PathBuf::from("logs"));
        // TorchServe's log4j2.xml: `${env:METRICS_LOCATION:-logs}` for the two metric logs, not
        // LOG_LOCATION: moving the server's logs leaves the metric logs in ./logs (its
        // test_log_location_var_snapshot_disabled_custom_path_read_only checks exactly that).
        let metrics_log_dir = env_dir("METRICS_LOCATION").unwrap_or_else(|| PathBuf::from("logs"));
        let log_format = one_of(
            "log_format",
            get("log_format").unwrap_or("text"),
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )?;
        let bounded = |key: &str, default: u64, min: u64, max: u64| {
            let v = number(key, default)?;
            if v < min || v > max {
                return err(format!(
                    "config key {key}: {v} is outside the allowed range {min} to {max}"
                ));
            }
            Ok(v)
        };
        // The floors keep a typo from turning every log line into a rollover; the ceilings keep a
        // single line or the kept files from holding unbounded memory or disk.
        let log_max_bytes = bounded("log_max_bytes", 100 * 1024 * 1024, 1024, 1 << 40)?;
        let log_max_files = bounded("log_max_files", 5, 1, 1000)?;
        let log_max_line_bytes = bounded("log_max_line_bytes", 64 * 1024, 256, 16 * 1024 * 1024)?;

        let seconds = |key: &str, default: u64| -> Result<Duration, ConfigError> {
            match number(key, default)? {
                0 => err(format!("config key {key}: \"0\" must be at least 1 second")),
                n => Ok(Duration::from_secs(n)),
            }
        };
        let http = HttpLimits {
            header_timeout: seconds("http_header_timeout", 30)?,
            body_timeout: seconds("http_body_timeout", 60)?,
            keep_alive_timeout: seconds("http_keep_alive_timeout", 15)?,
            max_connections: match get("http_max_connections") {
                None => None,
                Some(_) => Some(narrow(
                    "http_max_connections",
                    positive("http_max_connections", 0)?,
                )?),
            },
            max_header_size: match number("http_max_header_size", 16 * 1024)? {
                n if n < 1024 => {
                    return err(format!(
                        "config key http_max_header_size: \"{n}\" must be at least 1024 bytes"
                    ))
                }
                n => narrow("http_max_header_size", n)?,
            },
        };
        if http.keep_alive_timeout > http.header_timeout {
            warnings.push(format!(
                "http_keep_alive_timeout ({} s) is longer than http_header_timeout ({} s): idle connections close after {} s",
                http.keep_alive_timeout.as_secs(),
                http.header_timeout.as_secs(),
                http.header_timeout.as_secs()
            ));
        }
        let download = DownloadLimits {
            connect_timeout: seconds("download_connect_timeout", 10)?,
            read_timeout: seconds("download_read_timeout", 60)?,
            max_size: match get("max_download_size") {
                None => None,
                Some(_) => match number("max_download_size", 0)? {
                    0 => return err("config key max_download_size: \"0\" must be at least 1 byte"),
                    n => Some(n),
                },
            },
        };

        let restoring = model_snapshot.is_some();
        let config = Config {
            snapshots: !flags.ncs,
            properties: props.clone(),
            model_snapshot,
            http,
            download,
            onnx_load_memory_limit: match get("onnx_load_memory_limit") {
                None => None,
                Some(_) => Some(positive("onnx_load_memory_limit", 0)?),
            },
            onnx_load_timeout: seconds("onnx_load_timeout", DEFAULT_ONNX_LOAD_TIMEOUT)?,
            install_py_dep_per_model: boolean("install_py_dep_per_model", false)?,
            install_py_dep_timeout: Duration::from_secs(bounded(
                "install_py_dep_timeout",
                DEFAULT_INSTALL_PY_DEP_TIMEOUT,
                1,
                MAX_TIMEOUT,
            )?),
            inference_address: address("inference_address", "http://127.0.0.1:8080")?,
            management_address: address("management_address", "http://127.0.0.1:8081")?,
            metrics_address: address("metrics_address", "http://127.0.0.1:8082")?,
            grpc_inference_address: grpc_address(
                "grpc_inference_address",
                "grpc_inference_port",
                7070,
            )?,
            grpc_management_address: grpc_address(
                "grpc_management_address",
                "grpc_management_port",
                7071,
            )?,
            enable_metrics_api: boolean("enable_metrics_api", true)?,
            tls_listeners,
            tls,
            grpc_ssl,
            service_envelope,
            enable_dashboard: boolean("enable_dashboard", true)?,
            metrics_mode,
            metrics_config: get("metrics_config").map(PathBuf::from),
            model_metrics_auto_detect: boolean("model_metrics_auto_detect", false)?,
            disable_system_metrics: boolean("disable_system_metrics", false)?,
            metric_time_interval: Duration::from_secs(metric_time_interval),
            builtin_default_model: load_models.is_empty()
                && model_store.is_none()
                && models.is_empty()
                && !restoring,
            models,
            number_of_gpu: match get("number_of_gpu") {
                Some(v) => Some(v.parse::<u32>().map_err(|_| {
                    invalid(format!(
                        "config key number_of_gpu: {v:?} is not a non-negative whole number"
                    ))
                })?),
                None => None,
            },
            model_store,
            workflow_store: get("workflow_store")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            load_models,
            default_workers_per_model: narrow(
                "default_workers_per_model",
                default_workers_per_model,
            )?,
            default_workers_per_model_configured: get("default_workers_per_model").is_some(),
            job_queue_size: narrow("job_queue_size", job_queue_size)?,
            frontend_threads: narrow("number_of_netty_threads", frontend_threads)?,
            default_response_timeout: Duration::from_secs(timeout(
                "default_response_timeout",
                120,
            )?),
            default_startup_timeout: Duration::from_secs(timeout("default_startup_timeout", 120)?),
            batch_size: narrow("batch_size", batch_size)?,
            max_batch_delay: Duration::from_millis(timeout("max_batch_delay", 100)?),
            // The worker protocol carries a body as an i32 length.
            max_request_size: narrow(
                "max_request_size",
                capped("max_request_size", 6_553_500, i32::MAX as u64)?,
            )?,
            max_response_size: narrow(
                "max_response_size",
                capped("max_response_size", 6_553_500, i32::MAX as u64)?,
            )?,
            enable_model_api: boolean("enable_model_api", false)?,
            // On unless turned off, as in TorchServe 0.12: a team replacing TorchServe keeps its
            // authentication (docs/security.md).
            disable_token_authorization: boolean("disable_token_authorization", false)?,
            token_expiration: token_expiration(get("token_expiration_min"))?,
            allowed_urls,
            initial_worker_port: narrow(
                "initial_worker_port",
                capped("initial_worker_port", 9000, u32::MAX.into())?,
            )?,
            metrics_auth_token: get("metrics_auth_token")
                .filter(|s| !s.is_empty())
                .map(String::from),
            histogram_buckets,
            python_executable: get("python_executable").unwrap_or("python3").to_string(),
            worker_runtime,
            metrics_log_dir,
            log_dir,
            log_format,
            log_max_bytes,
            log_max_files: narrow("log_max_files", log_max_files)?,
            log_max_line_bytes: narrow("log_max_line_bytes", log_max_line_bytes)?,
            enable_access_log: boolean("enable_access_log", true)?,
            metrics_log_max_bytes: number("metrics_log_max_bytes", 10 * 1024 * 1024)?,
            max_batch_size: narrow("max_batch_size", max_batch_size)?,
            max_workers_per_model: narrow("max_workers_per_model", max_workers_per_model)?,
            max_archive_unpacked_bytes: positive(
                "max_archive_unpacked_bytes",
                DEFAULT_MAX_ARCHIVE_UNPACKED_BYTES,
            )?,
            max_archive_entries: positive("max_archive_entries", DEFAULT_MAX_ARCHIVE_ENTRIES)?,
            model_metrics_max_series: narrow(
                "model_metrics_max_series",
                positive(
                    "model_metrics_max_series",
                    DEFAULT_MODEL_METRICS_MAX_SERIES as u64,
                )?,
            )?,
            autoscale,
        };
        Ok((config, warnings))
    }

    /// Whether a registration URL matches `allowed_urls`.
    pub fn url_allowed(&self, url: &str) -> bool {
        self.allowed_urls.iter().any(|r| r.is_match(url))
    }
}

/// The option of `options` named exactly `value`, or an error listing the names.
fn one_of<T: Copy>(key: &str, value: &str, options: &[(&str, T)]) -> Result<T, ConfigError> {
    match options.iter().find(|(name, _)| *name == value) {
        Some(&(_, v)) => Ok(v),
        None => {
            let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            err(format!(
                "config key {key}: {value:?} is not one of {}",
                names.join(", ")
            ))
        }
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => err(format!("config key {key}: {value:?} is not true or false")),
    }
}

fn parse_buckets(value: &str) -> Result<Vec<f64>, ConfigError> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let b: f64 = part.parse().map_err(|_| {
            invalid(format!(
                "config key histogram_buckets: {part:?} is not a number"
            ))
        })?;
        if !b.is_finite() || b <= 0.0 || out.last().is_some_and(|&last| b <= last) {
            return err(format!(
                "config key histogram_buckets: {value:?} must be positive and strictly increasing"
            ));
        }
        out.push(b);
    }
    if out.is_empty() {
        return err("config key histogram_buckets: \"\" needs at least one bound");
    }
    Ok(out)
}

/// The PEM files HTTPS listeners need. TorchServe also reads a Java keystore and, with neither,
/// makes a self-signed certificate; oxserve reads PEM only and never serves a certificate nobody
/// chose, so both cases stop start-up with a message saying what to do.
fn tls_files(
    listeners: TlsListeners,
    grpc_ssl: bool,
    key: Option<&str>,
    cert: Option<&str>,
    keystore: Option<&str>,
) -> Result<Option<TlsFiles>, ConfigError> {
    let key = key.map(str::trim).filter(|s| !s.is_empty());
    let cert = cert.map(str::trim).filter(|s| !s.is_empty());
    let keystore = keystore.map(str::trim).filter(|s| !s.is_empty());
    let wanted = listeners.inference || listeners.management || listeners.metrics || grpc_ssl;
    match (key, cert) {
        (Some(k), Some(c)) => Ok(Some(TlsFiles {
            private_key_file: PathBuf::from(k),
            certificate_file: PathBuf::from(c),
        })),
        (None, None) if !wanted => Ok(None),
        _ if keystore.is_some() => err(format!(
            "config key keystore: {:?} is a Java keystore, which oxserve does not read; export the key and certificate chain as PEM (e.g. `openssl pkcs12 -in store.p12 -nodes -nocerts -out key.pem` and `-nokeys -out certs.pem`) and set private_key_file and certificate_file",
            keystore.unwrap_or_default()
        )),
        (Some(_), None) => err("config key certificate_file is missing: private_key_file needs the PEM certificate chain that goes with it"),
        (None, Some(_)) => err("config key private_key_file is missing: certificate_file needs the PEM private key that goes with it"),
        (None, None) => err("an https:// address or enable_grpc_ssl=true needs config keys private_key_file and certificate_file (PEM files); oxserve does not make a self-signed certificate"),
    }
}

/// The first socket address of `host` (an IP address, bracketed or not, or a name) and `port`.
fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port).to_socket_addrs().ok()?.next()
}

/// Parses `http://host:port` or `https://host:port` (TorchServe's address forms) into a socket
/// address; the scheme is read separately (`TlsListeners`).
fn parse_address(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let lower = value
        .get(..8)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let rest = if lower.starts_with("http://") {
        &value[7..]
    } else if lower.starts_with("https://") {
        &value[8..]
    } else {
        value
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        invalid(format!(
            "config key {key}: {value:?} needs a port, as in http://127.0.0.1:8080"
        ))
    })?;
    let port: u16 = port.parse().map_err(|_| {
        invalid(format!(
            "config key {key}: {value:?} has a port that is not a number from 0 to 65535"
        ))
    })?;
    resolve(host, port).ok_or_else(|| {
        invalid(format!(
            "config key {key}: {value:?} is not a usable address"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_sources(file, &[], &Overrides::default()).map(|(c, _)| c)
    }

    #[test]
    fn batch_mode_keys_are_read_and_checked() {
        let read = |v: serde_json::Value| ModelSettings::from_fields(&v, "model-config.yaml");
        let m = read(serde_json::json!({"asyncCommunication": true})).unwrap();
        assert_eq!(m.batch_mode, Some(BatchMode::Async));
        let m = read(serde_json::json!({"asyncCommunication": false})).unwrap();
        assert_eq!(m.batch_mode, None);
        assert_eq!(read(serde_json::json!({})).unwrap().batch_mode, None);
        let e = read(serde_json::json!({"asyncCommunication": "yes"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("asyncCommunication \"yes\" is not true or false"),
            "{e}"
        );
        let m = read(serde_json::json!({"continuousBatching": true})).unwrap();
        assert_eq!(m.batch_mode, Some(BatchMode::Continuous));
        let e = read(serde_json::json!({"sequenceBatching": true}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs sequenceMaxIdleMSec"), "{e}");
    }

    #[test]
    fn sequence_batching_keys_have_torchserve_defaults_and_limits() {
        let read = |v: serde_json::Value| ModelSettings::from_fields(&v, "m");
        let m =
            read(serde_json::json!({"sequenceBatching": true, "sequenceMaxIdleMSec": 10})).unwrap();
        assert_eq!(
            m.sequence,
            Some(SequenceSettings {
                max_sequences: 1,
                max_idle: Duration::from_millis(10),
                timeout: None,
                max_queue: 1,
            })
        );
        let m = read(serde_json::json!({
            "sequenceBatching": true, "continuousBatching": true, "sequenceMaxIdleMSec": 5000,
            "maxNumSequence": 4, "maxSequenceJobQueueSize": 10, "sequenceTimeoutMSec": 60000
        }))
        .unwrap();
        assert_eq!(m.batch_mode, Some(BatchMode::Continuous));
        let s = m.sequence.unwrap();
        assert_eq!((s.max_sequences, s.max_queue), (4, 10));
        assert_eq!(s.timeout, Some(Duration::from_secs(60)));
        // Without sequenceBatching the keys are TorchServe's no-ops.
        let m = read(serde_json::json!({"maxNumSequence": 4})).unwrap();
        assert_eq!(m.sequence, None);
        for (bad, want) in [
            (
                serde_json::json!({"sequenceBatching": "yes"}),
                "is not true or false",
            ),
            (
                serde_json::json!({"sequenceBatching": true, "sequenceMaxIdleMSec": -1}),
                "sequenceMaxIdleMSec -1 must be an integer",
            ),
            (
                serde_json::json!({"sequenceBatching": true, "sequenceMaxIdleMSec": 1,
                                   "maxNumSequence": 0}),
                "maxNumSequence 0 must be an integer from 1",
            ),
            (
                serde_json::json!({"sequenceBatching": true, "sequenceMaxIdleMSec": 1,
                                   "maxSequenceJobQueueSize": 100001}),
                "maxSequenceJobQueueSize 100001 must be",
            ),
            (
                serde_json::json!({"sequenceBatching": true, "sequenceMaxIdleMSec": 1,
                                   "asyncCommunication": true}),
                "cannot be combined with asyncCommunication",
            ),
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn https_addresses_need_pem_files_and_envelopes_are_checked() {
        let c = build(&[]).unwrap();
        assert_eq!(c.tls, None);
        assert_eq!(c.tls_listeners, TlsListeners::default());
        assert_eq!(c.service_envelope, ServiceEnvelope::None);
        let e = build(&[("management_address", "https://127.0.0.1:8444")]).unwrap_err();
        assert!(e.to_string().contains("private_key_file"), "{e}");
        let e = build(&[
            ("inference_address", "https://127.0.0.1:8443"),
            ("keystore", "ks.p12"),
        ])
        .unwrap_err();
        assert!(
            e.to_string().contains("PEM") && e.to_string().contains("ks.p12"),
            "{e}"
        );
        let e = build(&[
            ("inference_address", "HTTPS://127.0.0.1:8443"),
            ("private_key_file", "k.pem"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("certificate_file"), "{e}");
        let c = build(&[
            ("inference_address", "https://127.0.0.1:8443"),
            ("private_key_file", "k.pem"),
            ("certificate_file", "c.pem"),
            ("service_envelope", "kservev2"),
        ])
        .unwrap();
        assert!(c.tls_listeners.inference && !c.tls_listeners.management);
        assert_eq!(c.inference_address.port(), 8443);
        assert_eq!(c.tls.unwrap().certificate_file, PathBuf::from("c.pem"));
        assert_eq!(c.service_envelope.as_str(), "kservev2");
        let e = build(&[("service_envelope", "seldon")]).unwrap_err();
        assert!(e.to_string().contains("service_envelope"), "{e}");
    }

    #[test]
    fn defaults_match_torchserve_listeners() {
        let c = build(&[]).unwrap();
        assert_eq!(c.inference_address.to_string(), "127.0.0.1:8080");
        assert_eq!(c.management_address.to_string(), "127.0.0.1:8081");
        assert_eq!(c.metrics_address.to_string(), "127.0.0.1:8082");
        assert_eq!(c.grpc_inference_address.to_string(), "127.0.0.1:7070");
        assert_eq!(c.grpc_management_address.to_string(), "127.0.0.1:7071");
        assert_eq!(c.job_queue_size, 100);
        assert_eq!(c.metrics_mode, MetricsMode::Prometheus);
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = build(&[("inference_address", "http://127.0.0.1:80x")]).unwrap_err();
        assert!(
            e.to_string().contains("inference_address") && e.to_string().contains("80x"),
            "{e}"
        );
        let e = build(&[("metrics_mode", "statsd")]).unwrap_err();
        assert!(
            e.to_string().contains("metrics_mode") && e.to_string().contains("statsd"),
            "{e}"
        );
        let e = build(&[("job_queue_size", "-3")]).unwrap_err();
        assert!(
            e.to_string().contains("job_queue_size") && e.to_string().contains("-3"),
            "{e}"
        );
    }

    #[test]
    fn grpc_listeners_take_torchserve_keys() {
        let c = build(&[
            ("grpc_inference_address", "0.0.0.0"),
            ("grpc_inference_port", "9070"),
            ("grpc_management_port", "0"),
        ])
        .unwrap();
        assert_eq!(c.grpc_inference_address.to_string(), "0.0.0.0:9070");
        assert_eq!(c.grpc_management_address.to_string(), "127.0.0.1:0");
        let e = build(&[("grpc_inference_port", "70700")]).unwrap_err();
        assert!(
            e.to_string().contains("grpc_inference_port") && e.to_string().contains("70700"),
            "{e}"
        );
        let e = build(&[("grpc_management_address", "http://127.0.0.1:7071")]).unwrap_err();
        assert!(e.to_string().contains("grpc_management_address"), "{e}");
        // TLS for gRPC needs the key and certificate the HTTPS listeners use.
        let e = build(&[("enable_grpc_ssl", "true")]).unwrap_err();
        assert!(e.to_string().contains("enable_grpc_ssl"), "{e}");
        let c = build(&[
            ("enable_grpc_ssl", "true"),
            ("private_key_file", "k.pem"),
            ("certificate_file", "c.pem"),
        ])
        .unwrap();
        assert!(c.grpc_ssl && !c.tls_listeners.inference);
        assert_eq!(c.tls.unwrap().private_key_file, PathBuf::from("k.pem"));
        assert!(!build(&[("enable_grpc_ssl", "false")]).unwrap().grpc_ssl);
        let e = build(&[("enable_grpc_ssl", "maybe")]).unwrap_err();
        assert!(e.to_string().contains("enable_grpc_ssl"), "{e}");
    }

    #[test]
    fn env_overrides_only_when_enabled() {
        let env = vec![("TS_JOB_QUEUE_SIZE".to_string(), "7".to_string())];
        let mut file = HashMap::new();
        let (c, _) = Config::from_sources(file.clone(), &env, &Overrides::default()).unwrap();
        assert_eq!(c.job_queue_size, 100);
        file.insert("enable_envvars_config".into(), "true".into());
        let (c, _) = Config::from_sources(file, &env, &Overrides::default()).unwrap();
        assert_eq!(c.job_queue_size, 7);
    }

    #[test]
    fn token_authorization_is_on_by_default_and_env_beats_the_flag() {
        let (c, _) = Config::from_sources(HashMap::new(), &[], &Overrides::default()).unwrap();
        assert!(!c.disable_token_authorization);
        assert_eq!(c.token_expiration, Duration::from_secs(3600));
        let flag = Overrides {
            disable_token_auth: true,
            ..Default::default()
        };
        let (c, _) = Config::from_sources(HashMap::new(), &[], &flag).unwrap();
        assert!(c.disable_token_authorization);
        // TorchServe's test_priority_env_cmd: the variable wins over the flag...
        let env = vec![(
            "TS_DISABLE_TOKEN_AUTHORIZATION".to_string(),
            "false".to_string(),
        )];
        let mut file = HashMap::new();
        file.insert("enable_envvars_config".to_string(), "true".to_string());
        let (c, _) = Config::from_sources(file.clone(), &env, &flag).unwrap();
        assert!(!c.disable_token_authorization);
        // ...and over the file (test_priority_env), only when enable_envvars_config is on.
        let env = vec![(
            "TS_DISABLE_TOKEN_AUTHORIZATION".to_string(),
            "true".to_string(),
        )];
        file.insert("disable_token_authorization".into(), "false".into());
        let (c, _) = Config::from_sources(file.clone(), &env, &Overrides::default()).unwrap();
        assert!(c.disable_token_authorization);
        file.remove("enable_envvars_config");
        let (c, _) = Config::from_sources(file, &env, &Overrides::default()).unwrap();
        assert!(!c.disable_token_authorization);
    }

    #[test]
    fn token_expiration_takes_fractions_and_refuses_nonsense() {
        let c = build(&[("token_expiration_min", "0.25")]).unwrap();
        assert_eq!(c.token_expiration, Duration::from_secs(15));
        let c = build(&[("token_expiration_min", "90")]).unwrap();
        assert_eq!(c.token_expiration, Duration::from_secs(5400));
        for bad in ["0", "-1", "NaN", "inf", "1e30", "soon", ""] {
            let e = build(&[("token_expiration_min", bad)]).unwrap_err();
            assert!(e.to_string().contains("token_expiration_min"), "{bad}: {e}");
        }
    }

    #[test]
    fn per_model_settings_are_validated() {
        let c = build(&[("models", r#"{"m": {"2.0": {"marName": "m.mar", "minWorkers": 1, "maxWorkers": 3, "batchSize": 4, "maxBatchDelay": 50, "defaultVersion": true}}}"#)]).unwrap();
        let s = &c.models["m"]["2.0"];
        assert_eq!(
            (s.min_workers, s.max_workers, s.batch_size),
            (Some(1), Some(3), Some(4))
        );
        assert_eq!(s.max_batch_delay, Some(Duration::from_millis(50)));
        assert!(s.default_version);
        let e = build(&[(
            "models",
            r#"{"m": {"1.0": {"minWorkers": 4, "maxWorkers": 2}}}"#,
        )])
        .unwrap_err();
        assert!(
            e.to_string().contains("models")
                && e.to_string().contains("minWorkers 4")
                && e.to_string().contains("maxWorkers 2"),
            "{e}"
        );
        let e = build(&[("models", r#"{"m": {"1.0": {"minWorkers": "two"}}}"#)]).unwrap_err();
        assert!(
            e.to_string().contains("minWorkers") && e.to_string().contains("two"),
            "{e}"
        );
        assert!(build(&[("models", "{not json")])
            .unwrap_err()
            .to_string()
            .contains("models"));
    }

    #[test]
    fn autoscale_keys_are_read_and_bounded() {
        let c = build(&[
            ("autoscale_interval_ms", "250"),
            ("autoscale_up_samples", "3"),
        ])
        .unwrap();
        assert_eq!(c.autoscale.interval, Duration::from_millis(250));
        assert_eq!((c.autoscale.up_samples, c.autoscale.down_samples), (3, 60));
        for (k, v) in [
            ("autoscale_interval_ms", "0"),
            ("autoscale_interval_ms", "99999999"),
            ("autoscale_queue_per_worker", "0"),
            ("autoscale_down_samples", "-1"),
        ] {
            let e = build(&[(k, v)]).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
        let c = build(&[(
            "models",
            r#"{"m": {"1.0": {"autoscaleUpSamples": 5, "autoscaleIntervalMs": 100}}}"#,
        )])
        .unwrap();
        let s = &c.models["m"]["1.0"];
        assert_eq!(s.autoscale_up_samples, Some(5));
        assert_eq!(s.autoscale_interval, Some(Duration::from_millis(100)));
        let e = build(&[("models", r#"{"m": {"1.0": {"autoscaleDownSamples": 0}}}"#)]).unwrap_err();
        assert!(e.to_string().contains("autoscaleDownSamples"), "{e}");
        let e = build(&[("default_workers_per_model", "5000")]).unwrap_err();
        assert!(
            e.to_string()
                .contains("default_workers_per_model: \"5000\""),
            "{e}"
        );
        let e = build(&[("models", r#"{"m": {"1.0": {"maxWorkers": 100000}}}"#)]).unwrap_err();
        assert!(e.to_string().contains("maxWorkers 100000"), "{e}");
    }

    #[test]
    fn connection_and_download_limits_are_validated() {
        let c = build(&[]).unwrap();
        assert_eq!(c.http.header_timeout, Duration::from_secs(30));
        assert_eq!(c.http.max_connections, None);
        assert_eq!(c.download.max_size, None);
        let c = build(&[("http_max_connections", "7"), ("max_download_size", "1000")]).unwrap();
        assert_eq!(
            (c.http.max_connections, c.download.max_size),
            (Some(7), Some(1000))
        );
        for (key, value) in [
            ("http_header_timeout", "0"),
            ("http_body_timeout", "soon"),
            ("http_max_connections", "0"),
            ("http_max_header_size", "100"),
            ("max_download_size", "-1"),
            ("download_read_timeout", "0"),
        ] {
            let e = build(&[(key, value)]).unwrap_err();
            assert!(
                e.to_string().contains(key) && e.to_string().contains(value),
                "{e}"
            );
        }
        let file = [("http_keep_alive_timeout", "90")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (_, w) = Config::from_sources(file, &[], &Overrides::default()).unwrap();
        assert!(
            w.iter().any(|w| w.contains("http_keep_alive_timeout")),
            "{w:?}"
        );
    }

    #[test]
    fn log_settings_are_bounded() {
        let c = build(&[]).unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_max_bytes, 100 * 1024 * 1024);
        assert_eq!(c.log_max_files, 5);
        assert!(c.enable_access_log);
        let e = build(&[("log_format", "xml")]).unwrap_err();
        assert!(
            e.to_string().contains("log_format") && e.to_string().contains("xml"),
            "{e}"
        );
        let e = build(&[("log_max_bytes", "10")]).unwrap_err();
        assert!(
            e.to_string().contains("log_max_bytes") && e.to_string().contains("1024"),
            "{e}"
        );
        let e = build(&[("log_max_files", "0")]).unwrap_err();
        assert!(e.to_string().contains("log_max_files"), "{e}");
        let e = build(&[("log_max_line_bytes", "99999999999")]).unwrap_err();
        assert!(e.to_string().contains("log_max_line_bytes"), "{e}");
        let env = [("LOG_LOCATION".to_string(), "/var/log/ox".to_string())];
        let (c, _) = Config::from_sources(HashMap::new(), &env, &Overrides::default()).unwrap();
        assert_eq!(c.log_dir, PathBuf::from("/var/log/ox"));
        // As TorchServe's appenders: the metric logs follow METRICS_LOCATION only.
        assert_eq!(c.metrics_log_dir, PathBuf::from("logs"));
        let env = [
            ("LOG_LOCATION".to_string(), "/var/log/ox".to_string()),
            ("METRICS_LOCATION".to_string(), "/var/log/m".to_string()),
        ];
        let (c, _) = Config::from_sources(HashMap::new(), &env, &Overrides::default()).unwrap();
        assert_eq!(c.metrics_log_dir, PathBuf::from("/var/log/m"));
    }

    #[test]
    fn unknown_keys_warn() {
        let mut file = HashMap::new();
        file.insert("no_such_key".to_string(), "1".to_string());
        let (_, w) = Config::from_sources(file, &[], &Overrides::default()).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("no_such_key"));
    }

    #[test]
    fn every_known_key_is_read_or_listed_unread_and_none_warns() {
        // known_keys() parses empty sources: they must give a config, or the list would stop at
        // the first error.
        assert!(Config::from_sources(HashMap::new(), &[], &Overrides::default()).is_ok());
        let keys = known_keys();
        for key in [
            "inference_address",
            "load_models",
            "model_snapshot",
            "tsConfigFile",
        ] {
            assert!(keys.contains(key), "{key}");
        }
        // Neither a key the parser reads nor an accepted-unread one is called unknown.
        let file: HashMap<String, String> = [
            ("job_queue_size", "5"),
            ("tsConfigFile", "/x/config.properties"),
            ("keystore_pass", "changeit"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (c, w) = Config::from_sources(file, &[], &Overrides::default()).unwrap();
        assert_eq!(c.job_queue_size, 5);
        assert!(w.is_empty(), "{w:?}");
        // A key is read on every parse, so the environment override reaches each one.
        let env = [
            ("TS_JOB_QUEUE_SIZE".to_string(), "7".to_string()),
            ("TS_ENABLE_DASHBOARD".to_string(), "false".to_string()),
        ];
        let mut file = HashMap::new();
        file.insert("enable_envvars_config".to_string(), "true".to_string());
        let (c, _) = Config::from_sources(file, &env, &Overrides::default()).unwrap();
        assert_eq!(c.job_queue_size, 7);
        assert!(!c.enable_dashboard);
    }

    /// docs/configuration.md's key table lists exactly the keys oxserve knows: a key added to the
    /// parser without a line in the docs (or a documented key nothing reads) fails here.
    #[test]
    fn the_docs_list_exactly_the_known_keys() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
        )
        .unwrap();
        let table = doc
            .split("\n## Keys\n")
            .nth(1)
            .expect("a ## Keys section")
            .split("\n## ")
            .next()
            .unwrap();
        let documented: BTreeSet<String> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| "))
            .filter_map(|l| l.split(" |").next())
            .filter(|cell| *cell != "key" && !cell.starts_with('-'))
            .flat_map(|cell| cell.split(", "))
            .map(|k| k.trim_matches('`').to_string())
            .collect();
        let known: BTreeSet<String> = known_keys().clone();
        let undocumented: Vec<_> = known.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&known).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "keys oxserve reads but docs/configuration.md does not list: {undocumented:?}; keys it lists that oxserve does not know: {unknown:?}"
        );
    }

    #[test]
    fn small_files_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![b'a'; MAX_SMALL_FILE_BYTES as usize]).unwrap();
        assert_eq!(
            read_small_file(&path, "f").unwrap().len() as u64,
            MAX_SMALL_FILE_BYTES
        );
        std::fs::write(&path, vec![b'a'; MAX_SMALL_FILE_BYTES as usize + 1]).unwrap();
        let e = read_small_file(&path, "the file f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("the file f is larger than the limit"), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Random properties text parses or fails, and whatever it holds, a config built from it
            /// is either refused or within every ceiling.
            #[test]
            fn random_properties_never_panic(text in "\\PC{0,300}") {
                if let Ok(file) = parse_properties(&text) {
                    let _ = Config::from_sources(file, &[], &Overrides::default());
                }
            }

            #[test]
            fn known_keys_with_random_values_stay_within_ceilings(
                pairs in proptest::collection::vec((0..known_keys().len(), "[0-9]{0,22}|-[0-9]{1,3}|true|false|\\PC{0,12}|\\{\"m\": \\{\"1\": \\{\"batchSize\": [0-9]{1,12}\\}\\}\\}"), 0..8),
            ) {
                let keys: Vec<&String> = known_keys().iter().collect();
                let file: HashMap<String, String> = pairs
                    .into_iter()
                    .filter(|(k, _)| !keys[*k].ends_with("_address"))
                    .map(|(k, v)| (keys[k].clone(), v))
                    .collect();
                if let Ok((c, _)) = Config::from_sources(file, &[], &Overrides::default()) {
                    prop_assert!(c.batch_size >= 1 && c.batch_size <= c.max_batch_size);
                    prop_assert!(c.default_workers_per_model >= 1);
                    prop_assert!(c.default_workers_per_model <= c.max_workers_per_model);
                    prop_assert!(c.job_queue_size as u64 <= MAX_JOB_QUEUE_SIZE);
                    prop_assert!(c.max_request_size <= i32::MAX as usize);
                    for versions in c.models.values() {
                        for s in versions.values() {
                            prop_assert!(s.batch_size.unwrap_or(1) <= c.max_batch_size);
                        }
                    }
                }
            }
        }
    }
}
