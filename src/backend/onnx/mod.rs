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
//!
//! Parts: `codec` (JSON <-> tensors), `session` (the tract plan and one request's run), `check`
//! (the load check in a child process); this file chooses the backend and hands workers the model.

mod check;
mod codec;
mod session;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

pub use check::{check_in_child, check_main, CheckError};
use codec::{dtype_name, Dim};
pub use session::ModelError;
use session::{load_model, OnnxModel};

use super::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, LoaderError, StreamSink,
    WorkerSpec,
};
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
        let model = load_model(&file).map_err(|source| LoaderError::Onnx {
            file: file.clone(),
            source,
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
        check_in_child(exe, &file, limit, config.onnx_load_timeout).map_err(|source| {
            LoaderError::OnnxRefused {
                file: file
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into(),
                source,
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
