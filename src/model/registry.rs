//! The registry of models and their versions: what is loaded, which version is the default, and
//! the worker pool serving each version.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::backend::{self, BackendLoader, LoaderError, ModelSpec};
use crate::config::{Config, ModelSettings};
use crate::error::ErrorKind;
use crate::metrics::{Metrics, ModelMetrics};
use crate::model::archive::{self, ArchiveError, Manifest, UnpackedArchive};
use crate::model::download::DownloadError;
use crate::model::loading::{Loading, Phase};
use crate::model::snapshot;
use crate::worker::{AutoscaleRule, Pool, PoolSettings};

/// The name oxserve serves its built-in demo model under.
pub const DEMO_MODEL: &str = "demo";
/// `modelUrl` of the built-in demo model.
pub const DEMO_URL: &str = "builtin:demo";

/// The server's health as `/ping` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    PartialHealthy,
    Unhealthy,
}

impl Health {
    /// TorchServe's words.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::PartialHealthy => "Partial Healthy",
            Health::Unhealthy => "Unhealthy",
        }
    }
}

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
    /// The workflow this version is a node of (src/workflow registers it and removes it).
    pub workflow: Option<String>,
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
    /// The model cannot be set up (its pip dependencies failed to install): TorchServe's
    /// ModelException, 400.
    #[error("{0}")]
    Model(String),
    /// Synchronous registration whose workers could not load the model.
    #[error("{0}")]
    LoadFailed(String),
    /// A URL whose archive file name is already in the model store (TorchServe: 500).
    #[error("Model file already exists {0}")]
    FileExists(String),
    /// `url=` given but empty (TorchServe's ModelArchive: 404 "empty url").
    #[error("empty url")]
    EmptyUrl,
    /// The archive cannot be opened or unpacked, or a file in it is invalid.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A `http://` archive could not be downloaded.
    #[error(transparent)]
    Download(#[from] DownloadError),
    /// No backend can serve the archive, or its model failed to load in the registration's check.
    #[error("cannot load model from {url}: {source}")]
    Loader { url: String, source: LoaderError },
    /// The archive's model-config.yaml holds a setting oxserve refuses.
    #[error(transparent)]
    ModelConfig(crate::config::SettingsError),
    /// The blocking task opening the archive ended without an answer (it panicked).
    #[error("archive unpacking failed: {0}")]
    Unpacking(String),
}

impl RegistryError {
    /// TorchServe's exception type (and so the status) of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::ModelNotFound(_) | RegistryError::EmptyUrl => ErrorKind::ModelNotFound,
            RegistryError::VersionNotFound { .. } => ErrorKind::ModelVersionNotFound,
            RegistryError::Conflict { .. } => ErrorKind::Conflict,
            RegistryError::BadRequest(_)
            | RegistryError::Archive(_)
            | RegistryError::ModelConfig(_) => ErrorKind::BadRequest,
            RegistryError::Model(_) => ErrorKind::Model,
            RegistryError::Download(e) => e.kind(),
            RegistryError::Loader { source, .. } => source.kind(),
            // TorchServe: a model whose workers cannot start is a 500 (ApiUtils "Failed to start
            // workers"), as is a file already in the store (FileAlreadyExistsException).
            RegistryError::LoadFailed(_)
            | RegistryError::FileExists(_)
            | RegistryError::Unpacking(_) => ErrorKind::InternalServer,
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
    /// Handler to use instead of the manifest's (the register API's `handler`).
    pub handler: Option<String>,
    /// Runtime to record instead of the manifest's (the register API's `runtime`, validated).
    pub runtime: Option<String>,
    /// Workers when neither initial_workers nor the model's settings say (None: the server's
    /// default_workers_per_model). The register API passes TorchServe's rule here.
    pub default_workers: Option<u32>,
    /// The workflow registering this model as one of its nodes.
    pub workflow: Option<String>,
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
    /// Registrations still downloading, unpacking or starting (describe shows their progress).
    loading: Mutex<BTreeMap<String, Arc<Loading>>>,
    /// Serializes snapshot writes, so that the newest file holds the newest state.
    snapshot_lock: Mutex<()>,
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

/// Keeps a registration listed as loading; removes (and cancels) it when the registration ends,
/// however it ends (done, failed, or dropped midway).
struct LoadingGuard<'a> {
    registry: &'a Registry,
    loading: Arc<Loading>,
    listed: bool,
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        self.loading.cancel();
        if self.listed {
            let mut map = self.registry.loading.lock().unwrap();
            if map
                .get(&self.loading.name)
                .is_some_and(|l| Arc::ptr_eq(l, &self.loading))
            {
                map.remove(&self.loading.name);
            }
        }
    }
}

/// Where an archive to register is, and the downloaded file to keep once it registered.
struct Resolved {
    path: PathBuf,
    /// (temporary file, its name in the model store) for a download.
    download: Option<(tempfile::TempPath, PathBuf)>,
}

impl Registry {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            models: RwLock::new(BTreeMap::new()),
            next_port: Arc::new(AtomicU32::new(config.initial_worker_port)),
            started: AtomicBool::new(false),
            pending: Arc::new(Mutex::new(HashSet::new())),
            loading: Mutex::new(BTreeMap::new()),
            snapshot_lock: Mutex::new(()),
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

    /// `/ping`'s answer, by TorchServe's rule (ApiUtils.getWorkerStatus): over the default
    /// version of every model, "Unhealthy" when minimums are configured and no worker runs,
    /// "Partial Healthy" when some run but fewer than the minimums, else "Healthy". Workers above
    /// one model's minimum do not make up for another's shortfall (TorchServe sums them; its
    /// newer isModelHealthy check, which decides the status code, is per model).
    pub fn health(&self) -> Health {
        if !self.started.load(Ordering::Acquire) {
            return Health::Unhealthy;
        }
        let defaults: Vec<Arc<ModelVersion>> = {
            let models = self.models.read().unwrap();
            models
                .values()
                .filter_map(|m| m.versions.get(&m.default_version).cloned())
                .collect()
        };
        let (mut scaled, mut working) = (0usize, 0usize);
        for v in &defaults {
            let (min, live) = v.pool.health_counts();
            let min = min as usize;
            scaled += min;
            working += live.min(min);
        }
        if working >= scaled {
            Health::Healthy
        } else if working > 0 {
            Health::PartialHealthy
        } else {
            Health::Unhealthy
        }
    }

    /// Whether every default version has at least its minimum of live workers.
    pub fn healthy(&self) -> bool {
        self.health() == Health::Healthy
    }

    /// Whether start-up model loading is done.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
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
            return Err(RegistryError::EmptyUrl);
        }
        let loading = self.start_loading(url, &options);
        let resolved = self.resolve(url, &loading.loading).await?;
        self.register_resolved(url, resolved, loading, options)
            .await
    }

    /// Registers a folder oxserve itself laid out (a workflow's function node: its manifest and
    /// handler file), shown as `url`; allowed_urls and the model store do not apply to it.
    pub async fn register_folder(
        &self,
        dir: &Path,
        url: &str,
        options: RegisterOptions,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let loading = self.start_loading(url, &options);
        let resolved = Resolved {
            path: dir.to_path_buf(),
            download: None,
        };
        self.register_resolved(url, resolved, loading, options)
            .await
    }

    async fn register_resolved(
        &self,
        url: &str,
        resolved: Resolved,
        loading: LoadingGuard<'_>,
        options: RegisterOptions,
    ) -> Result<Arc<ModelVersion>, RegistryError> {
        let path = resolved.path.clone();
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let config = self.config.clone();
        let shown = url.to_string();
        let observer = loading.loading.clone();
        observer.set_phase(Phase::Unpacking, if path.is_dir() { 0 } else { size });
        let (handler, runtime) = (options.handler.clone(), options.runtime.clone());
        let (unpacked, loader, from_yaml) = tokio::task::spawn_blocking(move || {
            let limits = archive::Limits::from_config(&config);
            let mut unpacked = archive::open_observed(&path, &limits, Some(observer))?;
            // The register API's handler and runtime win over the manifest's, as in TorchServe.
            if let Some(h) = handler {
                unpacked.manifest.model.handler = h;
            }
            if let Some(r) = runtime {
                unpacked.manifest.runtime = r;
            }
            let loader = backend::loader_for(&unpacked.dir, &unpacked.manifest, &config)
                .map_err(|source| RegistryError::Loader { url: shown, source })?;
            let from_yaml = match archive::model_config(&unpacked.dir, &unpacked.manifest)? {
                Some(v) => ModelSettings::from_fields(&v, "model-config.yaml")
                    .map_err(RegistryError::ModelConfig)?,
                None => ModelSettings::default(),
            };
            Ok::<_, RegistryError>((unpacked, loader, from_yaml))
        })
        .await
        .map_err(|e| RegistryError::Unpacking(e.to_string()))??;
        loading.loading.set_phase(Phase::StartingWorkers, 0);
        let source = Source {
            url: url.to_string(),
            manifest: unpacked.manifest.clone(),
            dir: unpacked.dir.clone(),
            unpacked: Some(unpacked),
            loader,
            from_yaml,
        };
        let version = self.insert(source, options).await?;
        // Only a registered archive takes its name in the store (TorchServe keeps any download,
        // and every retry after a failed one answers 409).
        if let Some((temp, target)) = resolved.download {
            if let Err(e) = temp.persist_noclobber(&target) {
                tracing::warn!(
                    "model {} is registered, but its archive could not be kept as {}: {e}",
                    version.name,
                    target.display()
                );
            }
        }
        Ok(version)
    }

    /// Lists a registration as loading under the name describe will look for: the requested
    /// model name, else the archive's file name without `.mar`.
    fn start_loading(&self, url: &str, options: &RegisterOptions) -> LoadingGuard<'_> {
        let name = options
            .model_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| {
                let file = url
                    .split(['?', '#'])
                    .next()
                    .and_then(|u| u.trim_end_matches('/').rsplit('/').next())
                    .unwrap_or(url);
                file.strip_suffix(".mar").unwrap_or(file).to_string()
            });
        let loading = Arc::new(Loading::new(name.clone(), url.to_string()));
        let mut map = self.loading.lock().unwrap();
        // A second registration under the same name is not listed (the first one is shown).
        let listed = !map.contains_key(&name);
        if listed {
            map.insert(name, loading.clone());
        }
        LoadingGuard {
            registry: self,
            loading,
            listed,
        }
    }

    /// The progress of a model still loading under this name, if any.
    pub fn loading(&self, name: &str) -> Option<Arc<Loading>> {
        self.loading.lock().unwrap().get(name).cloned()
    }

    async fn resolve(&self, url: &str, loading: &Arc<Loading>) -> Result<Resolved, RegistryError> {
        let local = |path: PathBuf| Resolved {
            path,
            download: None,
        };
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
                return Ok(local(PathBuf::from(p)));
            }
            if url.starts_with("http://") {
                return self.download(url, loading).await;
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
            return Ok(local(direct.to_path_buf()));
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
        Ok(local(path))
    }

    /// Downloads an archive into a temporary file of the model store; it takes the name of the
    /// URL's file once registered. Refuses a name already in the store, as TorchServe does.
    async fn download(&self, url: &str, loading: &Arc<Loading>) -> Result<Resolved, RegistryError> {
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
            return Err(RegistryError::FileExists(file.to_string()));
        }
        let temp = super::download::fetch(url, &self.config, store, loading).await?;
        Ok(Resolved {
            path: temp.to_path_buf(),
            download: Some((temp, target)),
        })
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
        let autoscale = c.autoscale;
        let settings = PoolSettings {
            autoscale: AutoscaleRule {
                interval: m.autoscale_interval.unwrap_or(autoscale.interval),
                queue_per_worker: m
                    .autoscale_queue_per_worker
                    .unwrap_or(autoscale.queue_per_worker),
                up_samples: m.autoscale_up_samples.unwrap_or(autoscale.up_samples),
                down_samples: m.autoscale_down_samples.unwrap_or(autoscale.down_samples),
            },
            batch_size: options.batch_size.or(m.batch_size).unwrap_or(c.batch_size),
            max_batch_delay: options
                .max_batch_delay
                .or(m.max_batch_delay)
                .unwrap_or(c.max_batch_delay),
            queue_capacity: c.job_queue_size,
            mode: m.batch_mode.unwrap_or_default(),
            sequence: m.sequence,
            response_timeout: options
                .response_timeout
                .or(m.response_timeout)
                .unwrap_or(c.default_response_timeout),
            startup_timeout: options
                .startup_timeout
                .or(m.startup_timeout)
                .unwrap_or(c.default_startup_timeout),
        };
        let workers = options.initial_workers.unwrap_or(
            options
                .default_workers
                .unwrap_or(self.config.default_workers_per_model),
        );
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
        // No worker can start within 0 s: TorchServe answers such a registration with 500
        // "Failed to start workers" (and registers it when it asks for no workers).
        if settings.startup_timeout.is_zero() && min > 0 {
            return Err(RegistryError::LoadFailed(format!(
                "Failed to start workers for model {name} version: {version}: startup_timeout is 0, so no worker can start"
            )));
        }
        // Nothing below may touch the state of a live version of the same name: the conflict is
        // checked (and the slot reserved) before any metric series or pool exists.
        let _reservation = self.reserve(&name, &version)?;
        let manifest = Arc::new(manifest);
        let metrics = self.metrics.model(&name, &version);
        let spec = Arc::new(ModelSpec {
            model_name: name.clone(),
            model_version: version.clone(),
            model_dir: dir,
            manifest: manifest.clone(),
            batch_size: settings.batch_size,
            startup_timeout: settings.startup_timeout,
            response_timeout: settings.response_timeout,
            metrics: self.metrics.clone(),
            settings: self.config.clone(),
        });
        // Before any worker: a Python model's own pip packages (install_py_dep_per_model). As in
        // TorchServe a failure is a 400 ModelException, and nothing stays registered.
        loader.prepare(&spec).await.map_err(|e| match e {
            backend::BackendError::Load(m) => RegistryError::Model(m),
            other => RegistryError::Model(other.to_string()),
        })?;
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
            workflow: options.workflow.clone(),
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

    /// Writes a config snapshot of `kind` (startup, snapshot, shutdown) unless --ncs; a failure
    /// is logged, never fatal (TorchServe does the same).
    pub fn save_snapshot(&self, kind: &str) {
        if !self.config.snapshots {
            return;
        }
        let _serial = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut models = BTreeMap::new();
        for (name, m) in self.models.read().unwrap().iter() {
            let mut versions = BTreeMap::new();
            for (version, v) in &m.versions {
                if v.url == DEMO_URL {
                    continue; // the built-in demo comes back by itself
                }
                if v.workflow.is_some() {
                    // A workflow's node comes back with its workflow, not as a model of its own
                    // (restored alone, it would make registering the workflow again a conflict).
                    continue;
                }
                let s = v.pool.settings();
                let mar_name = v
                    .url
                    .split(['?', '#'])
                    .next()
                    .and_then(|u| u.trim_end_matches('/').rsplit('/').next())
                    .unwrap_or(&v.url)
                    .to_string();
                versions.insert(
                    version.clone(),
                    snapshot::ModelState {
                        default_version: *version == m.default_version,
                        mar_name,
                        min_workers: v.pool.min_workers(),
                        max_workers: v.pool.max_workers(),
                        batch_size: s.batch_size,
                        max_batch_delay: s.max_batch_delay.as_millis() as u64,
                        response_timeout: Some(s.response_timeout.as_secs()),
                        startup_timeout: Some(s.startup_timeout.as_secs()),
                        runtime_type: Some(v.manifest.runtime.clone()),
                    },
                );
            }
            if !versions.is_empty() {
                models.insert(name.clone(), versions);
            }
        }
        let dir = snapshot::dir(&self.config.log_dir);
        match snapshot::write(&dir, kind, &self.config.properties, models) {
            Ok(path) => tracing::debug!("config snapshot written: {}", path.display()),
            Err(e) => tracing::error!(
                "cannot write the config snapshot into {}: {e}",
                dir.display()
            ),
        }
    }

    /// Registers the models of a `model_snapshot` (TorchServe's SnapshotManager.restore): each
    /// version from its archive in the model store, with its settings and worker counts, and
    /// the default versions as they were. A version that cannot be restored is logged and
    /// skipped; the others still come back.
    pub async fn restore(&self, snap: &snapshot::Snapshot) {
        tracing::info!("Started restoring models from snapshot {}", snap.name);
        for (name, versions) in &snap.models {
            for (version, st) in versions {
                let options = RegisterOptions {
                    model_name: Some(name.clone()),
                    initial_workers: Some(st.min_workers),
                    batch_size: Some(st.batch_size),
                    max_batch_delay: Some(Duration::from_millis(st.max_batch_delay)),
                    response_timeout: st.response_timeout.map(Duration::from_secs),
                    startup_timeout: st.startup_timeout.map(Duration::from_secs),
                    synchronous: false,
                    loaded_at_startup: true,
                    runtime: st.runtime_type.clone(),
                    ..Default::default()
                };
                match self.register(&st.mar_name, options).await {
                    Ok(v) => {
                        if v.version != *version {
                            tracing::warn!(
                                "snapshot model {name} version {version}: {} holds version {}",
                                st.mar_name,
                                v.version
                            );
                        }
                        if st.max_workers > st.min_workers {
                            v.pool.scale(st.min_workers, st.max_workers, false).await;
                        }
                        if st.default_version {
                            let _ = self.set_default(name, &v.version);
                        }
                        tracing::info!(
                            "restored model {name} version {} from {}",
                            v.version,
                            st.mar_name
                        );
                    }
                    Err(e) => tracing::error!(
                        "cannot restore model {name} version {version} from the snapshot ({}): {e}",
                        st.mar_name
                    ),
                }
            }
        }
    }

    /// Unregisters everything (server shutdown), stopping every worker.
    pub async fn shutdown(&self) {
        for l in self.loading.lock().unwrap().values() {
            l.cancel();
        }
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
