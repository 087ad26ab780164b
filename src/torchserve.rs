//! The `torchserve` command: the oxserve binary run under the name `torchserve` (a link,
//! docs/torchserve-command.md) takes TorchServe 0.12's command line, so scripts, init systems and
//! TorchServe's own test launcher (`ts.launcher`) switch over without changing a command:
//!
//! ```text
//! torchserve --start [--foreground] [--model-store DIR] [--ts-config FILE] [--models M ...]
//!            [--ncs|--no-config-snapshots] [--disable-token-auth|--dt] [--enable-model-api]
//!            [--workflow-store DIR] [--plugins-path|--ppath DIR] [--log-config F] [--cpp-log-config F]
//! torchserve --stop [--foreground]
//! torchserve --version
//! ```
//!
//! How it differs from TorchServe's Python launcher, and why:
//! - The server's console log goes to stdout (TorchServe's log4j console does), so a caller that
//!   reads `torchserve --start`'s stdout for "Model server started." finds it: the background
//!   server keeps the caller's stdout, exactly as TorchServe's java process does.
//! - A background server gets its own session (TorchServe's java does not): closing the terminal
//!   that started it does not stop it, which is what `--start` without `--foreground` promises.
//! - The pid file is oxserve's (`$TMPDIR/.oxserve.pid`, or `OXSERVE_PID_FILE`), so `oxserve stop`
//!   and `torchserve --stop` stop the same server.
//! - `--model-store` is not mandatory (oxserve serves its demo model without one);
//!   `--plugins-path` and `--cpp-log-config` have no oxserve equivalent: a note says so.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use oxserve::server;

/// TorchServe 0.12's `ts/arg_parser.py`, flag for flag.
#[derive(Parser, Debug)]
#[command(
    name = "torchserve",
    about = "Torchserve (oxserve, TorchServe-compatible command line)",
    disable_version_flag = true
)]
struct TsArgs {
    /// Return TorchServe Version.
    #[arg(short = 'v', long, conflicts_with_all = ["start", "stop"])]
    version: bool,
    /// Start the model-server.
    #[arg(long, conflicts_with = "stop")]
    start: bool,
    /// Stop the model-server.
    #[arg(long)]
    stop: bool,
    /// Configuration file for model server (TS_CONFIG_FILE wins, as in TorchServe).
    #[arg(long, value_name = "FILE")]
    ts_config: Option<PathBuf>,
    /// Model store location from where local or default models can be loaded.
    #[arg(long, value_name = "DIR")]
    model_store: Option<PathBuf>,
    /// Passed on to `oxserve start --workflow-store`.
    #[arg(long, value_name = "DIR")]
    workflow_store: Option<PathBuf>,
    /// Models to be loaded using [model_name=]model_location format.
    #[arg(long, num_args = 1.., value_name = "MODEL")]
    models: Option<Vec<String>>,
    /// Accepted and not read: oxserve does not use log4j2 (docs/logging.md).
    #[arg(long, value_name = "FILE")]
    log_config: Option<PathBuf>,
    /// Accepted; oxserve has no C++ backend (a note is printed).
    #[arg(long, value_name = "FILE")]
    cpp_log_config: Option<PathBuf>,
    /// Run the model server in foreground.
    #[arg(long)]
    foreground: bool,
    /// Prevents the server from storing config snapshot files.
    #[arg(long = "no-config-snapshots", visible_alias = "ncs")]
    ncs: bool,
    /// Accepted; oxserve has no Java plugins (a note is printed).
    #[arg(long, visible_alias = "ppath", value_name = "DIR")]
    plugins_path: Option<PathBuf>,
    /// Token authorization is disabled.
    #[arg(long, visible_alias = "dt")]
    disable_token_auth: bool,
    /// Enables model control APIs.
    #[arg(long)]
    enable_model_api: bool,
}

/// Whether this process was started under the name `torchserve` (argv[0], a link to oxserve).
pub fn invoked_as_torchserve() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_owned()))
        .is_some_and(|n| n == "torchserve")
}

pub fn main() -> ExitCode {
    let args = TsArgs::parse();
    if args.version {
        // TorchServe's exact line (scripts parse it), then which server answers.
        println!(
            "TorchServe Version is 0.12.0 (oxserve {})",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    if args.stop {
        return stop(args.foreground);
    }
    if args.start {
        return start(args);
    }
    // TorchServe's launcher without --start/--stop starts the server too (its else branch).
    start(args)
}

fn say(msg: &str) {
    println!("{msg}");
}

/// The pid recorded in the pid file, if that process runs and is this same executable: a pid
/// reused by an unrelated process after a crash must never get a SIGTERM from `--stop`
/// (TorchServe checks the process's command line for the same reason).
fn recorded_server() -> Option<i32> {
    let pid = server::running_pid(&server::pid_file())?;
    let theirs = std::fs::canonicalize(format!("/proc/{pid}/exe")).ok()?;
    let ours = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .ok()?;
    (theirs == ours).then_some(pid)
}

fn start(args: TsArgs) -> ExitCode {
    let pid_file = server::pid_file();
    if recorded_server().is_some() {
        say("TorchServe is already running, please use torchserve --stop to stop TorchServe.");
        return ExitCode::from(1);
    }
    // TorchServe's checks and messages, before anything starts.
    let ts_config = std::env::var_os("TS_CONFIG_FILE")
        .map(PathBuf::from)
        .or(args.ts_config.clone());
    if let Some(f) = &ts_config {
        if !f.is_file() {
            say(&format!("--ts-config file not found: {}", f.display()));
            return ExitCode::from(1);
        }
    }
    if let Some(d) = &args.model_store {
        if !d.is_dir() {
            say(&format!(
                "--model-store directory not found: {}",
                d.display()
            ));
            return ExitCode::from(1);
        }
    }
    if let Some(d) = &args.workflow_store {
        if !d.is_dir() {
            say(&format!(
                "--workflow-store directory not found: {}",
                d.display()
            ));
            return ExitCode::from(1);
        }
    }
    if args.plugins_path.is_some() {
        say("Note: --plugins-path is ignored: oxserve has no Java plugins");
    }
    if args.cpp_log_config.is_some() {
        say("Note: --cpp-log-config is ignored: oxserve has no C++ backend");
    }

    let mut server_args: Vec<OsString> = vec!["start".into(), "--foreground".into()];
    if let Some(f) = &ts_config {
        server_args.extend(["--ts-config".into(), f.into()]);
    }
    if let Some(d) = &args.model_store {
        server_args.extend(["--model-store".into(), d.into()]);
    }
    if let Some(d) = &args.workflow_store {
        server_args.extend(["--workflow-store".into(), d.into()]);
    }
    if let Some(m) = &args.models {
        server_args.extend(["--models".into(), m.join(",").into()]);
    }
    if let Some(f) = &args.log_config {
        server_args.extend(["--log-config".into(), f.into()]);
    }
    for (on, flag) in [
        (args.ncs, "--ncs"),
        (args.disable_token_auth, "--disable-token-auth"),
        (args.enable_model_api, "--enable-model-api"),
    ] {
        if on {
            server_args.push(flag.into());
        }
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            say(&format!("cannot find the oxserve executable: {e}"));
            return ExitCode::from(1);
        }
    };
    let mut cmd = Command::new(exe);
    cmd.args(&server_args)
        // The server was started through `torchserve`: its console log goes to stdout.
        .env("OXSERVE_CONSOLE_STDOUT", "1")
        .stdin(Stdio::null());
    if args.foreground {
        // The server takes this process's place (same pid, so signals from an init system or
        // Ctrl-C reach it directly); the pid file names it for `torchserve --stop`.
        let _ = std::fs::write(&pid_file, std::process::id().to_string());
        let err = cmd.exec();
        let _ = std::fs::remove_file(&pid_file);
        say(&format!("start oxserve failed: {err}"));
        return ExitCode::from(1);
    }
    // SAFETY: setsid is async-signal-safe; the background server leaves our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(child) => {
            let _ = std::fs::write(&pid_file, child.id().to_string());
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("start oxserve failed: {e}"));
            ExitCode::from(1)
        }
    }
}

/// TorchServe's `--stop`: SIGTERM; with `--foreground`, wait (60 s, as TorchServe) until it is gone.
fn stop(wait: bool) -> ExitCode {
    let pid_file = server::pid_file();
    let Some(pid) = recorded_server() else {
        say("TorchServe is not currently running.");
        let _ = std::fs::remove_file(&pid_file);
        return ExitCode::SUCCESS;
    };
    // SAFETY: SIGTERM to the pid the start recorded.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    if wait {
        let deadline = Instant::now() + Duration::from_secs(60);
        while server::alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if server::alive(pid) {
            say("Stopping TorchServe took too long.");
        }
    } else {
        say("TorchServe has stopped.");
    }
    let _ = std::fs::remove_file(&pid_file);
    ExitCode::SUCCESS
}
