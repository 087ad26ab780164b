//! One typed, validated [`Config`] from config.properties, `TS_*` environment variables and CLI flags.
//!
//! Precedence is TorchServe's: flags over environment (only with `enable_envvars_config=true`) over
//! the properties file over defaults. Every value is checked here, once, so the rest of the server
//! never sees a half-valid setting: a bad value stops start-up with one line naming key and value.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
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

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub inference_address: SocketAddr,
    pub management_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub enable_metrics_api: bool,
    pub metrics_mode: MetricsMode,
    pub metrics_config: Option<PathBuf>,
    pub model_metrics_auto_detect: bool,
    pub disable_system_metrics: bool,
    pub metric_time_interval: Duration,
    pub model_store: Option<PathBuf>,
    /// `all`, or entries `name=file.mar` / `file.mar`.
    pub load_models: Vec<String>,
    pub default_workers_per_model: u32,
    pub job_queue_size: usize,
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
    /// Where log-mode metric files go (LOG_LOCATION / METRICS_LOCATION, else ./logs).
    pub metrics_log_dir: PathBuf,
    /// Rotate a metrics log file once it grows past this many bytes.
    pub metrics_log_max_bytes: u64,
    /// No built-in demo model when false (set when the user names models or a store).
    pub builtin_default_model: bool,
    /// GPUs workers are spread over (`number_of_gpu`); the server caps it at the GPUs NVML finds.
    pub number_of_gpu: Option<u32>,
    /// Per model version settings from TorchServe's `models` key: model name -> version -> settings.
    pub models: BTreeMap<String, BTreeMap<String, ModelSettings>>,
    /// Server-wide autoscaling rule (`autoscale_*` keys); models may override each part.
    pub autoscale: crate::worker::AutoscaleRule,
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
fn autoscale_value(i: usize, v: u64, at: &str) -> Result<u32, String> {
    let (_, _, lo, hi) = AUTOSCALE_LIMITS[i];
    if v < lo || v > hi {
        return Err(format!("{at}: {v} is outside {lo}..={hi}"));
    }
    Ok(v as u32)
}

impl ModelSettings {
    /// Reads TorchServe's per-model fields (`minWorkers`, `batchSize`, ...) from a JSON object: an
    /// entry of the `models` key, or an archive's model-config.yaml. `at` names it in errors.
    pub fn from_fields(fields: &serde_json::Value, at: &str) -> Result<ModelSettings, String> {
        let fields = fields
            .as_object()
            .ok_or_else(|| format!("{at}: must be an object"))?;
        let uint = |key: &str| -> Result<Option<u32>, String> {
            match fields.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| format!("{at}: {key} {v} is not a non-negative integer")),
            }
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
                return Err(format!(
                    "{at}: minWorkers {min} is greater than maxWorkers {max}"
                ));
            }
        }
        for (field, n) in [
            ("minWorkers", settings.min_workers),
            ("maxWorkers", settings.max_workers),
        ] {
            if n.is_some_and(|n| n > crate::worker::MAX_WORKERS) {
                return Err(format!(
                    "{at}: {field} {} is more than the {} workers a model version may run",
                    n.unwrap_or_default(),
                    crate::worker::MAX_WORKERS
                ));
            }
        }
        if settings.batch_size == Some(0) {
            return Err(format!("{at}: batchSize 0 must be at least 1"));
        }
        Ok(settings)
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
        }
    }
}

/// Parses the `models` key: `{"name": {"1.0": {"marName": "x.mar", "minWorkers": 1, ...}}}`.
fn parse_models(
    value: &str,
) -> Result<BTreeMap<String, BTreeMap<String, ModelSettings>>, ConfigError> {
    let bad = |what: String| ConfigError(format!("config key models: {what}"));
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
            let settings =
                ModelSettings::from_fields(fields, &format!("{name} {version}")).map_err(bad)?;
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
    pub models: Option<String>,
    pub disable_token_auth: bool,
    pub enable_model_api: bool,
    pub ncs: bool,
}

/// Keys oxserve reads. Anything else is warned about (TorchServe keys oxserve does not use included).
const KNOWN_KEYS: &[&str] = &[
    "inference_address",
    "management_address",
    "metrics_address",
    "enable_metrics_api",
    "metrics_mode",
    "metrics_config",
    "model_metrics_auto_detect",
    "disable_system_metrics",
    "metric_time_interval",
    "model_store",
    "load_models",
    "default_workers_per_model",
    "job_queue_size",
    "default_response_timeout",
    "default_startup_timeout",
    "batch_size",
    "max_batch_delay",
    "max_request_size",
    "max_response_size",
    "enable_model_api",
    "disable_token_authorization",
    "token_expiration_min",
    "allowed_urls",
    "enable_envvars_config",
    "initial_worker_port",
    "metrics_auth_token",
    "histogram_buckets",
    "python_executable",
    "worker_runtime",
    "metrics_log_max_bytes",
    "models",
    "number_of_gpu",
    "autoscale_interval_ms",
    "autoscale_queue_per_worker",
    "autoscale_up_samples",
    "autoscale_down_samples",
];

/// A configuration error: one line naming the key and the offending value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Reads a Java-properties file into a map.
pub fn read_properties(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    java_properties::read(std::io::BufReader::new(file))
        .map_err(|e| ConfigError(format!("cannot parse config file {}: {e}", path.display())))
}

impl Config {
    /// Builds the configuration from the process environment and the given flags. Returns the
    /// config and the warnings (unknown keys) to log once logging is up.
    pub fn load(flags: &Overrides) -> Result<(Config, Vec<String>), ConfigError> {
        let path = flags.ts_config.clone().or_else(|| {
            std::env::var_os("TS_CONFIG_FILE")
                .map(PathBuf::from)
                .or_else(|| Some(PathBuf::from("config.properties")).filter(|p| p.is_file()))
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
        let mut warnings = Vec::new();
        let mut props: BTreeMap<String, String> = file
            .into_iter()
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        for key in props.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                warnings.push(format!("unknown config key {key:?} is ignored"));
            }
        }
        let envvars_enabled = parse_bool(
            "enable_envvars_config",
            props
                .get("enable_envvars_config")
                .map(String::as_str)
                .unwrap_or("false"),
        )?;
        if envvars_enabled {
            for key in KNOWN_KEYS {
                let var = format!("TS_{}", key.to_ascii_uppercase());
                if let Some((_, v)) = env.iter().find(|(k, _)| *k == var) {
                    props.insert(key.to_string(), v.clone());
                }
            }
        }
        if let Some(store) = &flags.model_store {
            props.insert("model_store".into(), store.display().to_string());
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

        let get = |key: &str| props.get(key).map(String::as_str);
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
        let address = |key: &str, default: &str| parse_address(key, get(key).unwrap_or(default));

        let metrics_mode = match get("metrics_mode")
            .unwrap_or("prometheus")
            .to_ascii_lowercase()
            .as_str()
        {
            "prometheus" => MetricsMode::Prometheus,
            "log" => MetricsMode::Log,
            "legacy" => MetricsMode::Legacy,
            other => {
                return err(format!(
                    "config key metrics_mode: {other:?} is not one of prometheus, log, legacy"
                ))
            }
        };
        let worker_runtime = match get("worker_runtime").unwrap_or("oxserve") {
            "oxserve" => WorkerRuntime::Oxserve,
            "torchserve" => WorkerRuntime::TorchServe,
            other => {
                return err(format!(
                    "config key worker_runtime: {other:?} is not one of oxserve, torchserve"
                ))
            }
        };
        let allowed_urls = get("allowed_urls")
            .unwrap_or(r"file://.*|http(s)?://.*")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    ConfigError(format!(
                        "config key allowed_urls: {s:?} is not a valid regex: {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let histogram_buckets = match get("histogram_buckets") {
            None => DEFAULT_BUCKETS.to_vec(),
            Some(v) => parse_buckets(v)?,
        };
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let default_workers_per_model = number("default_workers_per_model", cpus)?;
        if default_workers_per_model == 0 {
            return err("config key default_workers_per_model: \"0\" must be at least 1");
        }
        if default_workers_per_model > u64::from(crate::worker::MAX_WORKERS) {
            return err(format!(
                "config key default_workers_per_model: {default_workers_per_model} is more than the {} workers a model version may run",
                crate::worker::MAX_WORKERS
            ));
        }
        let job_queue_size = number("job_queue_size", 100)?;
        if job_queue_size == 0 {
            return err("config key job_queue_size: \"0\" must be at least 1");
        }
        let batch_size = number("batch_size", 1)?;
        if batch_size == 0 {
            return err("config key batch_size: \"0\" must be at least 1");
        }
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
            Some(v) if !v.is_empty() => parse_models(v)?,
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
            scale[i] = autoscale_value(i, v, &format!("config key {key}")).map_err(ConfigError)?;
        }
        let autoscale = crate::worker::AutoscaleRule {
            interval: Duration::from_millis(scale[0].into()),
            queue_per_worker: scale[1],
            up_samples: scale[2],
            down_samples: scale[3],
        };
        let log_dir = env
            .iter()
            .find(|(k, _)| k == "METRICS_LOCATION")
            .or_else(|| env.iter().find(|(k, _)| k == "LOG_LOCATION"))
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| PathBuf::from("logs"));

        let config = Config {
            inference_address: address("inference_address", "http://127.0.0.1:8080")?,
            management_address: address("management_address", "http://127.0.0.1:8081")?,
            metrics_address: address("metrics_address", "http://127.0.0.1:8082")?,
            enable_metrics_api: boolean("enable_metrics_api", true)?,
            metrics_mode,
            metrics_config: get("metrics_config").map(PathBuf::from),
            model_metrics_auto_detect: boolean("model_metrics_auto_detect", false)?,
            disable_system_metrics: boolean("disable_system_metrics", false)?,
            metric_time_interval: Duration::from_secs(metric_time_interval),
            builtin_default_model: load_models.is_empty()
                && model_store.is_none()
                && models.is_empty(),
            models,
            number_of_gpu: match get("number_of_gpu") {
                Some(v) => Some(v.parse::<u32>().map_err(|_| {
                    ConfigError(format!(
                        "config key number_of_gpu: {v:?} is not a non-negative whole number"
                    ))
                })?),
                None => None,
            },
            model_store,
            load_models,
            default_workers_per_model: default_workers_per_model as u32,
            job_queue_size: job_queue_size as usize,
            default_response_timeout: Duration::from_secs(number("default_response_timeout", 120)?),
            default_startup_timeout: Duration::from_secs(number("default_startup_timeout", 120)?),
            batch_size: batch_size as u32,
            max_batch_delay: Duration::from_millis(number("max_batch_delay", 100)?),
            max_request_size: number("max_request_size", 6_553_500)? as usize,
            max_response_size: number("max_response_size", 6_553_500)? as usize,
            enable_model_api: boolean("enable_model_api", false)?,
            disable_token_authorization: boolean("disable_token_authorization", true)?,
            token_expiration: Duration::from_secs(60 * number("token_expiration_min", 60)?),
            allowed_urls,
            initial_worker_port: number("initial_worker_port", 9000)? as u32,
            metrics_auth_token: get("metrics_auth_token")
                .filter(|s| !s.is_empty())
                .map(String::from),
            histogram_buckets,
            python_executable: get("python_executable").unwrap_or("python3").to_string(),
            worker_runtime,
            metrics_log_dir: log_dir,
            metrics_log_max_bytes: number("metrics_log_max_bytes", 10 * 1024 * 1024)?,
            autoscale,
        };
        Ok((config, warnings))
    }

    /// Whether a registration URL matches `allowed_urls`.
    pub fn url_allowed(&self, url: &str) -> bool {
        self.allowed_urls.iter().any(|r| r.is_match(url))
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
            ConfigError(format!(
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

/// Parses `http://host:port` (TorchServe's address form) into a socket address.
fn parse_address(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    let rest = if let Some(r) = value.strip_prefix("http://") {
        r
    } else if value.starts_with("https://") {
        return err(format!(
            "config key {key}: {value:?} asks for TLS, which oxserve does not serve yet; use http:// behind a TLS proxy"
        ));
    } else {
        value
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| {
        ConfigError(format!(
            "config key {key}: {value:?} needs a port, as in http://127.0.0.1:8080"
        ))
    })?;
    let port: u16 = port.parse().map_err(|_| {
        ConfigError(format!(
            "config key {key}: {value:?} has a port that is not a number from 0 to 65535"
        ))
    })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            ConfigError(format!(
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
    fn defaults_match_torchserve_listeners() {
        let c = build(&[]).unwrap();
        assert_eq!(c.inference_address.to_string(), "127.0.0.1:8080");
        assert_eq!(c.management_address.to_string(), "127.0.0.1:8081");
        assert_eq!(c.metrics_address.to_string(), "127.0.0.1:8082");
        assert_eq!(c.job_queue_size, 100);
        assert_eq!(c.metrics_mode, MetricsMode::Prometheus);
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = build(&[("inference_address", "http://127.0.0.1:80x")]).unwrap_err();
        assert!(
            e.0.contains("inference_address") && e.0.contains("80x"),
            "{e}"
        );
        let e = build(&[("metrics_mode", "statsd")]).unwrap_err();
        assert!(
            e.0.contains("metrics_mode") && e.0.contains("statsd"),
            "{e}"
        );
        let e = build(&[("job_queue_size", "-3")]).unwrap_err();
        assert!(e.0.contains("job_queue_size") && e.0.contains("-3"), "{e}");
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
            e.0.contains("models") && e.0.contains("minWorkers 4") && e.0.contains("maxWorkers 2"),
            "{e}"
        );
        let e = build(&[("models", r#"{"m": {"1.0": {"minWorkers": "two"}}}"#)]).unwrap_err();
        assert!(e.0.contains("minWorkers") && e.0.contains("two"), "{e}");
        assert!(build(&[("models", "{not json")])
            .unwrap_err()
            .0
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
            assert!(e.0.contains(k), "{e}");
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
        assert!(e.0.contains("autoscaleDownSamples"), "{e}");
        let e = build(&[("default_workers_per_model", "5000")]).unwrap_err();
        assert!(e.0.contains("default_workers_per_model: 5000"), "{e}");
        let e = build(&[("models", r#"{"m": {"1.0": {"maxWorkers": 100000}}}"#)]).unwrap_err();
        assert!(e.0.contains("maxWorkers 100000"), "{e}");
    }

    #[test]
    fn unknown_keys_warn() {
        let mut file = HashMap::new();
        file.insert("no_such_key".to_string(), "1".to_string());
        let (_, w) = Config::from_sources(file, &[], &Overrides::default()).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("no_such_key"));
    }
}
