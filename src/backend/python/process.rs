//! Supervision of one worker process: started in its own process group with piped output (handed
//! to [`super::logs`]), SIGKILLed by the kernel when the server dies (PR_SET_PDEATHSIG), its whole
//! group killed when it fails or its backend is dropped, always reaped. TorchServe's frontend
//! relies on the worker noticing its socket close; oxserve does not leave that to the worker, so
//! no worker (nor a process it started) outlives the server or its backend.

use std::io;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::logs::{self, Tail};
use crate::backend::WorkerSpec;

/// A running worker process and the tasks forwarding its output.
pub(super) struct WorkerProcess {
    child: Child,
    pub(super) pid: u32,
    reaped: bool,
    io_tasks: Vec<JoinHandle<()>>,
    tail: Arc<Mutex<Tail>>,
}

impl WorkerProcess {
    /// Starts `cmd` (arguments, folder and environment already set) as a supervised worker of
    /// `spec`. The receiver counts the `Torch worker started.` lines the worker (each of its
    /// ranks) printed; its sender goes when the worker's stdout closes.
    pub(super) fn spawn(
        mut cmd: Command,
        spec: &WorkerSpec,
    ) -> io::Result<(WorkerProcess, watch::Receiver<usize>)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let tail = Arc::new(Mutex::new(Tail::default()));
        let (started_tx, started_rx) = watch::channel(0);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let io_tasks = vec![
            tokio::spawn(logs::forward_stdout(
                stdout,
                spec.clone(),
                tail.clone(),
                started_tx,
            )),
            tokio::spawn(logs::forward_stderr(stderr, spec.clone(), tail.clone())),
        ];
        let process = WorkerProcess {
            child,
            pid,
            reaped: false,
            io_tasks,
            tail,
        };
        Ok((process, started_rx))
    }

    /// Kills the process group (if the process is not reaped yet) and reaps the process.
    pub(super) async fn kill_and_reap(&mut self) -> Option<ExitStatus> {
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
    pub(super) async fn reap_and_describe(&mut self, grace: Duration) -> String {
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

    /// Kills and reaps the process, then lets its output tasks finish.
    pub(super) async fn shutdown(&mut self) {
        self.kill_and_reap().await;
        for task in std::mem::take(&mut self.io_tasks) {
            let _ = timeout(Duration::from_secs(2), task).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if !self.reaped {
            // kill_on_drop only kills the leader; take the whole group down.
            kill_group(self.pid);
        }
    }
}

/// PYTHONPATH with the model folder first (TorchServe's frontend does the same), then the model's
/// own packages (TorchServe installs them into the model folder itself), then the server's.
pub(super) fn python_path(model_dir: &Path, dependencies: Option<&Path>) -> std::ffi::OsString {
    let mut paths = vec![model_dir.to_path_buf()];
    paths.extend(dependencies.map(Path::to_path_buf));
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
pub(super) fn die_with_parent(cmd: &mut Command) {
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

pub(super) fn kill_group(pid: u32) {
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
