//! The ONNX load check: a model is first loaded in a child process of this binary (hidden
//! subcommand `check-onnx`) under `RLIMIT_AS` = `onnx_load_memory_limit` and a deadline of
//! `onnx_load_timeout`, so that a model whose loading would exhaust memory kills only the child.
//! TorchServe has no such step (it loads models in Python workers, which die alone).

use std::path::{Component, Path};

use tract_onnx::prelude::Framework as _;

use super::session::{load_model, ModelError};

/// Why the load check refused a model: in the child ([`check_main`]: the cap cannot be set,
/// external data points outside the folder, tract fails), or in the parent ([`check_in_child`]:
/// the child cannot be started, ran too long, or died).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot set RLIMIT_AS to {limit} bytes: {source}")]
    Limit { limit: u64, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tensor {tensor:?} has external data at {location:?}: external data must be a relative path inside the model folder")]
    ExternalData { tensor: String, location: String },
    #[error("cannot start the load check {}: {source}", .exe.display())]
    Spawn {
        exe: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot wait for the load check: {0}")]
    Wait(std::io::Error),
    #[error("loading it took longer than onnx_load_timeout ({seconds} s)")]
    Timeout { seconds: u64 },
    /// The child did not say it loaded: `how` it ended ("exited with status 3"), and the last
    /// lines of its stderr (`tail`, possibly empty).
    #[error(
        "loading it in a check process capped at {} (onnx_load_memory_limit) failed: the process {how}{}",
        human_bytes(*.limit),
        if .tail.is_empty() { String::new() } else { format!(": {}", .tail) }
    )]
    Failed {
        limit: u64,
        how: String,
        tail: String,
    },
}

/// What the `check-onnx` child prints on stdout once the model loaded: the parent accepts nothing
/// less, so a process that exits 0 without loading (a wrong executable) does not pass the check.
pub(super) const CHECK_PASSED: &str = "oxserve check-onnx: loaded";

/// Most bytes of the child's stdout and stderr kept (the last ones; the rest is read and dropped).
const CHECK_OUTPUT_KEEP: usize = 16 * 1024;

/// The `check-onnx` subcommand's body, run in the child: caps the address space at `memory_limit`
/// bytes, refuses external data outside the model's folder ([`check_external_data`]), loads and
/// optimizes `file` exactly as [`OnnxLoader::new`] does, and returns whether it worked. An allocation past the cap fails here: tract panics, or Rust aborts, and only this
/// process goes.
pub fn check_main(file: &Path, memory_limit: u64) -> Result<(), CheckError> {
    set_limit(libc::RLIMIT_AS, memory_limit).map_err(|source| CheckError::Limit {
        limit: memory_limit,
        source,
    })?;
    // A crash under the cap is expected here; do not write gigabytes of core file for it.
    let _ = set_limit(libc::RLIMIT_CORE, 0);
    let proto = tract_onnx::onnx()
        .proto_model_for_path(file)
        .map_err(ModelError::from)?;
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
fn check_external_data(graph: &tract_onnx::pb::GraphProto) -> Result<(), CheckError> {
    use tract_onnx::pb::{tensor_proto::DataLocation, AttributeProto, TensorProto};
    fn tensor(t: &TensorProto) -> Result<(), CheckError> {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(());
        }
        for entry in t.external_data.iter().filter(|e| e.key == "location") {
            let inside = !entry.value.is_empty()
                && Path::new(&entry.value)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside {
                return Err(CheckError::ExternalData {
                    tensor: t.name.clone(),
                    location: entry.value.clone(),
                });
            }
        }
        Ok(())
    }
    fn attribute(a: &AttributeProto) -> Result<(), CheckError> {
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
) -> Result<(), CheckError> {
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
    let mut child = cmd.spawn().map_err(|source| CheckError::Spawn {
        exe: exe.to_path_buf(),
        source,
    })?;
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
                return Err(CheckError::Wait(e));
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(CheckError::Timeout {
            seconds: timeout.as_secs(),
        });
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
    Err(CheckError::Failed {
        limit: memory_limit,
        how,
        tail,
    })
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

        check_in_child(&passes, &file, 1 << 30, minute).unwrap();
        // Exit 0 alone is not enough: a wrong executable must not pass the check.
        let e = check_in_child(&silent, &file, 1 << 30, minute)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exited with status 0"), "{e}");
        // Megabytes of stderr: drained without blocking, and only the end is quoted.
        let e = check_in_child(&chatty, &file, 3 << 20, minute)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("capped at 3 MiB (onnx_load_memory_limit)")
                && e.contains("exited with status 3")
                && e.ends_with("the last word"),
            "{e}"
        );
        assert!(e.len() < 1000, "{} bytes", e.len());
        // Past the deadline the child is killed and reaped: its pid is gone.
        let e = check_in_child(&hangs, &file, 1 << 30, std::time::Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than onnx_load_timeout (5 s)"), "{e}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "pid {pid} still exists"
        );
        // A missing executable is an error, not a pass.
        let e = check_in_child(&dir.path().join("absent"), &file, 1 << 30, minute)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot start the load check"), "{e}");
    }
}
