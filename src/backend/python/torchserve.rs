//! Finds TorchServe's own worker program (`ts/model_service_worker.py`) for
//! `worker_runtime=torchserve`: the one of the torchserve package installed for
//! `python_executable`, as TorchServe's frontend runs it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::timeout;

/// Why TorchServe's worker cannot be found. Cloneable: the loader keeps the answer for every
/// later worker start of the model version.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum LocateError {
    #[error("worker_runtime=torchserve: `{python} -c 'import ts'` did not finish in 120 s")]
    Timeout { python: String },
    #[error("worker_runtime=torchserve: cannot run python_executable {python:?}: {source}")]
    Spawn {
        python: String,
        source: Arc<std::io::Error>,
    },
    /// `last`: the last line of Python's stderr (the ImportError, usually).
    #[error("worker_runtime=torchserve needs the torchserve package in the environment of python_executable {python:?}, but `import ts` failed: {last}")]
    NoTs { python: String, last: String },
    #[error("worker_runtime=torchserve: {} does not exist (is the ts package TorchServe's?)", .script.display())]
    NoScript { script: PathBuf },
}

/// Finds `ts/model_service_worker.py` of the torchserve package installed for `python`.
pub(super) async fn locate_torchserve_worker(python: String) -> Result<PathBuf, LocateError> {
    let out = Command::new(&python)
        .args(["-c", "import ts, os; print(os.path.dirname(ts.__file__))"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match timeout(Duration::from_secs(120), out).await {
        Err(_) => return Err(LocateError::Timeout { python }),
        Ok(Err(e)) => {
            return Err(LocateError::Spawn {
                python,
                source: Arc::new(e),
            })
        }
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string();
        return Err(LocateError::NoTs { python, last });
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let script = Path::new(&dir).join("model_service_worker.py");
    if !script.is_file() {
        return Err(LocateError::NoScript { script });
    }
    Ok(script)
}
