//! TorchServe's workflows: a `.war` archive (manifest, spec YAML, handler file) registers a DAG of
//! models, and `/wfpredict/{name}` runs a request through it.
//!
//! Registering a workflow registers each DAG node as a model named `<workflow>__<node>` (model
//! nodes from their archive, function nodes as a Python model whose handler is
//! `<handler file>:<node>`), all at once and synchronously; if any fails, those that succeeded are
//! unregistered again and the answer lists the failures, as TorchServe's WorkflowManager does.
//! A prediction starts at the DAG's start node with the request as received; a node with one
//! parent gets that parent's reply as parameter `body`, a node with several gets one parameter
//! per parent, named after it; nodes whose inputs are all there run in parallel. One leaf's reply
//! is the answer as is; several leaves answer a JSON object keyed by node. Each node call is an
//! ordinary inference request of its model (counted in its metrics), retried `retry-attempts`
//! times when it fails or takes longer than `timeout-ms`.
//!
//! Differences from TorchServe (docs/compatibility.md, "Workflows"): a .war file the server
//! downloaded takes its name in the workflow store only once the workflow is registered (a failed
//! registration leaves nothing behind); registering needs enable_model_api, since it registers
//! models; an unusable archive or spec is a 400 naming the reason (TorchServe: 500 or a Java
//! exception text); a node call that timed out is still counted in its model's metrics when its
//! reply finally arrives; the DAG size is bounded (spec::MAX_NODES).

pub mod spec;

use crate::error::ErrorKind;
use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::backend::{InferRequest, Param};
use crate::config::{read_small_file, Config};
use crate::metrics::Timings;
use crate::model::archive;
use crate::model::loading::Loading;
use crate::model::registry::{RegisterOptions, Registry, RegistryError};
use crate::worker::{Job, Reply, ReplyRx};

/// Most workflows registered at once (each holds an unpacked archive and its models).
pub const MAX_WORKFLOWS: usize = 256;

/// Why a workflow operation failed; each maps to TorchServe's status and exception type.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("Workflow not found: {0}")]
    NotFound(String),
    #[error("Workflow not found in workflow store: {0}")]
    NotInStore(String),
    #[error("Workflow store has not been configured.")]
    NoStore,
    #[error("{0}")]
    UrlRefused(String),
    #[error("Failed to download archive from: {url}: {why}")]
    Download { url: String, why: String },
    /// The URL's file name is already in the workflow store (TorchServe: 500).
    #[error("{0}")]
    FileExists(String),
    #[error("Workflow {0} is already registered.")]
    Conflict(String),
    #[error("Invalid workflow archive {url}: {why}")]
    Invalid { url: String, why: Box<WarError> },
    #[error("{0}")]
    BadRequest(String),
    #[error("Workflow {name} has failed to register. Failures: [{}]", failures.join(", "))]
    RegisterFailed { name: String, failures: Vec<String> },
    /// A node failed after its retries (TorchServe's message keeps only "Error executing X").
    #[error("Error executing {0}")]
    Execution(String),
    #[error("{0}")]
    Internal(String),
}

/// Why a workflow archive's contents are refused.
#[derive(Debug, thiserror::Error)]
pub enum WarError {
    #[error("cannot create a temporary folder: {0}")]
    TempDir(std::io::Error),
    /// Unzipping failed; shown without the model-archive wording ([`unzip_reason`]).
    #[error("{}", unzip_reason(.0))]
    Unzip(archive::ArchiveError),
    #[error(transparent)]
    Read(#[from] crate::config::ReadFileError),
    #[error(transparent)]
    Manifest(#[from] spec::ManifestError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// A file the manifest names (spec, handler) that leaves the archive.
    #[error("{0:?} points outside the archive")]
    Outside(String),
    #[error("the archive has no file {0:?}")]
    Missing(String),
    /// The manifest that makes the unpacked archive a model folder cannot be written.
    #[error("cannot prepare the function nodes: {0}")]
    FunctionNodes(std::io::Error),
    /// The blocking task unpacking the archive ended without an answer (it panicked).
    #[error("unpacking failed: {0}")]
    Unpacking(tokio::task::JoinError),
}

/// An unzip error's reason alone: the archive is named by the workflow error around it, and is
/// not a model archive.
fn unzip_reason(e: &archive::ArchiveError) -> String {
    match e {
        archive::ArchiveError::Invalid { reason, .. } => reason.clone(),
        archive::ArchiveError::File { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Why one attempt of a model node failed (logged; the node's retries decide the outcome).
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Model(#[from] RegistryError),
    /// The model's queue refused the job (full, or the model is going away).
    #[error("model {model} refused the request: {reason:?}")]
    Refused {
        model: String,
        reason: crate::worker::SubmitError,
    },
    #[error("model {model} answered {status}: {body}")]
    Status {
        model: String,
        status: u16,
        body: String,
    },
    #[error("model {0} dropped the request")]
    Dropped(String),
    #[error("no reply from model {model} within {timeout:?}")]
    Timeout { model: String, timeout: Duration },
}

impl WorkflowError {
    /// TorchServe's exception type (and so the status) of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WorkflowError::NotFound(_)
            | WorkflowError::NotInStore(_)
            | WorkflowError::NoStore
            | WorkflowError::UrlRefused(_) => ErrorKind::WorkflowNotFound,
            WorkflowError::Download { .. } => ErrorKind::DownloadArchive,
            WorkflowError::FileExists(_) => ErrorKind::FileAlreadyExists,
            WorkflowError::Conflict(_) => ErrorKind::Conflict,
            WorkflowError::Invalid { .. } => ErrorKind::InvalidWorkflow,
            WorkflowError::BadRequest(_) => ErrorKind::BadRequest,
            WorkflowError::RegisterFailed { .. } => ErrorKind::Workflow,
            WorkflowError::Execution(_) | WorkflowError::Internal(_) => ErrorKind::InternalServer,
        }
    }
}

/// Options of `POST /workflows`.
#[derive(Debug, Clone, Default)]
pub struct RegisterWorkflow {
    pub url: String,
    /// Name to use instead of the manifest's (`workflow_name`).
    pub name: Option<String>,
    pub response_timeout: Option<Duration>,
    pub startup_timeout: Option<Duration>,
}

/// One registered workflow.
pub struct Workflow {
    pub name: String,
    pub url: String,
    pub spec: spec::Spec,
    /// The model name of each node (same order as `spec.nodes`).
    models: Vec<String>,
    /// The .war file this server downloaded into the workflow store (removed on unregister).
    stored: Option<PathBuf>,
    /// The unpacked archive: function nodes' workers run from it.
    _dir: tempfile::TempDir,
}

impl Workflow {
    /// The describe answer's object (TorchServe's DescribeWorkflowResponse).
    pub fn describe(&self) -> serde_json::Value {
        let d = &self.spec.defaults;
        serde_json::json!({
            "workflowName": self.name,
            "workflowUrl": self.url,
            "minWorkers": d.min_workers,
            "maxWorkers": d.max_workers,
            "batchSize": d.batch_size,
            "maxBatchDelay": d.max_batch_delay_ms,
            "workflowDag": self.spec.dag_text,
        })
    }
}

/// A workflow's answer: the body and its content type.
pub struct WorkflowReply {
    pub body: Bytes,
    pub content_type: &'static str,
}

/// All workflows.
pub struct Workflows {
    config: Arc<Config>,
    registry: Arc<Registry>,
    map: RwLock<BTreeMap<String, Arc<Workflow>>>,
    /// Names being registered: a second registration of the same name is a conflict.
    registering: Mutex<HashSet<String>>,
}

/// Frees a name reserved in `registering` however the registration ends.
struct Reserved<'a>(&'a Workflows, String);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.registering.lock().unwrap().remove(&self.1);
    }
}

/// The file name a URL names (its last path segment, without query or fragment).
fn file_name_of(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

impl Workflows {
    pub fn new(config: Arc<Config>, registry: Arc<Registry>) -> Workflows {
        Workflows {
            config,
            registry,
            map: RwLock::new(BTreeMap::new()),
            registering: Mutex::new(HashSet::new()),
        }
    }

    /// Names and URLs, sorted by name.
    pub fn list(&self) -> Vec<(String, String)> {
        let map = self.map.read().unwrap();
        map.values()
            .map(|w| (w.name.clone(), w.url.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Workflow>, WorkflowError> {
        self.map
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| WorkflowError::NotFound(name.to_string()))
    }

    /// Finds the archive (the workflow store, or a download into it).
    async fn locate(
        &self,
        url: &str,
        store: &Path,
    ) -> Result<(PathBuf, Option<(tempfile::TempPath, PathBuf)>), WorkflowError> {
        if url.contains("://") {
            if url.contains("..") {
                return Err(WorkflowError::UrlRefused(format!(
                    "Relative path is not allowed in url: {url}"
                )));
            }
            if !self.config.url_allowed(url) {
                return Err(WorkflowError::UrlRefused(format!(
                    "Given URL {url} does not match any allowed URL(s)"
                )));
            }
            if let Some(p) = url.strip_prefix("file://") {
                let path = PathBuf::from(p);
                if !path.is_file() {
                    return Err(WorkflowError::NotInStore(url.to_string()));
                }
                return Ok((path, None));
            }
            if !url.starts_with("http://") {
                return Err(WorkflowError::Download {
                    url: url.to_string(),
                    why: "oxserve downloads plain http:// URLs only; put the archive in the workflow store instead".into(),
                });
            }
            let file = file_name_of(url);
            if file.is_empty() || file == "." || file == ".." {
                return Err(WorkflowError::Download {
                    url: url.to_string(),
                    why: "the URL names no file".into(),
                });
            }
            let target = store.join(file);
            if target.exists() {
                return Err(WorkflowError::FileExists(file.to_string()));
            }
            let loading = Arc::new(Loading::new(file.to_string(), url.to_string()));
            let temp = crate::model::download::fetch(url, &self.config, store, &loading)
                .await
                .map_err(|why| WorkflowError::Download {
                    url: url.to_string(),
                    why: why.to_string(),
                })?;
            return Ok((temp.to_path_buf(), Some((temp, target))));
        }
        // A file of the workflow store, by its plain name.
        let plain = Path::new(url)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        let path = store.join(url);
        if !plain || url.is_empty() || !path.is_file() {
            return Err(WorkflowError::NotInStore(url.to_string()));
        }
        Ok((path, None))
    }

    /// Registers a workflow and all its models; answers its name.
    pub async fn register(&self, req: RegisterWorkflow) -> Result<String, WorkflowError> {
        let url = req.url.as_str();
        if url.is_empty() {
            return Err(WorkflowError::BadRequest(
                "Parameter url is required.".into(),
            ));
        }
        let store = self
            .config
            .workflow_store
            .clone()
            .ok_or(WorkflowError::NoStore)?;
        let (path, download) = self.locate(url, &store).await?;
        let invalid = |why: WarError| WorkflowError::Invalid {
            url: url.to_string(),
            why: Box::new(why),
        };
        // Unpacking and reading are file work: off the async threads.
        let limits = archive::Limits::from_config(&self.config);
        let (dir, manifest, spec) = tokio::task::spawn_blocking(move || {
            let dir = crate::tempdir::private(crate::tempdir::TempKind::Workflow)
                .map_err(WarError::TempDir)?;
            archive::unpack_zip(&path, dir.path(), &limits, None).map_err(WarError::Unzip)?;
            let text = read_small_file(
                &dir.path().join("WAR-INF").join("MANIFEST.json"),
                "WAR-INF/MANIFEST.json",
            )?;
            let manifest = spec::WarManifest::parse(&text)?;
            let w = manifest.workflow.as_ref().expect("checked by parse");
            let spec_file = w.spec_file.clone().unwrap_or_default();
            let spec_path = relative_file(dir.path(), &spec_file)?;
            let text = read_small_file(&spec_path, &format!("the workflow spec {spec_file}"))?;
            let handler = w.handler.as_deref().filter(|h| !h.is_empty());
            if let Some(h) = handler {
                relative_file(dir.path(), h)?;
            }
            let spec = spec::parse(&text, handler.is_some())?;
            Ok::<_, WarError>((dir, manifest, spec))
        })
        .await
        .map_err(|e| invalid(WarError::Unpacking(e)))?
        .map_err(invalid)?;
        let w = manifest.workflow.expect("checked by parse");
        let name = req
            .name
            .filter(|n| !n.is_empty())
            .or(w.workflow_name)
            .unwrap_or_default();
        if !valid_workflow_name(&name) {
            let shown: String = name.chars().take(100).collect();
            return Err(WorkflowError::BadRequest(format!(
                "invalid workflow name {shown:?}: it must start with a letter or digit, hold only letters, digits, '_', '-' and '.', and be at most 100 characters"
            )));
        }
        let _reserved = {
            let map = self.map.read().unwrap();
            let mut registering = self.registering.lock().unwrap();
            if map.contains_key(&name) || registering.contains(&name) {
                return Err(WorkflowError::Conflict(name));
            }
            if map.len() + registering.len() >= MAX_WORKFLOWS {
                return Err(WorkflowError::BadRequest(format!(
                    "at most {MAX_WORKFLOWS} workflows can be registered"
                )));
            }
            registering.insert(name.clone());
            Reserved(self, name.clone())
        };
        // Function nodes run from the unpacked archive: a manifest there makes it a model folder
        // whose handler each node's registration sets to `<handler file>:<node>`.
        let handler = w.handler.unwrap_or_default();
        if spec.nodes.iter().any(|n| n.kind == spec::Kind::Function) {
            write_function_manifest(dir.path(), &name, &handler)
                .map_err(|e| invalid(WarError::FunctionNodes(e)))?;
        }
        let models: Vec<String> = spec
            .nodes
            .iter()
            .map(|n| format!("{name}__{}", n.name))
            .collect();
        let registrations = spec.nodes.iter().zip(&models).map(|(node, model)| {
            let s = node.settings;
            let options = RegisterOptions {
                model_name: Some(model.clone()),
                // TorchServe registers each model with max-workers initial workers.
                initial_workers: Some(s.max_workers),
                batch_size: Some(s.batch_size),
                max_batch_delay: Some(Duration::from_millis(u64::from(s.max_batch_delay_ms))),
                response_timeout: req.response_timeout,
                startup_timeout: req.startup_timeout,
                synchronous: true,
                workflow: Some(name.clone()),
                handler: match node.kind {
                    spec::Kind::Function => Some(format!("{handler}:{}", node.name)),
                    spec::Kind::Model { .. } => None,
                },
                ..RegisterOptions::default()
            };
            let dir = dir.path().to_path_buf();
            let shown = format!("{handler}:{}", node.name);
            async move {
                let result = match &node.kind {
                    spec::Kind::Model { url } => self.registry.register(url, options).await,
                    spec::Kind::Function => {
                        self.registry.register_folder(&dir, &shown, options).await
                    }
                };
                (model.clone(), result)
            }
        });
        let results = futures_util::future::join_all(registrations).await;
        let mut failures = Vec::new();
        let mut registered = Vec::new();
        for (model, result) in results {
            match result {
                Ok(_) => registered.push(model),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if !failures.is_empty() {
            for model in registered {
                if let Err(e) = self.registry.unregister(&model, None).await {
                    failures.push(format!("Error while unregistering {model}: {e}"));
                }
            }
            return Err(WorkflowError::RegisterFailed { name, failures });
        }
        // Only a registered workflow's download takes its name in the store.
        let stored = match download {
            Some((temp, target)) => match temp.persist_noclobber(&target) {
                Ok(_) => Some(target),
                Err(e) => {
                    tracing::warn!(
                        "workflow {name} is registered, but its archive could not be kept as {}: {e}",
                        target.display()
                    );
                    None
                }
            },
            None => None,
        };
        let workflow = Arc::new(Workflow {
            name: name.clone(),
            url: url.to_string(),
            spec,
            models,
            stored,
            _dir: dir,
        });
        self.map.write().unwrap().insert(name.clone(), workflow);
        Ok(name)
    }

    /// Unregisters a workflow and its models; removes the archive it downloaded.
    pub async fn unregister(&self, name: &str) -> Result<(), WorkflowError> {
        let workflow = self
            .map
            .write()
            .unwrap()
            .remove(name)
            .ok_or_else(|| WorkflowError::NotFound(name.to_string()))?;
        let mut failures = Vec::new();
        for model in &workflow.models {
            match self.registry.unregister(model, None).await {
                // Already gone (unregistered through /models): nothing left to do.
                Ok(_) | Err(RegistryError::ModelNotFound(_)) => {}
                Err(e) => failures.push(format!("{model}: {e}")),
            }
        }
        if let Some(file) = &workflow.stored {
            if let Err(e) = std::fs::remove_file(file) {
                tracing::warn!("cannot remove {}: {e}", file.display());
            }
        }
        if !failures.is_empty() {
            return Err(WorkflowError::BadRequest(format!(
                "Error while unregistering the workflow {name}. Details: [{}]",
                failures.join(", ")
            )));
        }
        Ok(())
    }

    /// Runs a request through a workflow's DAG. Each node call is a task of its own: a client
    /// that goes away, or a failing sibling branch, does not cancel a call its model already
    /// queued, so every request a model receives is answered and counted.
    pub async fn predict(
        self: &Arc<Self>,
        name: &str,
        request: InferRequest,
    ) -> Result<WorkflowReply, WorkflowError> {
        let wf = self.get(name)?;
        let nodes = &wf.spec.nodes;
        let mut indegree: Vec<usize> = nodes.iter().map(|n| n.parents.len()).collect();
        let mut inputs: Vec<Option<InferRequest>> = vec![None; nodes.len()];
        let headers = request.headers.clone();
        let mut running = FuturesUnordered::new();
        let start = wf.spec.start;
        let mut first = request;
        first.id = crate::logging::new_request_id();
        running.push(tokio::spawn(Self::call(
            self.clone(),
            wf.clone(),
            start,
            first,
        )));
        let mut leaves: Vec<(usize, Bytes)> = Vec::new();
        while let Some(joined) = running.next().await {
            let (i, result) = joined.map_err(|e| {
                WorkflowError::Internal(format!("a workflow node task failed: {e}"))
            })?;
            let out = result?;
            if nodes[i].children.is_empty() {
                leaves.push((i, out));
                continue;
            }
            for &c in &nodes[i].children {
                let input = inputs[c].get_or_insert_with(|| InferRequest {
                    id: crate::logging::new_request_id(),
                    headers: headers.clone(),
                    params: Vec::new(),
                });
                // TorchServe's rule: the only parent's reply is the `body`; with several, each
                // reply is a parameter named after its node.
                let param = if nodes[c].parents.len() == 1 {
                    "body".to_string()
                } else {
                    nodes[i].name.clone()
                };
                input.params.push(Param {
                    name: param,
                    content_type: String::new(),
                    value: out.clone(),
                });
                indegree[c] -= 1;
                if indegree[c] == 0 {
                    let input = inputs[c].take().expect("set above");
                    running.push(tokio::spawn(Self::call(self.clone(), wf.clone(), c, input)));
                }
            }
        }
        if leaves.len() == 1 {
            let (_, body) = leaves.pop().expect("one leaf");
            return Ok(WorkflowReply {
                body,
                content_type: "application/json",
            });
        }
        leaves.sort_by_key(|(i, _)| *i);
        let mut object = serde_json::Map::new();
        for (i, body) in leaves {
            let value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&body).into())
            });
            object.insert(nodes[i].name.clone(), value);
        }
        Ok(WorkflowReply {
            body: Bytes::from(serde_json::Value::Object(object).to_string()),
            content_type: "application/json",
        })
    }

    /// One node's call, with its retries: answers (node index, reply body).
    async fn call(
        self: Arc<Self>,
        wf: Arc<Workflow>,
        node: usize,
        request: InferRequest,
    ) -> (usize, Result<Bytes, WorkflowError>) {
        let n = &wf.spec.nodes[node];
        let model = &wf.models[node];
        for attempt in 0..=n.settings.retry_attempts {
            match self
                .attempt(model, request.clone(), n.settings.timeout())
                .await
            {
                Ok(body) => return (node, Ok(body)),
                Err(why) => tracing::warn!(
                    "workflow {} node {} attempt {}: {why}",
                    wf.name,
                    n.name,
                    attempt + 1
                ),
            }
        }
        (node, Err(WorkflowError::Execution(n.name.clone())))
    }

    /// One inference request of a node's model, counted in its metrics like any other.
    async fn attempt(
        &self,
        model: &str,
        mut request: InferRequest,
        timeout: Duration,
    ) -> Result<Bytes, AttemptError> {
        let version = self.registry.get(model, None)?;
        let arrival = Instant::now();
        request.id = crate::logging::new_request_id();
        let (job, rx) = Job::new(request, Timings::new(arrival));
        if let Err(e) = version.pool.submit(job) {
            let mut t = Timings::new(arrival);
            t.responded = Some(Instant::now());
            version.metrics.record_request(&t, 503, false);
            return Err(AttemptError::Refused {
                model: model.to_string(),
                reason: e,
            });
        }
        let metrics = version.metrics.clone();
        let mut rx = Box::pin(collect(rx));
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Some((t, status, body))) => {
                metrics.record_request(&t, status, false);
                if (200..300).contains(&status) {
                    Ok(body)
                } else {
                    Err(AttemptError::Status {
                        model: model.to_string(),
                        status,
                        body: String::from_utf8_lossy(&body[..body.len().min(200)]).into(),
                    })
                }
            }
            Ok(None) => Err(AttemptError::Dropped(model.to_string())),
            Err(_) => {
                // The worker still has it: its reply is counted when it comes.
                tokio::spawn(async move {
                    if let Some((t, status, _)) = rx.await {
                        metrics.record_request(&t, status, false);
                    }
                });
                Err(AttemptError::Timeout {
                    model: model.to_string(),
                    timeout,
                })
            }
        }
    }
}

/// A reply, whole or streamed, as (timings, status, body).
async fn collect(rx: ReplyRx) -> Option<(Timings, u16, Bytes)> {
    match rx.await.ok()? {
        Reply::Whole(part) => {
            let mut t = part.timings;
            t.responded = Some(Instant::now());
            Some((t, part.response.status, part.response.body))
        }
        Reply::Stream(first, mut rest) => {
            let mut body = first.response.body.to_vec();
            let mut status = first.response.status;
            let mut t = first.timings;
            let mut last = first.last;
            while !last {
                let part = rest.recv().await?;
                body.extend_from_slice(&part.response.body);
                status = part.response.status;
                last = part.last;
            }
            t.responded = Some(Instant::now());
            Some((t, status, Bytes::from(body)))
        }
    }
}

/// A workflow name: the registry's model-name rules.
fn valid_workflow_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        && name.len() <= 100
}

/// A file named inside the unpacked archive, which must exist there.
fn relative_file(dir: &Path, name: &str) -> Result<PathBuf, WarError> {
    let path = Path::new(name);
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(WarError::Outside(name.to_string()));
    }
    let full = dir.join(path);
    if !full.is_file() {
        return Err(WarError::Missing(name.to_string()));
    }
    Ok(full)
}

/// `MAR-INF/MANIFEST.json` for the unpacked archive as a Python model folder.
fn write_function_manifest(dir: &Path, name: &str, handler: &str) -> std::io::Result<()> {
    let manifest = archive::Manifest {
        created_on: String::new(),
        runtime: "python".into(),
        model: archive::ManifestModel {
            model_name: name.to_string(),
            model_version: "1.0".into(),
            handler: handler.to_string(),
            ..Default::default()
        },
        archiver_version: String::new(),
    };
    let folder = dir.join("MAR-INF");
    std::fs::create_dir_all(&folder)?;
    std::fs::write(
        folder.join("MANIFEST.json"),
        serde_json::to_vec(&manifest).map_err(std::io::Error::other)?,
    )
}
