//! Finds TorchServe's own worker program (`ts/model_service_worker.py`) for
//! `worker_runtime=torchserve`: the one of the torchserve package installed for
//! `python_executable`, as TorchServe's frontend runs it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::timeout;

/// Finds `ts/model_service_worker.py` of the torchserve package installed for `python`.
pub(super) async fn locate_torchserve_worker(python: String) -> Result<PathBuf, String> {
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
