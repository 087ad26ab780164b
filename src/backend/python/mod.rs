//! Python handler workers: one Python process per worker, spoken to over a Unix socket with
//! TorchServe's worker protocol ([`super::protocol`]).
//!
//! The worker program is oxserve's own standard-library runtime (`python/` in the repository,
//! embedded in the binary and written once to a private temporary folder) or, with
//! `worker_runtime=torchserve`, TorchServe's `ts/model_service_worker.py` from the interpreter's
//! torchserve package. Either way the process:
//!
//! - runs `<python_executable> <worker.py> --sock-type unix --sock-name <dir>/.oxs.sock.<port>
//!   --metrics-config <metrics.yaml>` in the unpacked model folder;
//! - lives in its own process group, gets SIGKILL when the server dies (PR_SET_PDEATHSIG) and is
//!   killed when its backend is dropped, so no worker outlives the server;
//! - prints `Torch worker started.` once it listens; the backend then connects and sends load;
//! - prints `[METRICS]` lines (recorded in the registry) and logs (forwarded to MODEL_LOG, one
//!   line at most `log_max_line_bytes` long, attributed to the requests oxserve's runtime names).
//!
//! One module each: [`runtime`] embeds oxserve's runtime, [`torchserve`] finds TorchServe's
//! worker, [`process`] supervises the process, [`transport`] speaks the socket protocol,
//! [`logs`] forwards the worker's output, [`deps`] installs a model's own pip packages
//! (`install_py_dep_per_model`) once per model version, before its first worker starts, and
//! [`parallel`] reads a model's parallelism (`parallelType`, `torchrun:`): such a worker runs
//! under torchrun, one process per rank, each rank on a socket of its own.

mod deps;
mod logs;
mod parallel;
mod process;
mod runtime;
mod torchserve;
mod transport;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use tokio::process::Command;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use std::sync::Arc;

use super::{Backend, BackendError, BackendLoader, ModelSpec, WorkerSpec};
use crate::config::WorkerRuntime;
use process::WorkerProcess;
use transport::PythonBackend;

/// Starts Python workers (`runtime` "python").
#[derive(Default)]
pub struct PythonLoader {
    /// TorchServe's worker script, found once per loader when `worker_runtime=torchserve`.
    torchserve_worker: OnceCell<Result<PathBuf, torchserve::LocateError>>,
    /// The model's own packages (`install_py_dep_per_model`), installed once: a loader serves one
    /// model version, and the folder goes when the version does. A failed install is not kept,
    /// so a later worker start tries again.
    dependencies: OnceCell<Option<deps::Dependencies>>,
}

impl PythonLoader {
    /// A loader; settings (interpreter, runtime choice, metrics config, timeouts) come from each
    /// [`WorkerSpec`].
    pub fn new() -> PythonLoader {
        PythonLoader::default()
    }

    async fn torchserve_worker(&self, python: &str) -> Result<PathBuf, BackendError> {
        self.torchserve_worker
            .get_or_init(|| torchserve::locate_torchserve_worker(python.to_string()))
            .await
            .clone()
            .map_err(|e| BackendError::Load(e.to_string()))
    }

    /// The folder of the model's own packages, installing them first if they are not yet.
    async fn dependencies(&self, spec: &Arc<ModelSpec>) -> Result<Option<&Path>, BackendError> {
        let deps = self
            .dependencies
            .get_or_try_init(|| deps::install(spec))
            .await?;
        Ok(deps.as_ref().map(|d| d.path()))
    }
}

#[async_trait]
impl BackendLoader for PythonLoader {
    fn runtime(&self) -> &str {
        "python"
    }

    async fn prepare(&self, spec: &Arc<ModelSpec>) -> Result<(), BackendError> {
        // A malformed parallelism fails the registration, not each worker start.
        let yaml = crate::model::archive::model_config(&spec.model_dir, &spec.manifest)
            .map_err(|e| BackendError::Load(e.to_string()))?;
        parallel::Parallel::from_model_yaml(yaml.as_ref())
            .map_err(|e| BackendError::Load(e.to_string()))?;
        self.dependencies(spec).await.map(|_| ())
    }

    async fn load(&self, spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError> {
        // Before the start-up clock runs: an install has its own limit (install_py_dep_timeout).
        let dependencies = self.dependencies(&spec.model).await?;
        let deadline = Instant::now() + spec.model.startup_timeout;
        let settings = &spec.model.settings;
        let runtime = runtime::runtime_dir().map_err(|e| {
            BackendError::Load(format!("cannot write the Python worker runtime: {e}"))
        })?;
        let script = match settings.worker_runtime {
            WorkerRuntime::Oxserve => runtime.worker_script(),
            WorkerRuntime::TorchServe => {
                self.torchserve_worker(&settings.python_executable).await?
            }
        };
        let metrics_config = settings
            .metrics_config
            .clone()
            .unwrap_or_else(|| runtime.default_metrics_config());
        let model_dir = std::path::absolute(&spec.model.model_dir)
            .unwrap_or_else(|_| spec.model.model_dir.clone());

        // model-config.yaml reaches handlers as context.model_yaml_config (parsed here, once, with
        // a full YAML parser, so the stdlib runtime needs none).
        let model_yaml = crate::model::archive::model_config(&model_dir, &spec.model.manifest)
            .map_err(|e| BackendError::Load(e.to_string()))?;
        let parallel = parallel::Parallel::from_model_yaml(model_yaml.as_ref())
            .map_err(|e| BackendError::Load(e.to_string()))?;
        let ranks = parallel.as_ref().map_or(1, |p| p.ranks());
        // `asyncCommunication: true` starts the worker with `--async` as TorchServe does: it then
        // reads requests while others are in flight (TorchServe's ts/async_service.py, or
        // oxserve's runtime) and answers them in any order. The `models` config key may set it
        // too (it takes precedence over model-config.yaml, as for every per-model key).
        let from_models = spec
            .model
            .settings
            .models
            .get(&spec.model.model_name)
            .and_then(|versions| versions.get(&spec.model.model_version))
            .and_then(|m| m.batch_mode);
        let async_mode = match from_models {
            Some(mode) => mode == crate::config::BatchMode::Async,
            None => {
                model_yaml
                    .as_ref()
                    .and_then(|v| v.get("asyncCommunication"))
                    .and_then(|v| v.as_bool())
                    == Some(true)
            }
        };
        let model_yaml = model_yaml
            .map(|v| v.to_string())
            .unwrap_or_else(|| "{}".to_string());

        // Private (0700): whoever can connect to the socket can drive the worker.
        let sock_dir = crate::tempdir::private(crate::tempdir::TempKind::Socket)
            .map_err(|e| BackendError::Load(format!("cannot create a socket folder: {e}")))?;
        let sock = sock_dir.path().join(format!(".oxs.sock.{}", spec.id));
        // The last rank's name is the longest.
        let last = sock_dir.path().join(format!(
            ".oxs.sock.{}",
            u64::from(spec.id) + u64::from(ranks) - 1
        ));
        if last.as_os_str().len() >= 100 {
            return Err(BackendError::Load(format!(
                "socket path {} is too long for a Unix socket: set TMPDIR to a shorter folder",
                last.display()
            )));
        }

        let mut cmd = Command::new(&settings.python_executable);
        let mut launch_hint = None;
        match &parallel {
            Some(p) if p.uses_torchrun() => {
                // torchrun runs `python -u <program> args` per rank; the program is oxserve's
                // wrapper, which ties each rank's life to torchrun's, then runs the worker.
                let rdzv_id = format!("{}_{}", spec.model.model_name, spec.id);
                cmd.args(p.torchrun_args(&rdzv_id, &settings.log_dir.join("torchelastic_ts")))
                    .arg(runtime.rank_wrapper())
                    .arg(&script)
                    .env("LOGLEVEL", "INFO")
                    .env("OMP_NUM_THREADS", p.torchrun.omp_threads.to_string());
                launch_hint = Some(format!(
                    "parallelType runs the worker under torchrun with {} ranks: `{} -m torch.distributed.run` needs torch in that environment",
                    p.level, settings.python_executable
                ));
            }
            _ => {
                cmd.arg(&script);
            }
        }
        if let Some(p) = &parallel {
            let gpus = settings.number_of_gpu.unwrap_or(0);
            if let Some(ids) = p.visible_devices(spec.gpu_id, gpus) {
                cmd.env("CUDA_VISIBLE_DEVICES", ids);
            }
        }
        cmd.env("OXSERVE_MODEL_YAML_CONFIG", model_yaml);
        // metrics.yaml's model_metrics, parsed by the server too (TorchServe's worker reads the
        // file named by --metrics-config itself, with PyYAML).
        cmd.env(
            "OXSERVE_MODEL_METRICS",
            spec.model.metrics.handler_metrics_json(),
        );
        cmd.arg("--sock-type")
            .arg("unix")
            .arg("--sock-name")
            .arg(&sock)
            .arg("--metrics-config")
            .arg(&metrics_config);
        if async_mode {
            cmd.arg("--async");
        }
        cmd.current_dir(&model_dir)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONPATH", process::python_path(&model_dir, dependencies));
        let (process, started_rx) = WorkerProcess::spawn(cmd, spec).map_err(|e| {
            BackendError::Load(format!(
                "cannot start Python worker {:?} (python_executable): {e}",
                settings.python_executable
            ))
        })?;
        let mut backend = PythonBackend {
            name: spec.name.clone(),
            process,
            stream: None,
            peers: Vec::new(),
            ranks,
            broadcast: parallel.as_ref().is_some_and(|p| p.broadcasts_inference()),
            launch_hint,
            buf: BytesMut::with_capacity(64 * 1024),
            response_timeout: spec.model.response_timeout,
            max_len: settings.max_response_size.max(1024),
            async_mode,
            cancellable: async_mode && settings.worker_runtime == WorkerRuntime::Oxserve,
            batch_size: spec.model.batch_size.max(1) as usize,
            last_sent: 0,
            in_flight: Default::default(),
            dead: None,
            _sock_dir: sock_dir,
            _runtime: runtime,
        };
        match backend
            .start(spec, &sock, &model_dir, started_rx, deadline)
            .await
        {
            Ok(()) => Ok(Box::new(backend)),
            Err(e) => {
                let detail = backend.reap_and_describe(Duration::from_secs(2)).await;
                Err(BackendError::Load(format!("{e}{detail}")))
            }
        }
    }
}
