//! In-process ONNX models, run with tract (pure Rust, CPU only): no Python worker needed.
//!
//! A model version whose manifest names an `.onnx` file as `model.serializedFile` and whose handler
//! is empty or `onnx` ([`is_onnx`]) is parsed and optimized once by [`OnnxLoader::new`]; every
//! worker then shares that plan.
//!
//! Requests are JSON (whatever the content type says):
//!
//! * `{"inputs": {"<input name>": <nested array>, ...}}` names every model input;
//! * for a model with a single input, a bare nested array or `{"data": <nested array>}` also works.
//!
//! A nested array's shape must match the model's input shape: same rank, and the same size on
//! every fixed dimension (symbolic dimensions such as a batch `N` take any size, but one symbol
//! must have one size across all inputs of a request). Numbers are converted to the input's element
//! type; integer inputs refuse fractional or out-of-range numbers.
//!
//! The reply lists every model output, in the model's order:
//! `{"outputs": {"<output name>": {"dtype": "float32", "shape": [2, 3], "data": [[...], [...]]}}}`
//! where `data` is nested to the depth of `shape` (a bare number for a scalar output). Non-finite
//! floats are written as `null`, since JSON has no NaN or infinity.
//!
//! A request that cannot be run gets its own 400 reply naming the reason; the other requests of the
//! batch are unaffected. Requests of a batch are run one after the other.
//!
//! Nothing is allocated from a size the client declares: a tensor's leaves are collected as the
//! JSON is walked, so memory follows the body (bounded by `max_request_size`), not the widths of
//! its first elements.
//!
//! Nor from a size the archive declares, unchecked: tract allocates what the model file says while
//! it parses and optimizes it (an initializer's declared dims, a constant-folded ConstantOfShape or
//! Expand of terabytes), and a failed or overcommitted allocation aborts or OOM-kills the whole
//! server. So the server first loads every model in a child process ([`check_in_child`]: its own
//! binary, hidden subcommand `check-onnx`, under `RLIMIT_AS` = `onnx_load_memory_limit` and a
//! deadline of `onnx_load_timeout`), and only a model that loaded there is loaded in-process.
//! TorchServe has no such step (it loads models in Python workers, which die alone).

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tract_onnx::prelude::*;

use super::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, LoaderError, StreamSink,
    WorkerSpec,
};
use crate::error::ErrorKind;
use crate::model::archive::Manifest;

/// Whether this model version is served by the ONNX backend: its `model.serializedFile` ends in
/// `.onnx` and its handler is empty or `onnx` (a custom Python handler keeps the model, and does
/// its own pre- and post-processing).
pub fn is_onnx(manifest: &Manifest) -> bool {
    let handler = manifest.model.handler.trim();
    let onnx_file = manifest
        .model
        .serialized_file
        .as_deref()
        .is_some_and(|f| f.to_ascii_lowercase().ends_with(".onnx"));
    onnx_file && (handler.is_empty() || handler.eq_ignore_ascii_case("onnx"))
}

/// One dimension of a model input as the model declares it.
#[derive(Debug, Clone, PartialEq)]
enum Dim {
    /// A fixed size the request must match.
    Fixed(usize),
    /// A named symbol (e.g. a batch `N`): any size, the same across a request's inputs.
    Symbol(String),
    /// Any other expression: any size, checked by the model itself when it runs.
    Other(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) | Dim::Other(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone)]
struct InputSpec {
    name: String,
    datum_type: DatumType,
    shape: Vec<Dim>,
}

#[derive(Debug, Clone)]
struct OutputSpec {
    name: String,
    datum_type: DatumType,
    shape: Vec<String>,
}

/// A parsed, optimized ONNX model, shared by every worker of a model version.
struct OnnxModel {
    plan: TypedRunnableModel<TypedModel>,
    inputs: Vec<InputSpec>,
    outputs: Vec<OutputSpec>,
}

/// Loads the model once; [`BackendLoader::load`] hands every worker a backend sharing it.
pub struct OnnxLoader {
    model: Arc<OnnxModel>,
    file: PathBuf,
}

impl OnnxLoader {
    /// Parses and optimizes `model_dir/<model.serializedFile>`. Fails (with a message naming the
    /// file) if the manifest names no file, the path leaves `model_dir`, the file cannot be read,
    /// or tract cannot parse, type or optimize the model (e.g. an unsupported operator).
    pub fn new(model_dir: &Path, manifest: &Manifest) -> Result<OnnxLoader, LoaderError> {
        let file = model_file(model_dir, manifest)?;
        let model = load_model(&file).map_err(|e| {
            LoaderError::Load(format!("cannot load ONNX model {}: {e}", file.display()))
        })?;
        Ok(OnnxLoader {
            model: Arc::new(model),
            file,
        })
    }

    /// As [`OnnxLoader::new`], but only after the model loaded in a child process under the
    /// `onnx_load_memory_limit` cap and within `onnx_load_timeout` ([`check_in_child`]), so that
    /// a model which would exhaust memory while tract loads it fails its registration instead of
    /// taking the server down. `exe` is the oxserve binary (it has the `check-onnx` subcommand).
    pub fn new_checked(
        model_dir: &Path,
        manifest: &Manifest,
        config: &crate::config::Config,
        exe: &Path,
    ) -> Result<OnnxLoader, LoaderError> {
        let file = model_file(model_dir, manifest)?;
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let limit = config
            .onnx_load_memory_limit
            .unwrap_or_else(|| crate::config::default_onnx_load_memory_limit(size));
        check_in_child(exe, &file, limit, config.onnx_load_timeout).map_err(|e| {
            LoaderError::Load(format!(
                "ONNX model {} refused: {e}",
                file.file_name().unwrap_or_default().to_string_lossy()
            ))
        })?;
        OnnxLoader::new(model_dir, manifest)
    }

    /// The `.onnx` file this loader was built from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The model's signature for logs, e.g. `input: float32 [N,4] -> probabilities: float32 [N,3]`.
    pub fn signature(&self) -> String {
        let inputs: Vec<String> = self
            .model
            .inputs
            .iter()
            .map(|i| {
                let dims: Vec<String> = i.shape.iter().map(Dim::to_string).collect();
                format!(
                    "{}: {} [{}]",
                    i.name,
                    dtype_name(i.datum_type),
                    dims.join(",")
                )
            })
            .collect();
        let outputs: Vec<String> = self
            .model
            .outputs
            .iter()
            .map(|o| {
                format!(
                    "{}: {} [{}]",
                    o.name,
                    dtype_name(o.datum_type),
                    o.shape.join(",")
                )
            })
            .collect();
        format!("{} -> {}", inputs.join(", "), outputs.join(", "))
    }
}

/// The `.onnx` file `model.serializedFile` names, which must exist inside `model_dir`.
fn model_file(model_dir: &Path, manifest: &Manifest) -> Result<PathBuf, LoaderError> {
    let name = manifest
        .model
        .serialized_file
        .as_deref()
        .filter(|f| !f.trim().is_empty())
        .ok_or_else(|| {
            LoaderError::ModelFile("MANIFEST.json names no model.serializedFile".to_string())
        })?;
    let relative = Path::new(name);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(LoaderError::ModelFile(format!(
            "model.serializedFile {name:?} must be a relative path inside the model folder"
        )));
    }
    let file = model_dir.join(relative);
    if !file.is_file() {
        return Err(LoaderError::ModelFile(format!(
            "ONNX model file {} not found",
            file.display()
        )));
    }
    Ok(file)
}

/// What the `check-onnx` child prints on stdout once the model loaded: the parent accepts nothing
/// less, so a process that exits 0 without loading (a wrong executable) does not pass the check.
const CHECK_PASSED: &str = "oxserve check-onnx: loaded";

/// Most bytes of the child's stdout and stderr kept (the last ones; the rest is read and dropped).
const CHECK_OUTPUT_KEEP: usize = 16 * 1024;

/// The `check-onnx` subcommand's body, run in the child: caps the address space at `memory_limit`
/// bytes, refuses external data outside the model's folder ([`check_external_data`]), loads and
/// optimizes `file` exactly as [`OnnxLoader::new`] does, and returns whether it worked. An allocation past the cap fails here: tract panics, or Rust aborts, and only this
/// process goes.
pub fn check_main(file: &Path, memory_limit: u64) -> Result<(), String> {
    set_limit(libc::RLIMIT_AS, memory_limit)
        .map_err(|e| format!("cannot set RLIMIT_AS to {memory_limit} bytes: {e}"))?;
    // A crash under the cap is expected here; do not write gigabytes of core file for it.
    let _ = set_limit(libc::RLIMIT_CORE, 0);
    let proto = tract_onnx::onnx()
        .proto_model_for_path(file)
        .map_err(|e| format!("{e:#}"))?;
    if let Some(graph) = &proto.graph {
        check_external_data(graph)?;
    }
    drop(proto);
    load_model(file)?;
    println!("{CHECK_PASSED}");
    Ok(())
}

/// Refuses tensors whose external data (`data_location: EXTERNAL`) lies outside the model's
/// folder. tract joins the `location` to the folder as given, so `/etc/shadow` or
/// `../../config.properties` would be read into a weight, and a model that outputs that weight
/// hands the file to every client. Walks initializers, tensor attributes and subgraphs (If, Loop,
/// Scan bodies), where tract loads tensors too.
fn check_external_data(graph: &tract_onnx::pb::GraphProto) -> Result<(), String> {
    use tract_onnx::pb::{tensor_proto::DataLocation, AttributeProto, TensorProto};
    fn tensor(t: &TensorProto) -> Result<(), String> {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        for entry in t.external_data.iter().filter(|e| e.key == "location") {
            let inside = !entry.value.is_empty()
                && Path::new(&entry.value)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside {
                return Err(format!(
                    "tensor {:?} has external data at {:?}: external data must be a relative path inside the model folder",
                    t.name, entry.value
                ));
            }
        }
        Ok(())
    }
    fn attribute(a: &AttributeProto) -> Result<(), String> {
        a.t.iter().chain(&a.tensors).try_for_each(tensor)?;
        a.sparse_tensor
            .iter()
            .chain(&a.sparse_tensors)
            .flat_map(|s| s.values.iter().chain(&s.indices))
            .try_for_each(tensor)?;
        a.g.iter()
            .chain(&a.graphs)
            .try_for_each(check_external_data)
    }
    graph.initializer.iter().try_for_each(tensor)?;
    graph
        .sparse_initializer
        .iter()
        .flat_map(|s| s.values.iter().chain(&s.indices))
        .try_for_each(tensor)?;
    graph
        .node
        .iter()
        .flat_map(|n| &n.attribute)
        .try_for_each(attribute)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
type Resource = libc::c_int;

/// Sets both limits of `resource` to `bytes`, or to the current hard limit if that is lower (a
/// process may lower its hard limit, never raise it; the server may itself run under a cap).
fn set_limit(resource: Resource, bytes: u64) -> std::io::Result<()> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let bytes = if unsafe { libc::getrlimit(resource, &mut current) } == 0
        && current.rlim_max != libc::RLIM_INFINITY
    {
        bytes.min(current.rlim_max)
    } else {
        bytes
    };
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Loads `file` in a child process first (see the module doc): `exe check-onnx --memory-limit
/// <bytes> <file>`. `Ok` once the child printed [`CHECK_PASSED`] and exited 0; otherwise the reason
/// (error, exit status or signal, the last lines of its stderr, or the timeout). The child is
/// always reaped, and dies with the server (`PR_SET_PDEATHSIG`). Blocks: call it from a blocking
/// thread.
pub fn check_in_child(
    exe: &Path,
    file: &Path,
    memory_limit: u64,
    timeout: std::time::Duration,
) -> Result<(), String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(exe);
    cmd.arg("check-onnx")
        .arg("--memory-limit")
        .arg(memory_limit.to_string())
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; a server killed mid-check takes its child along.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the load check {}: {e}", exe.display()))?;
    // Pipes are drained on their own threads, keeping only their last bytes (where the marker
    // and the panic or abort message are), so a chatty child can neither block on a full pipe nor
    // make us hold its output.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept: Vec<u8> = Vec::new();
            let mut chunk = [0u8; 8192];
            if let Some(mut pipe) = pipe {
                loop {
                    let n = match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    kept.extend_from_slice(&chunk[..n]);
                    if kept.len() > 2 * CHECK_OUTPUT_KEEP {
                        kept.drain(..kept.len() - CHECK_OUTPUT_KEEP);
                    }
                }
            }
            let start = kept.len().saturating_sub(CHECK_OUTPUT_KEEP);
            String::from_utf8_lossy(&kept[start..]).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot wait for the load check: {e}"));
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(format!(
            "loading it took longer than onnx_load_timeout ({} s)",
            timeout.as_secs()
        ));
    };
    if status.success() && stdout.lines().any(|l| l.trim() == CHECK_PASSED) {
        return Ok(());
    }
    let how = {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (_, Some(sig)) => {
                // The usual ways a load dies under the cap: abort on a refused allocation, or
                // the kernel's kill.
                let name = match sig {
                    libc::SIGABRT => " (SIGABRT)",
                    libc::SIGKILL => " (SIGKILL)",
                    libc::SIGSEGV => " (SIGSEGV)",
                    libc::SIGBUS => " (SIGBUS)",
                    _ => "",
                };
                format!("was killed by signal {sig}{name}")
            }
            (Some(code), _) => format!("exited with status {code}"),
            _ => format!("ended with {status}"),
        }
    };
    let tail: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with"))
        .collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
    Err(format!(
        "loading it in a check process capped at {} (onnx_load_memory_limit) failed: the process {how}{}",
        human_bytes(memory_limit),
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

fn load_model(file: &Path) -> Result<OnnxModel, String> {
    let inference = tract_onnx::onnx()
        .model_for_path(file)
        .map_err(|e| format!("{e:#}"))?;
    // Names as the ONNX graph declares them; optimization keeps the order of inputs and outputs.
    let input_names: Vec<String> = inference
        .input_outlets()
        .map_err(|e| format!("{e:#}"))?
        .iter()
        .map(|o| inference.node(o.node).name.clone())
        .collect();
    let output_names: Vec<String> = inference
        .output_outlets()
        .map_err(|e| format!("{e:#}"))?
        .iter()
        .map(|o| {
            inference
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| inference.node(o.node).name.clone())
        })
        .collect();
    let optimized = inference.into_optimized().map_err(|e| format!("{e:#}"))?;
    let mut inputs = Vec::new();
    for (ix, name) in input_names.into_iter().enumerate() {
        let fact = optimized.input_fact(ix).map_err(|e| format!("{e:#}"))?;
        let shape = fact
            .shape
            .dims()
            .iter()
            .map(|d| match d {
                TDim::Val(v) if *v >= 0 => Dim::Fixed(*v as usize),
                TDim::Sym(s) => Dim::Symbol(s.to_string()),
                other => Dim::Other(other.to_string()),
            })
            .collect();
        inputs.push(InputSpec {
            name,
            datum_type: fact.datum_type,
            shape,
        });
    }
    let mut outputs = Vec::new();
    for (ix, name) in output_names.into_iter().enumerate() {
        let fact = optimized.output_fact(ix).map_err(|e| format!("{e:#}"))?;
        outputs.push(OutputSpec {
            name,
            datum_type: fact.datum_type,
            shape: fact.shape.dims().iter().map(|d| d.to_string()).collect(),
        });
    }
    let plan = optimized.into_runnable().map_err(|e| format!("{e:#}"))?;
    Ok(OnnxModel {
        plan,
        inputs,
        outputs,
    })
}

#[async_trait]
impl BackendLoader for OnnxLoader {
    fn runtime(&self) -> &str {
        "onnx"
    }

    async fn load(&self, _spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError> {
        Ok(Box::new(OnnxBackend {
            model: Arc::clone(&self.model),
        }))
    }
}

/// One worker's handle on the shared model.
struct OnnxBackend {
    model: Arc<OnnxModel>,
}

#[async_trait]
impl Backend for OnnxBackend {
    async fn infer(
        &mut self,
        batch: &[InferRequest],
        _sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError> {
        let model = Arc::clone(&self.model);
        let batch = batch.to_vec();
        // Inference is CPU-bound: keep it off the async threads.
        tokio::task::spawn_blocking(move || batch.iter().map(|r| model.infer_one(r)).collect())
            .await
            .map_err(|e| BackendError::Failed {
                status: 500,
                message: format!("ONNX inference task failed: {e}"),
            })
    }
}

fn bad_request(message: &str) -> InferResponse {
    InferResponse::error(ErrorKind::BadRequest, message)
}

impl OnnxModel {
    fn infer_one(&self, req: &InferRequest) -> InferResponse {
        let tensors = match self.request_tensors(req) {
            Ok(t) => t,
            Err(message) => return bad_request(&message),
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.plan
                .run(tensors.into_iter().map(|t| t.into_tvalue()).collect())
        }));
        let outputs = match run {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                return InferResponse::error(
                    ErrorKind::InternalServer,
                    &format!("ONNX inference failed: {e:#}"),
                )
            }
            Err(_) => {
                return InferResponse::error(
                    ErrorKind::InternalServer,
                    "ONNX inference failed: the model panicked",
                )
            }
        };
        match self.render(&outputs) {
            Ok(body) => InferResponse::ok("application/json", body),
            Err(message) => InferResponse::error(ErrorKind::InternalServer, &message),
        }
    }

    /// The request's tensors in the model's input order, or why the request is refused.
    fn request_tensors(&self, req: &InferRequest) -> Result<Vec<Tensor>, String> {
        let payload = req
            .payload()
            .filter(|p| !p.value.is_empty())
            .ok_or_else(|| format!("empty request: send JSON {}", self.usage()))?;
        let body: Value = serde_json::from_slice(&payload.value).map_err(|e| {
            format!(
                "request body is not valid JSON ({e}): send {}",
                self.usage()
            )
        })?;
        let values = self.named_values(body)?;
        let mut symbols: Vec<(String, usize, String)> = Vec::new();
        self.inputs
            .iter()
            .zip(values.iter())
            .map(|(spec, value)| to_tensor(spec, value, &mut symbols))
            .collect()
    }

    /// Splits the body into one JSON value per model input, in the model's input order.
    fn named_values(&self, body: Value) -> Result<Vec<Value>, String> {
        let single = self.inputs.len() == 1;
        match body {
            Value::Object(mut map) if map.contains_key("inputs") => {
                let Some(Value::Object(given)) = map.remove("inputs") else {
                    return Err(format!(
                        "\"inputs\" must be an object mapping input names to arrays: send {}",
                        self.usage()
                    ));
                };
                if let Some(unknown) = given
                    .keys()
                    .find(|k| !self.inputs.iter().any(|i| &i.name == *k))
                {
                    return Err(format!(
                        "unknown input {unknown:?}; the model's inputs are {}",
                        self.input_list()
                    ));
                }
                let mut given = given;
                self.inputs
                    .iter()
                    .map(|i| {
                        given.remove(&i.name).ok_or_else(|| {
                            format!(
                                "missing input {:?}; the model's inputs are {}",
                                i.name,
                                self.input_list()
                            )
                        })
                    })
                    .collect()
            }
            Value::Object(mut map) if single && map.len() == 1 && map.contains_key("data") => {
                Ok(vec![map.remove("data").unwrap_or(Value::Null)])
            }
            Value::Object(map) => Err(format!(
                "JSON object needs an \"inputs\" field{} (got fields {}): send {}",
                if single { " or a \"data\" field" } else { "" },
                map.keys()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.usage()
            )),
            value if single => Ok(vec![value]),
            _ => Err(format!(
                "the model has {} inputs ({}): send {}",
                self.inputs.len(),
                self.input_list(),
                self.usage()
            )),
        }
    }

    fn input_list(&self) -> String {
        self.inputs
            .iter()
            .map(|i| format!("{:?}", i.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn usage(&self) -> String {
        let names: Vec<String> = self
            .inputs
            .iter()
            .map(|i| format!("{:?}: <nested array>", i.name))
            .collect();
        let mut usage = format!("{{\"inputs\": {{{}}}}}", names.join(", "));
        if self.inputs.len() == 1 {
            usage.push_str(", {\"data\": <nested array>} or a bare nested array");
        }
        usage
    }

    /// `{"outputs": {...}}` for the model's outputs, in the model's order.
    fn render(&self, outputs: &[TValue]) -> Result<String, String> {
        let mut out = String::from("{\"outputs\":{");
        for (ix, (spec, value)) in self.outputs.iter().zip(outputs.iter()).enumerate() {
            if ix > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{}:{{\"dtype\":\"{}\",\"shape\":[",
                Value::String(spec.name.clone()),
                dtype_name(value.datum_type())
            );
            for (i, d) in value.shape().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{d}");
            }
            out.push_str("],\"data\":");
            write_tensor(&mut out, value)
                .map_err(|e| format!("cannot write output {:?}: {e}", spec.name))?;
            out.push('}');
        }
        out.push_str("}}");
        Ok(out)
    }
}

/// A JSON value shortened for error messages.
fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        let short: String = text.chars().take(37).collect();
        format!("{short}...")
    } else {
        text
    }
}

fn show_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn show_dims(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(Dim::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// The shape of a nested JSON array and its leaves in row-major order, or why it is not a
/// rectangular array.
fn flatten(value: &Value) -> Result<(Vec<usize>, Vec<&Value>), String> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    // No capacity from the shape: the widths of the first elements are the client's claim, and
    // their product (1000^5 for a 10 KB body) can exceed memory or overflow. The leaves grow with
    // what actually arrived, and `collect` stops at the first ragged element.
    let mut leaves = Vec::new();
    let mut at = Vec::with_capacity(shape.len());
    collect(value, &shape, &mut at, &mut leaves)?;
    Ok((shape, leaves))
}

fn collect<'a>(
    value: &'a Value,
    shape: &[usize],
    at: &mut Vec<usize>,
    leaves: &mut Vec<&'a Value>,
) -> Result<(), String> {
    let depth = at.len();
    if depth == shape.len() {
        if value.is_array() {
            return Err(format!(
                "ragged array: element at {} is a nested array, but the first elements are nested only {} deep",
                show_shape(at),
                shape.len()
            ));
        }
        leaves.push(value);
        return Ok(());
    }
    let Value::Array(items) = value else {
        return Err(format!(
            "ragged array: element at {} is {}, expected an array of {} elements",
            show_shape(at),
            show(value),
            shape[depth]
        ));
    };
    if items.len() != shape[depth] {
        return Err(format!(
            "ragged array: array at {} has {} elements, expected {} like its first sibling",
            show_shape(at),
            items.len(),
            shape[depth]
        ));
    }
    for (i, item) in items.iter().enumerate() {
        at.push(i);
        collect(item, shape, at, leaves)?;
        at.pop();
    }
    Ok(())
}

/// The multi-index of leaf `flat` of an array of this shape.
fn position(shape: &[usize], mut flat: usize) -> String {
    let mut index = vec![0; shape.len()];
    for (slot, &dim) in index.iter_mut().zip(shape.iter()).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    show_shape(&index)
}

/// Converts one input's JSON value to a tensor of the model's type and checked shape. `symbols`
/// records the sizes symbolic dimensions took in earlier inputs of the request.
fn to_tensor(
    spec: &InputSpec,
    value: &Value,
    symbols: &mut Vec<(String, usize, String)>,
) -> Result<Tensor, String> {
    let (shape, leaves) = flatten(value).map_err(|e| format!("input {:?}: {e}", spec.name))?;
    if shape.len() != spec.shape.len() {
        return Err(format!(
            "input {:?}: expected shape {} (rank {}), got shape {} (rank {})",
            spec.name,
            show_dims(&spec.shape),
            spec.shape.len(),
            show_shape(&shape),
            shape.len()
        ));
    }
    for (axis, (want, &got)) in spec.shape.iter().zip(shape.iter()).enumerate() {
        match want {
            Dim::Fixed(n) if *n != got => {
                return Err(format!(
                    "input {:?}: expected shape {}, got shape {} (dimension {axis} must be {n}, got {got})",
                    spec.name,
                    show_dims(&spec.shape),
                    show_shape(&shape)
                ));
            }
            Dim::Symbol(sym) => {
                if let Some((_, size, owner)) = symbols.iter().find(|(s, _, _)| s == sym) {
                    if *size != got {
                        return Err(format!(
                            "input {:?}: dimension {axis} ({sym}) is {got}, but input {owner:?} has {sym} = {size}",
                            spec.name
                        ));
                    }
                } else {
                    symbols.push((sym.clone(), got, spec.name.clone()));
                }
            }
            _ => {}
        }
    }
    let dt = spec.datum_type;
    let wrong = |i: usize, expected: &str| {
        format!(
            "input {:?} ({}): element at {} is {}, expected {expected}",
            spec.name,
            dtype_name(dt),
            position(&shape, i),
            show(leaves[i])
        )
    };
    let tensor = match dt {
        DatumType::F16 | DatumType::F32 | DatumType::F64 => {
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                data.push(leaf.as_f64().ok_or_else(|| wrong(i, "a number"))?);
            }
            let t = Tensor::from_shape(&shape, &data).map_err(|e| format!("{e:#}"))?;
            if dt == DatumType::F64 {
                t
            } else {
                t.cast_to_dt(dt).map_err(|e| format!("{e:#}"))?.into_owned()
            }
        }
        DatumType::I8
        | DatumType::I16
        | DatumType::I32
        | DatumType::I64
        | DatumType::U8
        | DatumType::U16
        | DatumType::U32
        | DatumType::U64 => {
            let (min, max) = int_range(dt);
            let expected = format!("an integer in {min}..={max}");
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                let v = as_integer(leaf)
                    .filter(|v| (min..=max).contains(v))
                    .ok_or_else(|| wrong(i, &expected))?;
                data.push(v);
            }
            if dt == DatumType::U64 {
                let data: Vec<u64> = data.into_iter().map(|v| v as u64).collect();
                Tensor::from_shape(&shape, &data).map_err(|e| format!("{e:#}"))?
            } else {
                let data: Vec<i64> = data.into_iter().map(|v| v as i64).collect();
                let t = Tensor::from_shape(&shape, &data).map_err(|e| format!("{e:#}"))?;
                if dt == DatumType::I64 {
                    t
                } else {
                    t.cast_to_dt(dt).map_err(|e| format!("{e:#}"))?.into_owned()
                }
            }
        }
        DatumType::Bool => {
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                let v = match leaf {
                    Value::Bool(b) => *b,
                    other => match as_integer(other) {
                        Some(0) => false,
                        Some(1) => true,
                        _ => return Err(wrong(i, "true, false, 0 or 1")),
                    },
                };
                data.push(v);
            }
            Tensor::from_shape(&shape, &data).map_err(|e| format!("{e:#}"))?
        }
        DatumType::String => {
            let mut data = Vec::with_capacity(leaves.len());
            for (i, leaf) in leaves.iter().enumerate() {
                data.push(
                    leaf.as_str()
                        .ok_or_else(|| wrong(i, "a string"))?
                        .to_string(),
                );
            }
            tract_ndarray::ArrayD::from_shape_vec(shape.clone(), data)
                .map_err(|e| e.to_string())?
                .into()
        }
        other => {
            return Err(format!(
                "input {:?} has element type {}, which JSON requests cannot supply",
                spec.name,
                dtype_name(other)
            ))
        }
    };
    Ok(tensor)
}

/// A JSON number as an integer: integral values only (`2` and `2.0`, not `2.5`).
fn as_integer(value: &Value) -> Option<i128> {
    if let Some(v) = value.as_i64() {
        return Some(v.into());
    }
    if let Some(v) = value.as_u64() {
        return Some(v.into());
    }
    let f = value.as_f64()?;
    // 2^64 bounds every integer type supported here; larger floats are refused by the range check.
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.9e19).then_some(f as i128)
}

fn int_range(dt: DatumType) -> (i128, i128) {
    match dt {
        DatumType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DatumType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DatumType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DatumType::I64 => (i64::MIN.into(), i64::MAX.into()),
        DatumType::U8 => (0, u8::MAX.into()),
        DatumType::U16 => (0, u16::MAX.into()),
        DatumType::U32 => (0, u32::MAX.into()),
        _ => (0, u64::MAX.into()),
    }
}

/// The ONNX-style name of an element type (`float32`, `int64`, ...).
fn dtype_name(dt: DatumType) -> String {
    match dt {
        DatumType::Bool => "bool".into(),
        DatumType::U8 => "uint8".into(),
        DatumType::U16 => "uint16".into(),
        DatumType::U32 => "uint32".into(),
        DatumType::U64 => "uint64".into(),
        DatumType::I8 => "int8".into(),
        DatumType::I16 => "int16".into(),
        DatumType::I32 => "int32".into(),
        DatumType::I64 => "int64".into(),
        DatumType::F16 => "float16".into(),
        DatumType::F32 => "float32".into(),
        DatumType::F64 => "float64".into(),
        DatumType::String => "string".into(),
        other => format!("{other:?}"),
    }
}

/// Writes floats in their shortest exact form; NaN and infinities (not JSON) as `null`.
fn write_floats<F: ryu::Float + Copy + Into<f64>>(out: &mut String, shape: &[usize], data: &[F]) {
    let mut buf = ryu::Buffer::new();
    write_nested(out, shape, data, &mut |out, v| {
        if (*v).into().is_finite() {
            out.push_str(buf.format_finite(*v));
        } else {
            out.push_str("null");
        }
    });
}

/// Writes a tensor's elements as a JSON array nested to the tensor's rank.
fn write_tensor(out: &mut String, t: &Tensor) -> Result<(), String> {
    let shape = t.shape().to_vec();
    let err = |e: TractError| format!("{e:#}");
    match t.datum_type() {
        DatumType::F32 => write_floats(out, &shape, t.as_slice::<f32>().map_err(err)?),
        DatumType::F16 | DatumType::F64 => {
            let cast = t.cast_to::<f64>().map_err(err)?;
            write_floats(out, &shape, cast.as_slice::<f64>().map_err(err)?);
        }
        DatumType::I8
        | DatumType::I16
        | DatumType::I32
        | DatumType::I64
        | DatumType::U8
        | DatumType::U16
        | DatumType::U32 => {
            let cast = t.cast_to::<i64>().map_err(err)?;
            let data = cast.as_slice::<i64>().map_err(err)?;
            let mut buf = itoa::Buffer::new();
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(buf.format(*v))
            });
        }
        DatumType::U64 => {
            let data = t.as_slice::<u64>().map_err(err)?;
            let mut buf = itoa::Buffer::new();
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(buf.format(*v))
            });
        }
        DatumType::Bool => {
            let data = t.as_slice::<bool>().map_err(err)?;
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(if *v { "true" } else { "false" })
            });
        }
        DatumType::String => {
            let data = t.as_slice::<String>().map_err(err)?;
            write_nested(out, &shape, data, &mut |out, v| {
                out.push_str(&Value::String(v.clone()).to_string())
            });
        }
        other => {
            return Err(format!(
                "element type {} cannot be written as JSON",
                dtype_name(other)
            ))
        }
    }
    Ok(())
}

fn write_nested<T>(
    out: &mut String,
    shape: &[usize],
    data: &[T],
    leaf: &mut dyn FnMut(&mut String, &T),
) {
    match shape.split_first() {
        None => {
            if let Some(v) = data.first() {
                leaf(out, v);
            }
        }
        Some((&n, rest)) => {
            let stride: usize = rest.iter().product();
            out.push('[');
            for i in 0..n {
                if i > 0 {
                    out.push(',');
                }
                write_nested(out, rest, &data[i * stride..(i + 1) * stride], leaf);
            }
            out.push(']');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stand-ins for the `check-onnx` child: shell scripts that misbehave in each way the parent
    /// must handle. The real child runs in tests/hostile_onnx.rs.
    #[test]
    fn the_load_check_trusts_only_a_child_that_says_it_loaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = |name: &str, body: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let passes = script("passes", format!("echo '{CHECK_PASSED}'"));
        let silent = script("silent", "exit 0".into());
        let chatty = script(
            "chatty",
            "yes 'noise noise noise' | head -c 4000000 >&2; echo 'the last word' >&2; exit 3"
                .into(),
        );
        let hangs = script(
            "hangs",
            format!("echo $$ > '{}'; exec sleep 600", pid_file.display()),
        );
        let file = dir.path().join("model.onnx");
        let minute = std::time::Duration::from_secs(60);

        assert_eq!(check_in_child(&passes, &file, 1 << 30, minute), Ok(()));
        // Exit 0 alone is not enough: a wrong executable must not pass the check.
        let e = check_in_child(&silent, &file, 1 << 30, minute).unwrap_err();
        assert!(e.contains("exited with status 0"), "{e}");
        // Megabytes of stderr: drained without blocking, and only the end is quoted.
        let e = check_in_child(&chatty, &file, 3 << 20, minute).unwrap_err();
        assert!(
            e.contains("capped at 3 MiB (onnx_load_memory_limit)")
                && e.contains("exited with status 3")
                && e.ends_with("the last word"),
            "{e}"
        );
        assert!(e.len() < 1000, "{} bytes", e.len());
        // Past the deadline the child is killed and reaped: its pid is gone.
        let e =
            check_in_child(&hangs, &file, 1 << 30, std::time::Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("longer than onnx_load_timeout (5 s)"), "{e}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "pid {pid} still exists"
        );
        // A missing executable is an error, not a pass.
        let e = check_in_child(&dir.path().join("absent"), &file, 1 << 30, minute).unwrap_err();
        assert!(e.contains("cannot start the load check"), "{e}");
    }

    fn manifest(file: Option<&str>, handler: &str) -> Manifest {
        let mut m = Manifest::default();
        m.model.serialized_file = file.map(str::to_string);
        m.model.handler = handler.to_string();
        m
    }

    #[test]
    fn onnx_models_are_recognized() {
        assert!(is_onnx(&manifest(Some("model.onnx"), "")));
        assert!(is_onnx(&manifest(Some("sub/Model.ONNX"), "onnx")));
        assert!(!is_onnx(&manifest(Some("model.onnx"), "my_handler.py")));
        assert!(!is_onnx(&manifest(Some("model.pt"), "")));
        assert!(!is_onnx(&manifest(None, "onnx")));
    }

    #[test]
    fn nested_arrays_flatten_or_explain() {
        let v: Value = serde_json::from_str("[[1, 2, 3], [4, 5, 6]]").unwrap();
        let (shape, leaves) = flatten(&v).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(leaves.len(), 6);
        let v: Value = serde_json::from_str("[[1, 2, 3], [4, 5]]").unwrap();
        let e = flatten(&v).unwrap_err();
        assert!(e.contains("array at [1] has 2 elements, expected 3"), "{e}");
        let v: Value = serde_json::from_str("[[1, 2], 3]").unwrap();
        assert!(flatten(&v).unwrap_err().contains("element at [1] is 3"));
        let scalar = Value::from(1.5);
        let (shape, leaves) = flatten(&scalar).unwrap();
        assert!(shape.is_empty());
        assert_eq!(leaves.len(), 1);
        assert_eq!(position(&[2, 3], 5), "[1, 2]");
    }

    #[test]
    fn integers_refuse_fractions_and_overflow() {
        let spec = InputSpec {
            name: "ids".into(),
            datum_type: DatumType::U8,
            shape: vec![Dim::Symbol("N".into())],
        };
        let ok: Value = serde_json::from_str("[0, 255, 3.0]").unwrap();
        let t = to_tensor(&spec, &ok, &mut Vec::new()).unwrap();
        assert_eq!(t.as_slice::<u8>().unwrap(), &[0, 255, 3]);
        for bad in ["[256]", "[-1]", "[1.5]", "[\"1\"]"] {
            let v: Value = serde_json::from_str(bad).unwrap();
            let e = to_tensor(&spec, &v, &mut Vec::new()).unwrap_err();
            assert!(e.contains("expected an integer in 0..=255"), "{bad}: {e}");
        }
    }

    #[test]
    fn symbols_must_agree_across_inputs() {
        let a = InputSpec {
            name: "a".into(),
            datum_type: DatumType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
        };
        let b = InputSpec {
            name: "b".into(),
            ..a.clone()
        };
        let mut symbols = Vec::new();
        let two: Value = serde_json::from_str("[[1, 2], [3, 4]]").unwrap();
        let one: Value = serde_json::from_str("[[1, 2]]").unwrap();
        to_tensor(&a, &two, &mut symbols).unwrap();
        let e = to_tensor(&b, &one, &mut symbols).unwrap_err();
        assert!(e.contains("input \"a\" has N = 2"), "{e}");
    }

    #[test]
    fn outputs_nest_to_their_rank() {
        let t = Tensor::from_shape(&[2, 2], &[1.5f32, f32::NAN, 0.1, 2.0]).unwrap();
        let mut out = String::new();
        write_tensor(&mut out, &t).unwrap();
        assert_eq!(out, "[[1.5,null],[0.1,2.0]]");
        let mut out = String::new();
        write_tensor(&mut out, &Tensor::from(7i64)).unwrap();
        assert_eq!(out, "7");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Nested JSON arrays of numbers, strings and booleans, up to 5 deep.
        fn nested() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                any::<i32>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)),
                any::<bool>().prop_map(Value::from),
                "[a-z]{0,3}".prop_map(Value::from),
            ];
            leaf.prop_recursive(5, 200, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                    // Wide first elements with short tails: the shape that claimed 1000^5.
                    (proptest::collection::vec(inner.clone(), 0..8), 0usize..1000).prop_map(
                        |(v, w)| {
                            let mut first = v;
                            first.extend(std::iter::repeat_n(Value::from(0), w));
                            Value::Array(vec![Value::Array(first), Value::from(1)])
                        }
                    ),
                ]
            })
        }

        fn leaves_in(v: &Value) -> usize {
            match v {
                Value::Array(items) => items.iter().map(leaves_in).sum::<usize>().max(1),
                _ => 1,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// Flattening never panics, and what it keeps is never more than what arrived.
            #[test]
            fn tensors_never_allocate_past_the_body(value in nested()) {
                if let Ok((shape, leaves)) = flatten(&value) {
                    prop_assert!(leaves.len() <= leaves_in(&value));
                    prop_assert_eq!(Some(leaves.len()), shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)));
                }
                for dt in [DatumType::F32, DatumType::I64, DatumType::U8, DatumType::Bool, DatumType::String] {
                    let spec = InputSpec {
                        name: "x".into(),
                        datum_type: dt,
                        shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
                    };
                    let _ = to_tensor(&spec, &value, &mut Vec::new());
                }
            }
        }
    }
}
