//! The registry of models and their versions: what is loaded, which version is the default, and
//! the worker pool serving each version.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::backend::{self, BackendLoader, WorkerSpec};
use crate::config::{Config, ModelSettings};
use crate::metrics::{Metrics, ModelMetrics};
use crate::model::archive::{self, Manifest, UnpackedArchive};
use crate::worker::{Pool, PoolSettings};

/// The name oxserve serves its built-in demo model under.
pub const DEMO_MODEL: &str = "demo";
/// `modelUrl` of the built-in demo model.
pub const DEMO_URL: &str = "builtin:demo";

/// One registered version of a model.
pub struct ModelVersion {
    pub name: String,
    pub version: String,
    /// `modelUrl` as registered (archive file name or URL).
    pub url: String,
    pub manifest: Arc<Manifest>,
    pub pool: Pool,
    pub metrics: Arc<ModelMetrics>,
    pub loaded_at_startup: bool,
    pub registered_at: SystemTime,
    /// Keeps the unpacked folder alive while the version is registered.
    _archive: Option<UnpackedArchive>,
}

struct Model {
    versions: BTreeMap<String, Arc<ModelVersion>>,
    default_version: String,
}

/// Why a registry operation failed; each maps to a TorchServe status code and exception type.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Model not found: {0}")]
    ModelNotFound(String),
    #[error("Model version: {version} does not exist for model: {model}")]
    VersionNotFound { model: String, version: String },
    #[error("Model version {version} for model {model} is already registered.")]
    Conflict { model: String, version: String },
    #[error("{0}")]
    BadRequest(String),
    /// Synchronous registration whose workers could not load the model.
    #[error("{0}")]
    LoadFailed(String),
}

impl RegistryError {
    /// HTTP status and TorchServe exception type.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            RegistryError::ModelNotFound(_) => (404, "ModelNotFoundException"),
            RegistryError::VersionNotFound { .. } => (404, "ModelVersionNotFoundException"),
            RegistryError::Conflict { .. } => (409, "ConflictStatusException"),
            RegistryError::BadRequest(_) => (400, "BadRequestException"),
            RegistryError::LoadFailed(_) => (500, "InternalServerException"),
        }
    }
}

/// Options of a registration (POST /models query parameters, load_models entries).
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    /// Model name to use instead of the manifest's.
    pub model_name: Option<String>,
    pub initial_workers: Option<u32>,
    pub batch_size: Option<u32>,
    pub max_batch_delay: Option<Duration>,
    pub response_timeout: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    pub synchronous: bool,
    pub loaded_at_startup: bool,
}

/// What a version is registered from.
struct Source {
    /// `modelUrl` as registered.
    url: String,
    unpacked: Option<UnpackedArchive>,
    manifest: Manifest,
    dir: PathBuf,
    loader: Arc<dyn BackendLoader>,
    /// Settings from the archive's model-config.yaml.
    from_yaml: ModelSettings,
}

/// All models.
pub struct Registry {
    models: RwLock<BTreeMap<String, Model>>,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    next_port: Arc<AtomicU32>,
    /// False until the models named at start-up have been registered: /ping is Unhealthy before.
    started: AtomicBool,
    /// (name, version) pairs being registered right now, so that a second registration of the
    /// same pair is a conflict before it creates anything.
    pending: Arc<Mutex<HashSet<(String, String)>>>,
}

/// A (name, version) slot held while a registration builds its version; released when dropped.
struct Reservation {
    pending: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Longest model name or version.
pub const MAX_NAME_LEN: usize = 128;

/// TorchServe's rule for model names (torch-model-archiver's `^[A-Za-z0-9][A-Za-z0-9_\-.]*$`),
/// applied to versions as well, with a length cap. Names and versions end up in URLs, file
/// names, log lines and metric labels: a `..`, a slash or a newline must never get that far.
fn check_name(what: &str, value: &str) -> Result<(), RegistryError> {
    let mut chars = value.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        && value.len() <= MAX_NAME_LEN;
    if valid {
        return Ok(());
    }
    let shown: String = value.chars().take(MAX_NAME_LEN).collect();
    Err(RegistryError::BadRequest(format!(
        "invalid {what} {shown:?}: it must start with a letter or digit, hold only letters, digits, '_', '-' and '.', and be at most {MAX_NAME_LEN} characters"
    )))
}

/// Batch size and worker count against the server's ceilings.
fn check_limits(c: &Config, batch_size: u32, max_workers: u32) -> Result<(), RegistryError> {
    if batch_size == 0 || batch_size > c.max_batch_size {
        return Err(RegistryError::BadRequest(format!(
            "batch_size {batch_size} must be from 1 to max_batch_size ({})",
            c.max_batch_size
        )));
    }
    if max_workers > c.max_workers_per_model {
        return Err(RegistryError::BadRequest(format!(
            "{max_workers} workers is more than max_workers_per_model ({})",
            c.max_workers_per_model
        )));
    }
    Ok(())
}

impl Registry {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            models: RwLock::new(BTreeMap::new()),
            next_port: Arc::new(AtomicU32::new(config.initial_worker_port)),
            started: AtomicBool::new(false),
            pending: Arc::new(Mutex::new(HashSet::new())),
            config,
            metrics,
        }
    }

    /// Reserves (name, version) for a registration, or says it is taken.
    fn reserve(&self, name: &str, version: &str) -> Result<Reservation, RegistryError> {
        // Lock order: models, then pending (the only place both are held).
        let models = self.models.read().unwrap();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let key = (name.to_string(), version.to_string());
        let live = models
            .get(name)
            .is_some_and(|m| m.versions.contains_key(version));
        if live || !pending.insert(key.clone()) {
            return Err(RegistryError::Conflict {
                model: name.to_string(),
                version: version.to_string(),
            });
        }
        Ok(Reservation {
            pending: self.pending.clone(),
            key,
        })
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The version a request names, or the default version.
    pub fn get(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let models = self.models.read().unwrap();
        let model = models
            .get(name)
            .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))?;
        let v = version.unwrap_or(&model.default_version);
        model
            .versions
            .get(v)
            .cloned()
            .ok_or_else(|| RegistryError::VersionNotFound {
                model: name.to_string(),
                version: v.to_string(),
            })
    }

    /// Every version of a model, default first.
    pub fn versions(&self, name: &str) -> Result<Vec<Arc<ModelVersion>>, RegistryError> {
        let models = self.models.read().unwrap();
        let model = models
            .get(name)
            .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))?;
        let mut out: Vec<_> = model.versions.values().cloned().collect();
        out.sort_by_key(|v| v.version != model.default_version);
        Ok(out)
    }

    /// (name, default version's url) of every model, sorted by name.
    pub fn list(&self) -> Vec<(String, String)> {
        self.models
            .read()
            .unwrap()
            .iter()
            .map(|(name, m)| (name.clone(), m.versions[&m.default_version].url.clone()))
            .collect()
    }

    /// Every registered version.
    pub fn all_versions(&self) -> Vec<Arc<ModelVersion>> {
        self.models
            .read()
            .unwrap()
            .values()
            .flat_map(|m| m.versions.values().cloned())
            .collect()
    }

    /// Whether every version has at least its minimum of live workers (`/ping`).
    pub fn healthy(&self) -> bool {
        self.started.load(Ordering::Acquire)
            && self
                .all_versions()
                .iter()
                .all(|v| v.pool.live_workers() >= v.pool.min_workers() as usize)
    }

    /// Marks start-up model loading as done (from then on /ping reflects the workers).
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Registers the built-in demo model.
    pub async fn register_demo(&self, workers: u32) -> Result<Arc<ModelVersion>, RegistryError> {
        let manifest = Manifest {
            runtime: "builtin".into(),
            model: archive::ManifestModel {
                model_name: DEMO_MODEL.into(),
                model_version: "1.0".into(),
                handler: "builtin".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let options = RegisterOptions {
            initial_workers: Some(workers),
            loaded_at_startup: true,
            synchronous: false,
            ..Default::default()
        };
        let source = Source {
            url: DEMO_URL.to_string(),
            unpacked: None,
            manifest,
            dir: PathBuf::new(),
            loader: Arc::new(backend::builtin::DemoLoader),
            from_yaml: ModelSettings::default(),
        };
        self.insert(source, options).await
    }

    /// Registers an archive named by `url`: a file or folder in the model store, an absolute
    /// path, or a `file://` URL; the URL must match `allowed_urls`.
    pub async fn register(
        &self,
        url: &str,
        options: RegisterOptions,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        if url.is_empty() {
            return Err(RegistryError::BadRequest(
                "Parameter url is required.".into(),
            ));
        }
        let path = self.resolve(url).await?;
        let config = self.config.clone();
        let shown = url.to_string();
        let (unpacked, loader, from_yaml) = tokio::task::spawn_blocking(move || {
            let limits = archive::Limits::from_config(&config);
            let unpacked = archive::open(&path, &limits).map_err(|e| e.to_string())?;
            let loader = backend::loader_for(&unpacked.dir, &unpacked.manifest, &config)
                .map_err(|e| format!("cannot load model from {shown}: {e}"))?;
            let from_yaml = match archive::model_config(&unpacked.dir, &unpacked.manifest)? {
                Some(v) => ModelSettings::from_fields(&v, "model-config.yaml")?,
                None => ModelSettings::default(),
            };
            Ok::<_, String>((unpacked, loader, from_yaml))
        })
        .await
        .map_err(|e| RegistryError::BadRequest(format!("archive unpacking failed: {e}")))?
        .map_err(RegistryError::BadRequest)?;
        let source = Source {
            url: url.to_string(),
            manifest: unpacked.manifest.clone(),
            dir: unpacked.dir.clone(),
            unpacked: Some(unpacked),
            loader,
            from_yaml,
        };
        self.insert(source, options).await
    }

    async fn resolve(&self, url: &str) -> Result<PathBuf, RegistryError> {
        if url.contains("://") {
            // TorchServe's rule and message (ModelArchive.downloadModel): no `..` in a URL, so an
            // allowed_urls pattern cannot be escaped by climbing out of the allowed folder.
            if url.contains("..") {
                return Err(RegistryError::BadRequest(
                    "Relative path is not allowed in url".into(),
                ));
            }
            if !self.config.url_allowed(url) {
                return Err(RegistryError::BadRequest(format!(
                    "Given URL {url} does not match any allowed URL(s)"
                )));
            }
            if let Some(p) = url.strip_prefix("file://") {
                return Ok(PathBuf::from(p));
            }
            if url.starts_with("http://") {
                return self.download(url).await;
            }
            return Err(RegistryError::BadRequest(format!(
                "cannot register {url}: oxserve downloads plain http:// URLs only (no TLS built in); put the archive in the model store instead"
            )));
        }
        let direct = Path::new(url);
        if direct.is_absolute() {
            if !self.config.url_allowed(&format!("file://{url}")) {
                return Err(RegistryError::BadRequest(format!(
                    "Given URL {url} does not match any allowed URL(s)"
                )));
            }
            return Ok(direct.to_path_buf());
        }
        let store = self.config.model_store.as_ref().ok_or_else(|| {
            RegistryError::BadRequest(format!(
                "cannot find {url}: no model store is configured (--model-store)"
            ))
        })?;
        if Path::new(url)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(RegistryError::BadRequest(format!(
                "invalid model archive name {url:?}: it must name a file in the model store"
            )));
        }
        let path = store.join(url);
        if !path.exists() {
            return Err(RegistryError::BadRequest(format!(
                "Model archive {url} not found in the model store {}",
                store.display()
            )));
        }
        Ok(path)
    }

    /// Downloads an archive into the model store, as TorchServe does, refusing to overwrite.
    async fn download(&self, url: &str) -> Result<PathBuf, RegistryError> {
        let bad = |m: String| RegistryError::BadRequest(m);
        let store = self.config.model_store.as_ref().ok_or_else(|| {
            bad(format!(
                "cannot download {url}: no model store is configured (--model-store)"
            ))
        })?;
        let file = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').next())
            .filter(|f| !f.is_empty() && *f != ".." && *f != ".")
            .ok_or_else(|| bad(format!("cannot tell the archive's file name from {url}")))?;
        let target = store.join(file);
        if target.exists() {
            return Err(RegistryError::Conflict {
                model: file.to_string(),
                version: "(file already in the model store)".into(),
            });
        }
        let response = reqwest::get(url)
            .await
            .map_err(|e| bad(format!("cannot download {url}: {e}")))?;
        if !response.status().is_success() {
            return Err(bad(format!(
                "cannot download {url}: the server answered {}",
                response.status()
            )));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| bad(format!("cannot download {url}: {e}")))?;
        std::fs::write(&target, &bytes)
            .map_err(|e| bad(format!("cannot write {}: {e}", target.display())))?;
        Ok(target)
    }

    async fn insert(
        &self,
        source: Source,
        options: RegisterOptions,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let Source {
            url,
            unpacked,
            manifest,
            dir,
            loader,
            from_yaml,
        } = source;
        let name = options
            .model_name
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| Some(manifest.model.model_name.clone()).filter(|n| !n.is_empty()))
            .or_else(|| {
                Path::new(&url)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        check_name("model name", &name)?;
        let version = Some(manifest.model.model_version.clone())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "1.0".to_string());
        check_name("model version", &version)?;
        let c = &self.config;
        // Explicit options, then config.properties' `models` key, then the archive's
        // model-config.yaml, then the server defaults.
        let m = c
            .models
            .get(&name)
            .and_then(|v| v.get(&version))
            .cloned()
            .unwrap_or_default()
            .or(from_yaml);
        let settings = PoolSettings {
            batch_size: options.batch_size.or(m.batch_size).unwrap_or(c.batch_size),
            max_batch_delay: options
                .max_batch_delay
                .or(m.max_batch_delay)
                .unwrap_or(c.max_batch_delay),
            queue_capacity: c.job_queue_size,
            response_timeout: options
                .response_timeout
                .or(m.response_timeout)
                .unwrap_or(c.default_response_timeout),
            startup_timeout: options
                .startup_timeout
                .or(m.startup_timeout)
                .unwrap_or(c.default_startup_timeout),
        };
        let workers = options
            .initial_workers
            .unwrap_or(self.config.default_workers_per_model);
        // Without an explicit initial_workers, minWorkers/maxWorkers (models key or
        // model-config.yaml) decide.
        let (min, max) = if options.initial_workers.is_none() {
            let min = m.min_workers.unwrap_or(workers);
            (min, m.max_workers.unwrap_or(min.max(workers)))
        } else {
            (workers, workers)
        };
        if min > max {
            return Err(RegistryError::BadRequest(format!(
                "minWorkers {min} is greater than maxWorkers {max} for model {name} version {version}"
            )));
        }
        check_limits(c, settings.batch_size, max)?;
        // Nothing below may touch the state of a live version of the same name: the conflict is
        // checked (and the slot reserved) before any metric series or pool exists.
        let _reservation = self.reserve(&name, &version)?;
        let manifest = Arc::new(manifest);
        let metrics = self.metrics.model(&name, &version);
        let spec = WorkerSpec {
            port: 0,
            name: String::new(),
            model_name: name.clone(),
            model_version: version.clone(),
            model_dir: dir,
            manifest: manifest.clone(),
            batch_size: settings.batch_size,
            gpu_id: -1,
            startup_timeout: settings.startup_timeout,
            response_timeout: settings.response_timeout,
            metrics: self.metrics.clone(),
            settings: self.config.clone(),
        };
        let pool = Pool::new(
            loader,
            spec,
            settings,
            metrics.clone(),
            self.next_port.clone(),
        );
        let entry = Arc::new(ModelVersion {
            name: name.clone(),
            version: version.clone(),
            url,
            manifest,
            pool: pool.clone(),
            metrics,
            loaded_at_startup: options.loaded_at_startup,
            registered_at: SystemTime::now(),
            _archive: unpacked,
        });
        {
            let mut models = self.models.write().unwrap();
            let model = models.entry(name.clone()).or_insert_with(|| Model {
                versions: BTreeMap::new(),
                default_version: version.clone(),
            });
            model.versions.insert(version.clone(), entry.clone());
            if m.default_version {
                model.default_version = version.clone();
            }
        }
        pool.scale(min, max, options.synchronous).await;
        if options.synchronous && min > 0 && pool.live_workers() == 0 {
            if let Some(why) = pool.load_error() {
                // As TorchServe does: a synchronous registration that cannot start is undone.
                let _ = self.unregister(&name, Some(&version)).await;
                return Err(RegistryError::LoadFailed(format!(
                    "Failed to start workers for model {name} version {version}: {why}"
                )));
            }
        }
        Ok(entry)
    }

    /// Unregisters a version (the default one when `version` is None). Queued requests are
    /// answered with an error; workers stop after their current batch.
    pub async fn unregister(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let removed = {
            let mut models = self.models.write().unwrap();
            let model = models
                .get_mut(name)
                .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))?;
            let v = version.unwrap_or(&model.default_version).to_string();
            if !model.versions.contains_key(&v) {
                return Err(RegistryError::VersionNotFound {
                    model: name.to_string(),
                    version: v,
                });
            }
            if v == model.default_version && model.versions.len() > 1 {
                return Err(RegistryError::BadRequest(format!(
                    "Cannot remove default version {v} of model {name}: set another version as default first"
                )));
            }
            let removed = model.versions.remove(&v).expect("checked above");
            if model.versions.is_empty() {
                models.remove(name);
            }
            removed
        };
        removed.pool.close(&format!(
            "Model \"{name}\" version {} was unregistered before a worker took this request",
            removed.version
        ));
        removed
            .pool
            .wait_stopped(removed.pool.settings().response_timeout)
            .await;
        self.metrics.forget_model(&removed.name, &removed.version);
        Ok(removed)
    }

    /// Makes `version` the default of `name`.
    pub fn set_default(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        let mut models = self.models.write().unwrap();
        let model = models
            .get_mut(name)
            .ok_or_else(|| RegistryError::ModelNotFound(name.to_string()))?;
        if !model.versions.contains_key(version) {
            return Err(RegistryError::VersionNotFound {
                model: name.to_string(),
                version: version.to_string(),
            });
        }
        model.default_version = version.to_string();
        Ok(())
    }

    /// Unregisters everything (server shutdown), stopping every worker.
    pub async fn shutdown(&self) {
        let all: Vec<Arc<ModelVersion>> = {
            let mut models = self.models.write().unwrap();
            let all = models
                .values()
                .flat_map(|m| m.versions.values().cloned())
                .collect();
            models.clear();
            all
        };
        for v in &all {
            v.pool.close("the server is shutting down");
        }
        for v in &all {
            v.pool.wait_stopped(Duration::from_secs(10)).await;
        }
    }
}
