//! Test harness: the real `oxserve` binary on free loopback ports, driven over real HTTP.
#![allow(dead_code)]

pub mod grpc;
pub mod prometheus;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_oxserve");

/// A running server; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub inference: String,
    pub management: String,
    pub metrics: Option<String>,
    /// The gRPC listeners, as `http://host:port` (what a tonic channel connects to).
    pub grpc_inference: Option<String>,
    pub grpc_management: Option<String>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::Client,
}

/// Properties every test server gets: OS-chosen ports.
pub const BASE: &str = "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n";

/// Token authorization is on by default, as in TorchServe. Most suites test something else and
/// talk to the server without keys, so [`Server::start`] turns it off in the config (a later
/// line in `props`, a flag or `TS_DISABLE_TOKEN_AUTHORIZATION` still decide). The suites about
/// authorization start with [`Server::start_secure`], which leaves the default alone.
const NO_TOKENS: &str = "disable_token_authorization=true\n";

impl Server {
    /// Starts the server with these extra config.properties lines and CLI arguments.
    pub fn start(props: &str, args: &[&str]) -> Server {
        Self::start_with_env(props, args, &[])
    }

    pub fn start_with_env(props: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_capped(props, args, env, None)
    }

    /// As [`Server::start_with_env`], with the server's address space capped (RLIMIT_AS) when
    /// `address_space` is set: a test that provokes huge allocations then makes a regression
    /// abort the server instead of pushing this shared host into the OOM killer.
    pub fn start_capped(
        props: &str,
        args: &[&str],
        env: &[(&str, &str)],
        address_space: Option<u64>,
    ) -> Server {
        Self::launch(&format!("{NO_TOKENS}{props}"), args, env, address_space)
    }

    /// Starts the server with oxserve's defaults for token authorization (on: the keys are in
    /// `key_file.json` in the server's folder; see [`Server::key`]).
    pub fn start_secure(props: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch(props, args, env, None)
    }

    fn launch(
        props: &str,
        args: &[&str],
        env: &[(&str, &str)],
        address_space: Option<u64>,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.properties");
        std::fs::write(&config, format!("{BASE}{props}\n")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("start")
            .arg("--foreground")
            .arg("--ts-config")
            .arg(&config)
            .args(args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(bytes) = address_space {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and only reads the struct.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: bytes as libc::rlim_t,
                        rlim_max: bytes as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        Self::spawn(cmd, dir)
    }

    /// Starts a prepared command (stdout and stderr are piped here) whose first stdout line is
    /// oxserve's `oxserve listening: ...` line; `dir` is kept (and removed) with the server.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir) -> Server {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start oxserve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let err = child.stderr.take().unwrap();
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "oxserve did not start: {}",
                    stderr.lock().unwrap().join("\n")
                );
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .map(|a| format!("http://{a}"))
        };
        Server {
            inference: field("inference").expect("inference address"),
            management: field("management").expect("management address"),
            metrics: field("metrics"),
            grpc_inference: field("grpc_inference"),
            grpc_management: field("grpc_management"),
            child,
            dir,
            stderr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    /// Starts the server over the model store `store` with these start-up `models` (the
    /// `--models` value: `name`, `name=file.mar`, comma-separated; `""` for none), these extra
    /// config.properties lines and these extra CLI arguments (e.g. `--enable-model-api`).
    pub fn start_store(props: &str, store: &Path, models: &str, args: &[&str]) -> Server {
        Self::start_store_with_env(props, store, models, args, &[])
    }

    /// As [`Server::start_store`], with these environment variables for the server (and so its
    /// workers).
    pub fn start_store_with_env(
        props: &str,
        store: &Path,
        models: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let mut all = vec!["--model-store", store.to_str().unwrap()];
        if !models.is_empty() {
            all.extend(["--models", models]);
        }
        all.extend(args);
        Self::start_with_env(props, &all, env)
    }

    /// POSTs every body to `/predictions/{path}` at once (with this content type, or none), and
    /// returns each answer's status and text, in the order of `bodies`.
    pub async fn post_all(
        &self,
        path: &str,
        content_type: Option<&'static str>,
        bodies: Vec<String>,
    ) -> Vec<(u16, String)> {
        let url = format!("{}/predictions/{path}", self.inference);
        let requests = bodies.into_iter().map(|body| {
            let mut r = self.client.post(&url).body(body);
            if let Some(t) = content_type {
                r = r.header("content-type", t);
            }
            tokio::spawn(async move {
                let r = r.send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        });
        let handles: Vec<_> = requests.collect();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A key from the server's `key_file.json`: `"inference"`, `"management"` or `"API"`.
    pub fn key(&self, kind: &str) -> String {
        let file = self.path().join("key_file.json");
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e}; log:\n{}", file.display(), self.log()));
        let keys: serde_json::Value = serde_json::from_str(&text).unwrap();
        keys[kind]["key"]
            .as_str()
            .unwrap_or_else(|| panic!("no {kind} key in {text}"))
            .to_string()
    }

    pub fn metrics_url(&self) -> String {
        self.metrics.clone().expect("metrics listener")
    }

    /// Waits until /ping says Healthy.
    pub async fn wait_healthy(&self) {
        let ping = format!("{}/ping", self.inference);
        wait_until("a healthy server", Duration::from_secs(60), || async {
            match self.client.get(&ping).send().await {
                Ok(r) if r.status() == 200 => Ok(()),
                other => Err(format!("{other:?}; log:\n{}", self.log())),
            }
        })
        .await
    }

    pub async fn predict(&self, model: &str, body: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/predictions/{model}", self.inference))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, url: String) -> (u16, serde_json::Value) {
        let r = self.client.get(url).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn mgmt(&self, method: reqwest::Method, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .client
            .request(method, format!("{}{path}", self.management))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// The /metrics text.
    pub async fn scrape(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.metrics_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the sample whose line starts with `prefix` (name and labels), if present.
    pub async fn sample(&self, prefix: &str) -> Option<f64> {
        sample(&self.scrape().await, prefix)
    }

    /// Waits (60 s at most, then fails naming the sample) until the sample whose line starts with
    /// `prefix` exists with a value `ok` accepts; that value.
    pub async fn wait_sample(&self, prefix: &str, ok: impl Fn(f64) -> bool) -> f64 {
        wait_until(prefix, Duration::from_secs(60), || async {
            match self.sample(prefix).await {
                Some(v) if ok(v) => Ok(v),
                last => Err(format!("{last:?}")),
            }
        })
        .await
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Stops the server with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// Polls `probe` (every 50 ms) until it gives `Ok(value)`, for `limit` at most, and returns the
/// value; past the limit, fails naming `what` and the probe's last `Err` (what it saw). Tests
/// wait on conditions this way, not with fixed sleeps.
pub async fn wait_until<T, Fut>(what: &str, limit: Duration, mut probe: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {limit:?} (last: {last})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first sample line starting with `prefix` in a text exposition. The server
/// ends every label set with a comma as TorchServe does (`{a="x",}`); a prefix written without
/// it (`{a="x"}`) matches too, so tests can name series in Prometheus's usual spelling.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) || l.replace("\",}", "\"}").starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Whether process `pid` runs: a zombie (exited, not reaped yet by its parent) or a dead
/// process does not.
pub fn pid_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Writes an unpacked model folder (a .mar's layout) named `name` into the model store `store`:
/// MAR-INF/MANIFEST.json (Python runtime, version 1.0, this handler), model-config.yaml when
/// `yaml` is given, and these files. Returns the folder.
pub fn model_folder(
    store: &Path,
    name: &str,
    handler: &str,
    yaml: Option<&str>,
    files: &[(&str, &str)],
) -> PathBuf {
    let dir = store.join(name);
    std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
    let mut model =
        serde_json::json!({"modelName": name, "modelVersion": "1.0", "handler": handler});
    if let Some(yaml) = yaml {
        model["configFile"] = "model-config.yaml".into();
        std::fs::write(dir.join("model-config.yaml"), yaml).unwrap();
    }
    let manifest = serde_json::json!({"runtime": "python", "model": model});
    std::fs::write(dir.join("MAR-INF/MANIFEST.json"), manifest.to_string()).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

/// Writes a .mar (zip) with this manifest and extra files into `dir`.
pub fn write_mar(
    dir: &Path,
    file: &str,
    manifest: &serde_json::Value,
    extra: &[(&str, &[u8])],
) -> PathBuf {
    use std::io::Write;
    let path = dir.join(file);
    let f = std::fs::File::create(&path).unwrap();
    let mut zip = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("MAR-INF/MANIFEST.json", opts).unwrap();
    zip.write_all(manifest.to_string().as_bytes()).unwrap();
    for (name, data) in extra {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
    path
}

/// A manifest for the built-in demo backend under another name and version.
pub fn demo_manifest(name: &str, version: &str) -> serde_json::Value {
    serde_json::json!({
        "createdOn": "28/11/2026 12:00:00",
        "runtime": "python",
        "model": {"modelName": name, "modelVersion": version, "handler": "builtin"},
        "archiverVersion": "0.12.0"
    })
}

/// Runs one of examples/' packaging scripts (`make_archives.sh`, `make_workflow_archive.sh`) with
/// `out` as its output folder. The scripts install the real torch-model-archiver and
/// torch-workflow-archiver from PyPI into target/*-venv the first time.
pub fn package_examples(script: &str, out: &Path) {
    let root = env!("CARGO_MANIFEST_DIR");
    run_ok(
        &format!("examples/{script}"),
        Command::new("bash")
            .arg(format!("{root}/examples/{script}"))
            .arg(out),
    );
}

/// Runs a command to its end and returns its stdout; fails naming `what`, with its stdout and
/// stderr, unless it exits 0.
pub fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The example archives of examples/make_archives.sh (echo, batching, custom_metrics, streaming,
/// llm, stateful, stateful_stream), packaged once per test binary into target/test-model-store.
pub fn example_archives() -> &'static Path {
    static STORE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    STORE.get_or_init(|| {
        let store = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/test-model-store"
        ));
        package_examples("make_archives.sh", &store);
        for name in [
            "echo",
            "batching",
            "custom_metrics",
            "streaming",
            "llm",
            "stateful",
            "stateful_stream",
        ] {
            assert!(
                store.join(format!("{name}.mar")).is_file(),
                "{name}.mar missing"
            );
        }
        store
    })
}

/// Runs a future `n` times concurrently and returns the outputs.
pub async fn concurrently<F, Fut, T>(n: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(f(i))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// `promtool check metrics` on an exposition: fails on a parse error only (promtool also lints
/// TorchServe's names, e.g. counters without `_total`, which are not errors). Its report (the
/// lint findings).
pub fn promtool_parses(text: &str) -> String {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!report.contains("error while linting"), "{report}\n{text}");
    report
}
