//! The `oxserve` command: start, stop, status (mirroring `torchserve --start/--stop` flags), and
//! top, a terminal view of a running server's dashboard data.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use oxserve::config::{Config, Overrides};
use oxserve::server;

mod torchserve;

/// mimalloc: the request path allocates many small, short-lived buffers across threads, where it
/// is measurably faster than glibc's malloc (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "oxserve",
    version,
    about = "A TorchServe-compatible model server"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Start the server (in the background unless --foreground).
    Start(StartArgs),
    /// Stop the running server.
    Stop,
    /// Say whether a server started with `oxserve start` is running.
    Status,
    /// Show a running server's models, rates, latency, queues, workers and memory, every second.
    Top(TopArgs),
    /// Internal: load an ONNX model under an address-space cap and say whether it worked. The
    /// server runs this in a child process before loading a model itself (src/backend/onnx/check.rs).
    #[command(name = "check-onnx", hide = true)]
    CheckOnnx(CheckOnnxArgs),
}

#[derive(Args)]
struct CheckOnnxArgs {
    /// RLIMIT_AS in bytes.
    #[arg(long, value_name = "BYTES")]
    memory_limit: u64,
    /// The .onnx file.
    file: PathBuf,
}

#[derive(Args)]
struct TopArgs {
    /// The metrics listener, e.g. http://127.0.0.1:8082 (default: metrics_address from the config).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Bearer token for the metrics listener (default: OXSERVE_METRICS_TOKEN, else
    /// metrics_auth_token from the config).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// config.properties to read the address and token from.
    #[arg(long, value_name = "FILE")]
    ts_config: Option<PathBuf>,
    /// Print one frame as plain text and exit.
    #[arg(long)]
    once: bool,
}

#[derive(Args, Default, Clone)]
struct StartArgs {
    /// Stay attached to the terminal instead of running in the background.
    #[arg(long)]
    foreground: bool,
    /// Folder of model archives.
    #[arg(long, value_name = "DIR")]
    model_store: Option<PathBuf>,
    /// Models to load at start: `all`, or `name=file.mar,...`.
    #[arg(long, value_name = "MODELS", num_args = 1.., value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// config.properties to read.
    #[arg(long, value_name = "FILE")]
    ts_config: Option<PathBuf>,
    /// No config snapshots (TorchServe's --ncs / --no-config-snapshots).
    #[arg(long, visible_alias = "no-config-snapshots")]
    ncs: bool,
    /// Turn token authorization off.
    #[arg(long)]
    disable_token_auth: bool,
    /// Allow registering and unregistering models through the management API.
    #[arg(long)]
    enable_model_api: bool,
    /// Accepted for compatibility and NOT read: oxserve does not use log4j2. Its log files are
    /// set with the log_* keys (docs/logging.md); the console log with RUST_LOG.
    #[arg(long, value_name = "FILE")]
    log_config: Option<PathBuf>,
    /// Folder of workflow archives (.war): `POST /workflows?url=` names a file here, and
    /// downloads land here (config key workflow_store).
    #[arg(long, value_name = "DIR")]
    workflow_store: Option<PathBuf>,
    /// Set by `oxserve start` on the background process it spawns: no console log (the log files
    /// have it all, and nothing would rotate a captured console).
    #[arg(long, hide = true)]
    detached: bool,
}

fn main() -> ExitCode {
    // Installed as a link named `torchserve`, the binary takes TorchServe's command line.
    if torchserve::invoked_as_torchserve() {
        return torchserve::main();
    }
    let cli = Cli::parse();
    match cli.command {
        None => start(StartArgs {
            foreground: true,
            ..Default::default()
        }),
        Some(Command::Start(args)) => start(args),
        Some(Command::Stop) => stop(),
        Some(Command::Status) => status(),
        Some(Command::Top(args)) => top(args),
        Some(Command::CheckOnnx(args)) => {
            match oxserve::backend::onnx::check_main(&args.file, args.memory_limit) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `oxserve top`: finds the metrics listener as `start` would (flags, then config), then runs.
fn top(args: TopArgs) -> ExitCode {
    let needs_config = args.url.is_none() || args.token.is_none();
    let config = if needs_config {
        let overrides = Overrides {
            ts_config: args.ts_config.clone(),
            ..Default::default()
        };
        match Config::load(&overrides) {
            Ok((c, _)) => Some(c),
            Err(e) => {
                eprintln!("oxserve top: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let url = match (args.url, &config) {
        (Some(u), _) => u,
        (None, Some(c)) => {
            let mut addr = c.metrics_address;
            if addr.port() == 0 {
                eprintln!("oxserve top: metrics_address has port 0 (chosen at start); pass --url");
                return ExitCode::from(2);
            }
            // A listener on every interface is reached on loopback.
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
        (None, None) => unreachable!("the config is loaded when --url is missing"),
    };
    let token = args
        .token
        .or_else(|| std::env::var("OXSERVE_METRICS_TOKEN").ok())
        .or_else(|| config.and_then(|c| c.metrics_auth_token));
    let opts = oxserve::dashboard::top::TopOptions {
        url,
        token,
        once: args.once,
    };
    match oxserve::dashboard::top::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("oxserve top: {e}");
            ExitCode::from(1)
        }
    }
}

fn start(args: StartArgs) -> ExitCode {
    let overrides = Overrides {
        ts_config: args.ts_config.clone(),
        model_store: args.model_store.clone(),
        workflow_store: args.workflow_store.clone(),
        models: args.models.as_ref().map(|m| m.join(",")),
        disable_token_auth: args.disable_token_auth,
        enable_model_api: args.enable_model_api,
        ncs: args.ncs,
    };
    let (config, warnings) = match Config::load(&overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("oxserve: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.foreground {
        return daemonize(&config);
    }
    if let Err(e) = oxserve::logging::init(&config, !args.detached) {
        eprintln!("oxserve: cannot open the log files: {e} (LOG_LOCATION)");
        return ExitCode::from(1);
    }
    for w in warnings {
        tracing::warn!("{w}");
    }
    if let Some(path) = &args.log_config {
        tracing::warn!(
            "--log-config {} is not read: oxserve does not use log4j2; its log files are set with the log_format, log_max_bytes, log_max_files, log_max_line_bytes and enable_access_log keys (docs/logging.md)",
            path.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.frontend_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // TorchServe logs its "Netty threads" at start-up; this is the runtime's own count.
    tracing::info!(
        "Frontend threads: {} (number_of_netty_threads)",
        runtime.metrics().num_workers()
    );
    let result = runtime.block_on(server::run(config));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
        eprintln!("oxserve: {e:#}");
    }
    oxserve::logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}

/// Starts `oxserve start --foreground` with the same arguments as a detached process and records
/// its pid. The process writes TorchServe's log files; its stdout and stderr (the start-up line,
/// and anything printed before logging is up or by a crash) go to logs/oxserve.log.
fn daemonize(config: &Config) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let pid_file = server::pid_file();
    if let Some(pid) = server::running_pid(&pid_file) {
        eprintln!("oxserve is already running (pid {pid}); stop it with `oxserve stop`");
        return ExitCode::from(1);
    }
    let log_dir = &config.log_dir;
    if let Err(e) = std::fs::create_dir_all(log_dir) {
        eprintln!("oxserve: cannot create {}: {e}", log_dir.display());
        return ExitCode::from(1);
    }
    let log_path = log_dir.join("oxserve.log");
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
    };
    let (Ok(out), Ok(err)) = (open(), open()) else {
        eprintln!("oxserve: cannot open {}", log_path.display());
        return ExitCode::from(1);
    };
    let exe = std::env::current_exe().expect("own executable path");
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("--foreground".into());
    args.push("--detached".into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(mut child) => {
            // Wait until the listeners are bound (or the server gave up), so that a port in use or a
            // bad metrics.yaml is reported here, not only in the log.
            let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut bound = String::new();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read(&log_path).unwrap_or_default();
                    let tail = String::from_utf8_lossy(&log[(log_start as usize).min(log.len())..]);
                    eprintln!(
                        "oxserve: the server exited at start ({status}):\n{}",
                        tail.trim_end()
                    );
                    return ExitCode::from(1);
                }
                let log = std::fs::read(&log_path).unwrap_or_default();
                let new = String::from_utf8_lossy(&log[(log_start as usize).min(log.len())..]);
                if let Some(line) = new.lines().find(|l| l.contains("oxserve listening")) {
                    bound = line.to_string();
                    break;
                }
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::write(&pid_file, child.id().to_string());
            // The addresses the listeners got (port 0 in the config means one the OS chose),
            // from the server's "oxserve listening" line; the configured ones if it is not there.
            let addr = |key: &str, configured: std::net::SocketAddr| {
                listening_addr(&bound, key).unwrap_or_else(|| configured.to_string())
            };
            let scheme = |tls: bool| if tls { "https" } else { "http" };
            let tls = &config.tls_listeners;
            let inference = addr("inference", config.inference_address);
            println!(
                "oxserve started (pid {}): inference {}://{}, management {}://{}, metrics {}://{}; logs in {}",
                child.id(),
                scheme(tls.inference),
                inference,
                scheme(tls.management),
                addr("management", config.management_address),
                scheme(tls.metrics),
                addr("metrics", config.metrics_address),
                log_dir.display()
            );
            // The child runs in this folder, where it wrote key_file.json before listening.
            let scheme = scheme(tls.inference);
            let url = if config.builtin_default_model {
                format!("{scheme}://{inference}/predictions/demo")
            } else {
                format!("{scheme}://{inference}/predictions/MODEL")
            };
            let key_file = (!config.disable_token_authorization)
                .then(|| {
                    std::env::current_dir()
                        .map(|d| d.join("key_file.json"))
                        .ok()
                })
                .flatten();
            if let Some(file) = &key_file {
                println!(
                    "token authorization is on: keys in {} (--disable-token-auth turns it off)",
                    file.display()
                );
            }
            println!(
                "first prediction: {}",
                oxserve::api::auth::first_prediction(key_file.as_deref(), &url)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oxserve: cannot start the server: {e}");
            ExitCode::from(1)
        }
    }
}

fn stop() -> ExitCode {
    let pid_file = server::pid_file();
    let Some(pid) = server::running_pid(&pid_file) else {
        println!("oxserve is not running");
        let _ = std::fs::remove_file(&pid_file);
        return ExitCode::SUCCESS;
    };
    // SAFETY: sending SIGTERM to a pid we recorded.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server::alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if server::alive(pid) {
        eprintln!("oxserve (pid {pid}) did not stop within 30 s");
        return ExitCode::from(1);
    }
    let _ = std::fs::remove_file(&pid_file);
    println!("oxserve stopped (pid {pid})");
    ExitCode::SUCCESS
}

fn status() -> ExitCode {
    match server::running_pid(&server::pid_file()) {
        Some(pid) => {
            println!("oxserve is running (pid {pid})");
            ExitCode::SUCCESS
        }
        None => {
            println!("oxserve is not running");
            ExitCode::from(3)
        }
    }
}

/// The address after `key=` in the server's "oxserve listening: inference=A management=B ..."
/// line.
fn listening_addr(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}
