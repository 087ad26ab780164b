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

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, OnceCell};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::protocol::{self, FrameResponse, LoadRequest};
use super::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, Part, StreamSink, WorkerSpec,
};
use crate::config::WorkerRuntime;

/// oxserve's worker runtime, relative path and text.
const RUNTIME_FILES: &[(&str, &str)] = &[
    (
        "oxserve_worker.py",
        include_str!("../../python/oxserve_worker.py"),
    ),
    (
        "oxserve_runtime/__init__.py",
        include_str!("../../python/oxserve_runtime/__init__.py"),
    ),
    (
        "oxserve_runtime/context.py",
        include_str!("../../python/oxserve_runtime/context.py"),
    ),
    (
        "oxserve_runtime/metrics.py",
        include_str!("../../python/oxserve_runtime/metrics.py"),
    ),
    (
        "oxserve_runtime/protocol.py",
        include_str!("../../python/oxserve_runtime/protocol.py"),
    ),
    (
        "oxserve_runtime/envelope.py",
        include_str!("../../python/oxserve_runtime/envelope.py"),
    ),
    (
        "oxserve_runtime/service.py",
        include_str!("../../python/oxserve_runtime/service.py"),
    ),
    (
        "ts/__init__.py",
        include_str!("../../python/ts/__init__.py"),
    ),
    (
        "ts/handler_utils/__init__.py",
        include_str!("../../python/ts/handler_utils/__init__.py"),
    ),
    (
        "ts/handler_utils/utils.py",
        include_str!("../../python/ts/handler_utils/utils.py"),
    ),
    (
        "ts/metrics/__init__.py",
        include_str!("../../python/ts/metrics/__init__.py"),
    ),
    (
        "ts/metrics/dimension.py",
        include_str!("../../python/ts/metrics/dimension.py"),
    ),
    (
        "ts/metrics/metric_type_enum.py",
        include_str!("../../python/ts/metrics/metric_type_enum.py"),
    ),
    (
        "ts/protocol/__init__.py",
        include_str!("../../python/ts/protocol/__init__.py"),
    ),
    (
        "ts/protocol/otf_message_handler.py",
        include_str!("../../python/ts/protocol/otf_message_handler.py"),
    ),
    (
        "ts/utils/__init__.py",
        include_str!("../../python/ts/utils/__init__.py"),
    ),
    (
        "ts/utils/util.py",
        include_str!("../../python/ts/utils/util.py"),
    ),
    ("default_metrics.yaml", crate::metrics::spec::DEFAULT_YAML),
];

/// The line a worker prints once its socket listens.
const STARTED_LINE: &str = "Torch worker started.";
const METRICS_PREFIX: &str = "[METRICS]";

/// The runtime files on disk; removed when the last backend and loader using them are gone.
struct RuntimeDir {
    dir: tempfile::TempDir,
}

static RUNTIME: Mutex<Weak<RuntimeDir>> = Mutex::new(Weak::new());

/// Writes the embedded runtime into a private folder once, or returns the folder in use.
fn runtime_dir() -> io::Result<Arc<RuntimeDir>> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = slot.upgrade() {
        return Ok(rt);
    }
    let dir = crate::model::archive::private_tempdir("oxserve-python-")?;
    for (rel, text) in RUNTIME_FILES {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    let rt = Arc::new(RuntimeDir { dir });
    *slot = Arc::downgrade(&rt);
    Ok(rt)
}

/// Starts Python workers (`runtime` "python").
#[derive(Default)]
pub struct PythonLoader {
    /// TorchServe's worker script, found once per loader when `worker_runtime=torchserve`.
    torchserve_worker: OnceCell<Result<PathBuf, String>>,
}

impl PythonLoader {
    /// A loader; settings (interpreter, runtime choice, metrics config, timeouts) come from each
    /// [`WorkerSpec`].
    pub fn new() -> PythonLoader {
        PythonLoader::default()
    }

    async fn torchserve_worker(&self, python: &str) -> Result<PathBuf, BackendError> {
        self.torchserve_worker
            .get_or_init(|| locate_torchserve_worker(python.to_string()))
            .await
            .clone()
            .map_err(BackendError::Load)
    }
}

/// Finds `ts/model_service_worker.py` of the torchserve package installed for `python`.
async fn locate_torchserve_worker(python: String) -> Result<PathBuf, String> {
    let out = Command::new(&python)
        .args(["-c", "import ts, os; print(os.path.dirname(ts.__file__))"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match timeout(Duration::from_secs(120), out).await {
        Err(_) => {
            return Err(format!(
                "worker_runtime=torchserve: `{python} -c 'import ts'` did not finish in 120 s"
            ))
        }
        Ok(Err(e)) => {
            return Err(format!(
                "worker_runtime=torchserve: cannot run python_executable {python:?}: {e}"
            ))
        }
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "worker_runtime=torchserve needs the torchserve package in the environment of python_executable {python:?}, but `import ts` failed: {last}"
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let script = Path::new(&dir).join("model_service_worker.py");
    if !script.is_file() {
        return Err(format!(
            "worker_runtime=torchserve: {} does not exist (is the ts package TorchServe's?)",
            script.display()
        ));
    }
    Ok(script)
}

#[async_trait]
impl BackendLoader for PythonLoader {
    fn runtime(&self) -> &str {
        "python"
    }

    async fn load(&self, spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError> {
        let deadline = Instant::now() + spec.startup_timeout;
        let settings = &spec.settings;
        let runtime = runtime_dir().map_err(|e| {
            BackendError::Load(format!("cannot write the Python worker runtime: {e}"))
        })?;
        let script = match settings.worker_runtime {
            WorkerRuntime::Oxserve => runtime.dir.path().join("oxserve_worker.py"),
            WorkerRuntime::TorchServe => {
                self.torchserve_worker(&settings.python_executable).await?
            }
        };
        let metrics_config = settings
            .metrics_config
            .clone()
            .unwrap_or_else(|| runtime.dir.path().join("default_metrics.yaml"));
        // Private (0700): whoever can connect to the socket can drive the worker.
        let sock_dir = crate::model::archive::private_tempdir("oxs-")
            .map_err(|e| BackendError::Load(format!("cannot create a socket folder: {e}")))?;
        let sock = sock_dir.path().join(format!(".oxs.sock.{}", spec.port));
        if sock.as_os_str().len() >= 100 {
            return Err(BackendError::Load(format!(
                "socket path {} is too long for a Unix socket: set TMPDIR to a shorter folder",
                sock.display()
            )));
        }
        let model_dir =
            std::path::absolute(&spec.model_dir).unwrap_or_else(|_| spec.model_dir.clone());

        // model-config.yaml reaches handlers as context.model_yaml_config (parsed here, once, with
        // a full YAML parser, so the stdlib runtime needs none).
        let model_yaml = crate::model::archive::model_config(&model_dir, &spec.manifest)
            .map_err(BackendError::Load)?;
        // `asyncCommunication: true` starts the worker with `--async` as TorchServe does: it then
        // reads requests while others are in flight (TorchServe's ts/async_service.py, or
        // oxserve's runtime) and answers them in any order.
        let async_mode = model_yaml
            .as_ref()
            .and_then(|v| v.get("asyncCommunication"))
            .and_then(|v| v.as_bool())
            == Some(true);
        let model_yaml = model_yaml
            .map(|v| v.to_string())
            .unwrap_or_else(|| "{}".to_string());
        let mut cmd = Command::new(&settings.python_executable);
        cmd.env("OXSERVE_MODEL_YAML_CONFIG", model_yaml);
        // metrics.yaml's model_metrics, parsed by the server too (TorchServe's worker reads the
        // file named by --metrics-config itself, with PyYAML).
        cmd.env("OXSERVE_MODEL_METRICS", spec.metrics.handler_metrics_json());
        cmd.arg(&script)
            .arg("--sock-type")
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
            .env("PYTHONPATH", python_path(&model_dir))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            BackendError::Load(format!(
                "cannot start Python worker {:?} (python_executable): {e}",
                settings.python_executable
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        let tail = Arc::new(Mutex::new(Tail::default()));
        let (started_tx, started_rx) = oneshot::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let io_tasks = vec![
            tokio::spawn(forward_stdout(
                stdout,
                spec.clone(),
                tail.clone(),
                started_tx,
            )),
            tokio::spawn(forward_stderr(stderr, spec.clone(), tail.clone())),
        ];
        let mut backend = PythonBackend {
            name: spec.name.clone(),
            child,
            pid,
            stream: None,
            buf: BytesMut::with_capacity(64 * 1024),
            tail,
            response_timeout: spec.response_timeout,
            max_len: settings.max_response_size.max(1024),
            async_mode,
            batch_size: spec.batch_size.max(1) as usize,
            dead: None,
            reaped: false,
            io_tasks,
            _sock_dir: sock_dir,
            _runtime: runtime,
        };
        match backend
            .start(spec, &sock, &model_dir, started_rx, deadline)
            .await
        {
            Ok(()) => Ok(Box::new(backend)),
            Err(message) => {
                let detail = backend.reap_and_describe(Duration::from_secs(2)).await;
                Err(BackendError::Load(format!("{message}{detail}")))
            }
        }
    }
}

/// PYTHONPATH with the model folder first (TorchServe's frontend does the same).
fn python_path(model_dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![model_dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| model_dir.as_os_str().to_owned())
}

/// Asks the kernel to SIGKILL the child when the server dies.
///
/// Linux sends the signal when the *thread* that forked exits, so workers must be spawned from a
/// thread that lives as long as the server: a runtime worker thread (any ordinary async context),
/// never a `spawn_blocking` thread, which tokio retires after some idle seconds.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid/prctl/getppid are async-signal-safe and the closure allocates nothing.
        let parent = unsafe { libc::getpid() };
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The server died between fork and prctl.
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// The last lines a worker printed, for error messages.
#[derive(Default)]
struct Tail {
    stdout: Option<String>,
    stderr: Option<String>,
}

/// Reads `stream` line by line, handing each line to `on_line` with the number of bytes cut from
/// it. A line is kept up to `max` bytes; the rest of a longer one is read and thrown away as it
/// arrives, so a handler printing gigabytes without a newline costs `max` bytes of memory, not
/// gigabytes.
async fn read_lines(
    stream: impl AsyncRead + Unpin,
    max: usize,
    mut on_line: impl FnMut(&str, Option<u64>),
) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut raw: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let mut emit = |raw: &mut Vec<u8>, total: &mut u64| {
        if raw.last() == Some(&b'\r') && *total == raw.len() as u64 {
            raw.pop();
            *total -= 1;
        }
        let line = String::from_utf8_lossy(raw);
        let cut = (*total > raw.len() as u64).then_some(*total);
        on_line(&line, cut);
        raw.clear();
        *total = 0;
    };
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => {
                if total > 0 {
                    emit(&mut raw, &mut total);
                }
                return;
            }
            Ok(chunk) => chunk,
        };
        let (part, used, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = max.saturating_sub(raw.len()).min(part.len());
        raw.extend_from_slice(&part[..room]);
        total += part.len() as u64;
        reader.consume(used);
        if end {
            emit(&mut raw, &mut total);
        }
    }
}

/// The line oxserve's runtime prints on stdout and stderr before a batch (`<prefix>id1,id2`)
/// and after it (`<prefix>` alone), so that the reader of each stream knows which requests the
/// lines in between belong to: the order of lines within one pipe is the order they were written,
/// which no timing on the server side could give. TorchServe's own worker prints none, and its
/// lines carry no request id.
const REQUEST_IDS_PREFIX: &str = "[OXSERVE_REQUEST_IDS]";

/// Which stream a reader forwards: TorchServe's reader thread names end in it, stderr is WARN.
#[derive(Clone, Copy, PartialEq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Forwards one worker output line to MODEL_LOG (model_log.log, ts_log.log, the console), with
/// the model, version, worker and request it belongs to.
fn log_line(spec: &WorkerSpec, stream: Stream, line: &str, cut: Option<u64>, ids: Option<&str>) {
    // A cut line names its full length in `line_bytes`; the log files add the marker.
    let (model, version) = (&spec.model_name, &spec.model_version);
    match stream {
        Stream::Stdout => tracing::info!(
            target: crate::logging::MODEL_LOG,
            worker = %spec.name, stream = "stdout", model = %model, version = %version,
            request_id = ids, line_bytes = cut, "{line}"
        ),
        Stream::Stderr => tracing::warn!(
            target: crate::logging::MODEL_LOG,
            worker = %spec.name, stream = "stderr", model = %model, version = %version,
            request_id = ids, line_bytes = cut, "{line}"
        ),
    }
}

/// The longest worker output line kept: the files' cap once logging is set up, the configured one
/// otherwise (a backend used as a library).
fn max_line(spec: &WorkerSpec) -> usize {
    crate::logging::max_line().unwrap_or(spec.settings.log_max_line_bytes)
}

async fn forward_stdout(
    stdout: impl AsyncRead + Unpin,
    spec: WorkerSpec,
    tail: Arc<Mutex<Tail>>,
    started: oneshot::Sender<()>,
) {
    let mut started = Some(started);
    let mut ids: Option<String> = None;
    read_lines(stdout, max_line(&spec), |line, cut| {
        if let Some(rest) = line.strip_prefix(REQUEST_IDS_PREFIX) {
            ids = (!rest.is_empty()).then(|| rest.to_string());
            return;
        }
        if let Some(rest) = line.strip_prefix(METRICS_PREFIX) {
            spec.metrics.record_backend_line(rest, &spec.model_name);
            return;
        }
        if line == STARTED_LINE {
            if let Some(tx) = started.take() {
                let _ = tx.send(());
            }
        }
        if !line.trim().is_empty() {
            tail.lock().unwrap_or_else(|e| e.into_inner()).stdout = Some(line.to_string());
        }
        log_line(&spec, Stream::Stdout, line, cut, ids.as_deref());
    })
    .await;
}

async fn forward_stderr(stderr: impl AsyncRead + Unpin, spec: WorkerSpec, tail: Arc<Mutex<Tail>>) {
    let mut ids: Option<String> = None;
    read_lines(stderr, max_line(&spec), |line, cut| {
        if let Some(rest) = line.strip_prefix(REQUEST_IDS_PREFIX) {
            ids = (!rest.is_empty()).then(|| rest.to_string());
            return;
        }
        if !line.trim().is_empty() {
            tail.lock().unwrap_or_else(|e| e.into_inner()).stderr = Some(line.to_string());
        }
        log_line(&spec, Stream::Stderr, line, cut, ids.as_deref());
    })
    .await;
}

/// One Python worker process and its connection.
struct PythonBackend {
    name: String,
    child: Child,
    pid: u32,
    stream: Option<UnixStream>,
    /// Bytes received and not yet decoded.
    buf: BytesMut,
    tail: Arc<Mutex<Tail>>,
    response_timeout: Duration,
    max_len: usize,
    /// Started with `--async`: many requests in flight ([`Backend::send`] / [`Backend::recv`]).
    async_mode: bool,
    /// Requests per inference message at most (and so per reply frame).
    batch_size: usize,
    /// Why the worker is unusable, once it is.
    dead: Option<String>,
    reaped: bool,
    io_tasks: Vec<JoinHandle<()>>,
    _sock_dir: tempfile::TempDir,
    _runtime: Arc<RuntimeDir>,
}

/// Why reading a reply stopped.
enum ReadError {
    Eof,
    Io(io::Error),
    Protocol(protocol::ProtocolError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Eof => write!(f, "closed its connection"),
            ReadError::Io(e) => write!(f, "connection failed: {e}"),
            ReadError::Protocol(e) => write!(f, "{e}"),
        }
    }
}

impl PythonBackend {
    /// Waits for the worker to listen, connects and loads the model. Errors are messages; the
    /// caller adds what is known about the process.
    async fn start(
        &mut self,
        spec: &WorkerSpec,
        sock: &Path,
        model_dir: &Path,
        started: oneshot::Receiver<()>,
        deadline: Instant,
    ) -> Result<(), String> {
        let secs = spec.startup_timeout.as_secs_f64();
        match tokio::time::timeout_at(deadline, started).await {
            Err(_) => return Err(format!("worker {} did not start within {secs}s", self.name)),
            Ok(Err(_)) => {
                return Err(format!(
                    "worker {} exited before it started listening",
                    self.name
                ))
            }
            Ok(Ok(())) => {}
        }
        let stream = UnixStream::connect(sock).await.map_err(|e| {
            format!(
                "cannot connect to worker {} at {}: {e}",
                self.name,
                sock.display()
            )
        })?;
        self.stream = Some(stream);
        let load = protocol::encode_load(&LoadRequest {
            model_name: spec.model_name.clone(),
            model_path: model_dir.display().to_string(),
            batch_size: i32::try_from(spec.batch_size).unwrap_or(i32::MAX),
            handler: spec.manifest.model.handler.clone(),
            gpu_id: spec.gpu_id,
            envelope: spec.settings.service_envelope.as_str().to_string(),
            limit_max_image_pixels: true,
        });
        let reply = tokio::time::timeout_at(deadline, async {
            self.write(&load).await.map_err(ReadError::Io)?;
            loop {
                if let Some((reply, used)) = protocol::decode_load_reply(&self.buf, self.max_len)
                    .map_err(ReadError::Protocol)?
                {
                    self.buf.advance(used);
                    return Ok::<_, ReadError>(reply);
                }
                self.fill().await?;
            }
        })
        .await;
        match reply {
            Err(_) => Err(format!(
                "worker {} did not load the model within {secs}s",
                self.name
            )),
            Ok(Err(e)) => Err(format!("worker {} {e} while loading the model", self.name)),
            Ok(Ok(reply)) if reply.code != 200 => Err(format!(
                "worker {} failed to load the model ({}): {}",
                self.name, reply.code, reply.message
            )),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn write(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.stream.as_mut() {
            Some(s) => s.write_all(frame).await,
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }

    /// Reads more bytes into the buffer.
    async fn fill(&mut self) -> Result<(), ReadError> {
        let stream = self.stream.as_mut().ok_or(ReadError::Eof)?;
        match stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(ReadError::Eof),
            Ok(_) => Ok(()),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Reads one reply frame of at most `max_frame` bytes. Each string of a frame is bounded by
    /// the decoder; the frame as a whole is bounded here, so that a worker sending an endless
    /// frame of small pieces cannot grow the buffer without end.
    async fn read_reply(
        &mut self,
        max_frame: usize,
        max_responses: usize,
    ) -> Result<protocol::PredictReply, ReadError> {
        // Bytes the buffer must hold before decoding can get further: a frame that arrives in
        // many small reads is decoded once per field, not once per read.
        let mut need = 0;
        loop {
            if self.buf.len() >= need {
                match protocol::decode_predict_reply_from(&self.buf, self.max_len, max_responses)
                    .map_err(ReadError::Protocol)?
                {
                    Ok((reply, used)) => {
                        self.buf.advance(used);
                        return Ok(reply);
                    }
                    Err(n) => need = n,
                }
            }
            if self.buf.len() > max_frame || need > max_frame {
                return Err(ReadError::Protocol(protocol::ProtocolError(format!(
                    "reply frame exceeds {max_frame} bytes (max_response_size per request of the batch)"
                ))));
            }
            self.fill().await?;
        }
    }

    /// Kills the process group (if the process is not reaped yet) and reaps the process.
    async fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        self.stream = None;
        if self.reaped {
            return None;
        }
        kill_group(self.pid);
        let status = self.child.wait().await.ok();
        self.reaped = true;
        status
    }

    /// Gives a failing process `grace` to exit by itself, kills it otherwise, and says how it
    /// ended and what it printed last (stderr preferred).
    async fn reap_and_describe(&mut self, grace: Duration) -> String {
        self.stream = None;
        let status = if self.reaped {
            None
        } else {
            match timeout(grace, self.child.wait()).await {
                Ok(Ok(status)) => {
                    self.reaped = true;
                    kill_group(self.pid);
                    Some(status)
                }
                _ => self.kill_and_reap().await,
            }
        };
        // Let the output tasks drain what the process printed before it went.
        for task in std::mem::take(&mut self.io_tasks) {
            let _ = timeout(Duration::from_secs(1), task).await;
        }
        let mut out = String::new();
        if let Some(status) = status {
            out.push_str(&format!("; process {} ended ({status})", self.pid));
        }
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(line) = tail.stderr.as_ref().or(tail.stdout.as_ref()) {
            out.push_str(&format!("; last output: {line}"));
        }
        out
    }

    /// Marks the worker dead after a connection failure and returns the error to report.
    async fn died(&mut self, what: String) -> BackendError {
        let detail = self.reap_and_describe(Duration::from_secs(2)).await;
        let reason = format!("{what}{detail}");
        self.dead = Some(reason.clone());
        BackendError::Died(reason)
    }
}

fn kill_group(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        if pid > 0 {
            // SAFETY: plain syscall; the group id is the worker's own pid (process_group(0)) and
            // the worker is not reaped yet, so the id cannot belong to another process group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Replies are matched to requests by id, so ids within a batch must differ; clients choose their
/// own `x-request-id`, and two concurrent requests may share one. Returns a copy of the batch with
/// the later duplicates renamed `<id>#2`, `<id>#3`, ... (what the handler sees), or None when every
/// id is already unique (the common case, no copy).
fn unique_ids(batch: &[InferRequest]) -> Option<Vec<InferRequest>> {
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    if batch.iter().all(|r| seen.insert(r.id.as_str())) {
        return None;
    }
    let mut taken: std::collections::HashSet<String> = batch.iter().map(|r| r.id.clone()).collect();
    let mut first = std::collections::HashSet::new();
    let mut out = batch.to_vec();
    for r in &mut out {
        if first.insert(r.id.clone()) {
            continue;
        }
        let mut n = 2;
        let mut id = format!("{}#{n}", r.id);
        while taken.contains(&id) {
            n += 1;
            id = format!("{}#{n}", r.id);
        }
        taken.insert(id.clone());
        r.id = id;
    }
    Some(out)
}

fn to_response(r: FrameResponse) -> InferResponse {
    let status = u16::try_from(r.status)
        .ok()
        .filter(|s| (100..=599).contains(s))
        .unwrap_or(500);
    InferResponse {
        status,
        content_type: r.content_type,
        headers: r
            .headers
            .into_iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("content-type"))
            .collect(),
        body: r.body,
    }
}

#[async_trait]
impl Backend for PythonBackend {
    async fn infer(
        &mut self,
        batch: &[InferRequest],
        sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError> {
        if let Some(reason) = &self.dead {
            return Err(BackendError::Died(reason.clone()));
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let secs = self.response_timeout.as_secs_f64();
        let renamed = unique_ids(batch);
        let wire = renamed.as_deref().unwrap_or(batch);
        let index: HashMap<&str, usize> = wire
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.as_str(), i))
            .collect();
        let frame = protocol::encode_infer(wire);
        match timeout(self.response_timeout, self.write(&frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let what = format!("worker {} connection failed: {e}", self.name);
                return Err(self.died(what).await);
            }
            Err(_) => {
                self.kill_and_reap().await;
                let reason = format!(
                    "worker {} did not take the batch; timed out after {secs}s",
                    self.name
                );
                self.dead = Some(reason.clone());
                return Err(BackendError::Died(reason));
            }
        }
        let mut finals: Vec<Option<InferResponse>> = vec![None; batch.len()];
        let mut missing = batch.len();
        // One full-size response per request of the batch, plus room for the frame's own fields.
        let max_frame = self
            .max_len
            .saturating_mul(batch.len())
            .saturating_add(1 << 20);
        while missing > 0 {
            let reply = match timeout(
                self.response_timeout,
                self.read_reply(max_frame, batch.len()),
            )
            .await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => {
                    let what = format!("worker {} {e}", self.name);
                    return Err(self.died(what).await);
                }
                Err(_) => {
                    let status = self.kill_and_reap().await;
                    let ended = status.map(|s| format!(" ({s})")).unwrap_or_default();
                    let reason = format!(
                        "worker {} response timed out after {secs}s; process {} killed{ended}",
                        self.name, self.pid
                    );
                    self.dead = Some(reason.clone());
                    return Err(BackendError::Died(reason));
                }
            };
            if reply.code != 200 {
                let status = u16::try_from(reply.code)
                    .ok()
                    .filter(|s| (400..=599).contains(s))
                    .unwrap_or(500);
                return Err(BackendError::Failed {
                    status,
                    message: reply.message,
                });
            }
            for r in reply.responses {
                let Some(&i) = index.get(r.request_id.as_str()) else {
                    let what = format!(
                        "worker {} answered unknown request id {:?}",
                        self.name, r.request_id
                    );
                    return Err(self.died(what).await);
                };
                if r.is_intermediate() {
                    sink.send_partial(i, to_response(r));
                } else {
                    if finals[i].is_none() {
                        missing -= 1;
                    }
                    finals[i] = Some(to_response(r));
                }
            }
        }
        Ok(finals.into_iter().flatten().collect())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn is_async(&self) -> bool {
        self.async_mode
    }

    fn can_step(&self) -> bool {
        true
    }

    async fn send(&mut self, batch: &[InferRequest]) -> Result<(), BackendError> {
        if let Some(reason) = &self.dead {
            return Err(BackendError::Died(reason.clone()));
        }
        let frame = protocol::encode_infer(batch);
        match timeout(self.response_timeout, self.write(&frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let what = format!("worker {} connection failed: {e}", self.name);
                Err(self.died(what).await)
            }
            Err(_) => {
                self.kill_and_reap().await;
                let reason = format!(
                    "worker {} did not take a request within {}s; killed",
                    self.name,
                    self.response_timeout.as_secs_f64()
                );
                self.dead = Some(reason.clone());
                Err(BackendError::Died(reason))
            }
        }
    }

    async fn recv(&mut self) -> Result<Vec<Part>, BackendError> {
        if let Some(reason) = &self.dead {
            return Err(BackendError::Died(reason.clone()));
        }
        let max_frame = self
            .max_len
            .saturating_mul(self.batch_size)
            .saturating_add(1 << 20);
        // Cancel safe: bytes read stay in self.buf, and decoding starts from the buffer.
        let reply = match self.read_reply(max_frame, self.batch_size).await {
            Ok(reply) => reply,
            Err(e) => {
                let what = format!("worker {} {e}", self.name);
                // Marked before anything else awaits, so a cancelled recv still leaves it dead.
                self.dead = Some(what.clone());
                return Err(self.died(what).await);
            }
        };
        if reply.code != 200 {
            // An error frame names the requests it fails: it answers those, and only those.
            let status = u16::try_from(reply.code)
                .ok()
                .filter(|s| (400..=599).contains(s))
                .unwrap_or(500);
            return Ok(reply
                .responses
                .into_iter()
                .map(|r| Part {
                    id: r.request_id,
                    response: InferResponse::error(
                        status,
                        "InternalServerException",
                        &reply.message,
                    ),
                    last: true,
                })
                .collect());
        }
        Ok(reply
            .responses
            .into_iter()
            .map(|r| Part {
                last: !r.is_intermediate(),
                id: r.request_id.clone(),
                response: to_response(r),
            })
            .collect())
    }

    fn reports_handler_metrics(&self) -> bool {
        true
    }

    async fn shutdown(mut self: Box<Self>) {
        self.kill_and_reap().await;
        for task in std::mem::take(&mut self.io_tasks) {
            let _ = timeout(Duration::from_secs(2), task).await;
        }
    }
}

impl Drop for PythonBackend {
    fn drop(&mut self) {
        if !self.reaped {
            // kill_on_drop only kills the leader; take the whole group down.
            kill_group(self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_is_written_once_and_removed_after_use() {
        let a = runtime_dir().unwrap();
        let b = runtime_dir().unwrap();
        assert_eq!(a.dir.path(), b.dir.path());
        for (rel, text) in RUNTIME_FILES {
            assert_eq!(
                &std::fs::read_to_string(a.dir.path().join(rel)).unwrap(),
                text
            );
        }
        let path = a.dir.path().to_path_buf();
        drop((a, b));
        // Other tests of this binary may still hold the folder; otherwise it is gone.
        let still_used = RUNTIME.lock().unwrap().upgrade().is_some();
        if !still_used {
            assert!(!path.exists());
        }
    }

    #[test]
    fn duplicate_request_ids_in_a_batch_are_renamed() {
        let req = |id: &str| InferRequest {
            id: id.into(),
            ..Default::default()
        };
        assert!(unique_ids(&[req("a"), req("b")]).is_none());
        let ids: Vec<String> = unique_ids(&[req("a"), req("a"), req("a#2"), req("a")])
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "a#3", "a#2", "a#4"]);
    }

    #[tokio::test]
    async fn a_huge_line_is_cut_without_being_kept() {
        // 8 MB without a newline, then a normal line, then a last line without a newline.
        let mut data = vec![b'x'; 8 << 20];
        data.extend_from_slice(b"\nsecond\r\nlast");
        let mut got = Vec::new();
        read_lines(&data[..], 1000, |line, cut| {
            got.push((line.to_string(), cut))
        })
        .await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, "x".repeat(1000));
        assert_eq!(got[0].1, Some(8 << 20));
        assert_eq!(got[1], ("second".to_string(), None));
        assert_eq!(got[2], ("last".to_string(), None));
    }

    #[test]
    fn frame_status_codes_are_http_codes() {
        let r = FrameResponse {
            request_id: "a".into(),
            content_type: "text/plain".into(),
            status: 0,
            reason: String::new(),
            headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("ts_stream_next".into(), "true".into()),
            ],
            body: bytes::Bytes::from_static(b"x"),
        };
        let resp = to_response(r);
        assert_eq!(resp.status, 500);
        assert_eq!(resp.content_type, "text/plain");
        assert_eq!(
            resp.headers,
            vec![("ts_stream_next".to_string(), "true".to_string())]
        );
    }
}
