//! The oxserve binary run as `torchserve` (a real symlink named torchserve, as installed) takes
//! TorchServe's command line: `--start` in the background keeps the caller's stdout, where
//! "Model server started." appears as TorchServe's launcher expects; `--stop` stops it;
//! `--start --foreground` is the server itself.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{demo_manifest, write_mar, BIN};

const CONFIG: &str = "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n";

struct Setup {
    dir: tempfile::TempDir,
    torchserve: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let torchserve = bin.join("torchserve");
        std::os::unix::fs::symlink(BIN, &torchserve).unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        write_mar(&store, "m.mar", &demo_manifest("m", "1.0"), &[]);
        std::fs::write(dir.path().join("config.properties"), CONFIG).unwrap();
        Setup { dir, torchserve }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.torchserve);
        c.args(args)
            .current_dir(self.dir.path())
            .env("OXSERVE_PID_FILE", self.dir.path().join("ts.pid"))
            .env("LOG_LOCATION", self.dir.path().join("logs"))
            .env_remove("TS_CONFIG_FILE")
            .env_remove("OXSERVE_CONSOLE_STDOUT");
        c
    }

    fn start_args(&self) -> Vec<String> {
        let p = |x: &str| self.dir.path().join(x).to_string_lossy().into_owned();
        [
            "--start",
            "--model-store",
            &p("store"),
            "--ts-config",
            &p("config.properties"),
            "--models",
            "m=m.mar",
            "--ncs",
            "--disable-token-auth",
            "--enable-model-api",
            "--workflow-store",
            &p("store"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Reads `child`'s stdout on a thread; lines come through the channel (EOF: the sender drops).
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (generously) for a line containing `needle`; returns every line read so far.
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => {
                let found = l.contains(needle);
                seen.push(l);
                if found {
                    return;
                }
            }
            Err(e) => panic!("no line with {needle:?} ({e}); got:\n{}", seen.join("\n")),
        }
    }
}

fn management_of(seen: &[String]) -> String {
    let line = seen
        .iter()
        .find(|l| l.starts_with("oxserve listening:"))
        .expect("the listening line");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("management="))
        .unwrap();
    format!("http://{addr}")
}

fn pid_in(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_in_the_background_then_stop_like_torchserve() {
    let s = Setup::new();
    let out = s.cmd(&["--version"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("TorchServe Version is 0.12.0"));
    let out = s.cmd(&["--stop"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "TorchServe is not currently running."
    );

    // `torchserve --start` exits at once; the server keeps its stdout (as TorchServe's java does).
    let mut launcher = s
        .cmd(
            &s.start_args()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut launcher);
    assert!(launcher.wait().unwrap().success());
    let mut seen = Vec::new();
    wait_line(&rx, "Model server started.", &mut seen);
    let all = seen.join("\n");
    assert!(
        all.contains("Inference API bind to: http://127.0.0.1:"),
        "{all}"
    );
    let pid = pid_in(&s.dir.path().join("ts.pid"));
    assert!(alive(pid));
    assert_ne!(
        pid as u32,
        launcher.id(),
        "the server is a process of its own"
    );

    let mgmt = management_of(&seen);
    let models: serde_json::Value = reqwest::get(format!("{mgmt}/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["models"][0]["modelName"], "m", "{models}");
    // --workflow-store reached the server: a workflow looked up there is "not found in the
    // workflow store" (without one it would be "Workflow store has not been configured.").
    let r = reqwest::Client::new()
        .post(format!("{mgmt}/workflows?url=absent.war"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(body.contains("not found in workflow store"), "{body}");

    // A second start is refused while it runs.
    let out = s
        .cmd(
            &s.start_args()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("TorchServe is already running"));

    let out = s.cmd(&["--stop", "--foreground"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !alive(pid),
        "the server still runs after --stop --foreground"
    );
    // The server's end closed the pipe it inherited.
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("stdout still open after stop: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_in_the_foreground_is_the_server_itself() {
    let s = Setup::new();
    // Without --disable-token-auth: on, as TorchServe 0.12 has it (the other test passes the flag
    // and reads /models without a key).
    let mut args: Vec<String> = s
        .start_args()
        .into_iter()
        .filter(|a| a != "--disable-token-auth")
        .collect();
    args.push("--foreground".into());
    let mut server = s
        .cmd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut server);
    let mut seen = Vec::new();
    wait_line(&rx, "Model server started.", &mut seen);
    assert_eq!(pid_in(&s.dir.path().join("ts.pid")), server.id() as i32);
    let key_file = s.dir.path().join("key_file.json");
    assert!(key_file.exists(), "{}", seen.join("\n"));
    let mgmt = management_of(&seen);
    let r = reqwest::get(format!("{mgmt}/models")).await.unwrap();
    assert_eq!(r.status(), 400);
    let out = s.cmd(&["--stop"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("TorchServe has stopped."));
    assert!(server.wait().unwrap().success());
    assert!(!key_file.exists(), "the key file outlived the server");
}

#[test]
fn torchserve_checks_its_paths_as_torchserve_does() {
    let s = Setup::new();
    let out = s
        .cmd(&["--start", "--model-store", "/nonexistent/store"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--model-store directory not found"),
        "{out:?}"
    );
    let out = s
        .cmd(&["--start", "--ts-config", "/nonexistent/config.properties"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--ts-config file not found"));
    // Unknown flags are refused with a usage message, not ignored.
    let out = s.cmd(&["--start", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!s.dir.path().join("ts.pid").exists());
}
