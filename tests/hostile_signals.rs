//! Secrets and signals against the real binary: a lax key_file.json left by someone else is
//! replaced by a fresh 0600 file, and SIGTERM while archives unpack at start-up stops the server
//! cleanly, leaving no unpacked archive, download or key file behind.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::BIN;

/// A started server, killed if the test fails before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the binary in `cwd` with this config and TMPDIR; lines of stdout and stderr arrive on
/// the returned channel.
fn spawn(cwd: &Path, tmp: &Path, props: &str, args: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let config = cwd.join("config.properties");
    std::fs::write(
        &config,
        format!("inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n{props}\n"),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["start", "--foreground", "--ts-config"])
        .arg(&config)
        .args(args)
        .current_dir(cwd)
        .env("TMPDIR", tmp)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    (Running(child), rx)
}

/// Waits for a line containing `needle`; every line seen is kept in `seen`.
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if l.contains(needle) {
                    return l;
                }
            }
            Err(_) => panic!("no line with {needle:?}; output:\n{}", seen.join("\n")),
        }
    }
}

fn terminate(Running(child): &mut Running) -> std::process::ExitStatus {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a folder holds, except `logs/`: the server's log files (and config snapshots) are meant to
/// stay; the tests look for anything else left behind.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "logs")
        .collect();
    v.sort();
    v
}

#[test]
fn a_lax_key_file_is_replaced_by_a_private_one() {
    let cwd = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let key_file = cwd.path().join("key_file.json");
    std::fs::write(&key_file, "{\"old\": true}\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (mut child, rx) = spawn(
        cwd.path(),
        tmp.path(),
        "disable_token_authorization=false",
        &[],
    );
    let mut seen = Vec::new();
    let line = wait_line(&rx, "oxserve listening", &mut seen);
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key_file.json is {mode:o}");
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert!(keys["management"]["key"].as_str().is_some(), "{keys}");
    assert!(keys.get("old").is_none());
    // No temporary key file is left next to it.
    let names = entries(cwd.path());
    assert_eq!(names, ["config.properties", "key_file.json"], "{names:?}");

    // The server serves with those keys.
    let inference = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("inference="))
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        reqwest::get(format!("http://{inference}/ping"))
            .await
            .unwrap()
            .status()
    });
    assert!(status == 200 || status == 500, "{status}");

    assert!(terminate(&mut child).success());
    assert!(!key_file.exists(), "the key file outlived the server");
}

#[test]
fn sigterm_while_archives_unpack_cleans_up() {
    let cwd = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    // Two large (highly compressible, so quick to build) archives: unpacking them takes a while.
    for name in ["big1", "big2"] {
        let path = store.path().join(format!("{name}.mar"));
        let manifest = common::demo_manifest(name, "1.0").to_string();
        let ok = Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile\n\
                 z = zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED, compresslevel=1)\n\
                 z.writestr('MAR-INF/MANIFEST.json', sys.argv[2])\n\
                 z.writestr('weights.bin', bytes(300 * 1024 * 1024))\n\
                 z.close()",
            ])
            .arg(&path)
            .arg(&manifest)
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let (mut child, rx) = spawn(
        cwd.path(),
        tmp.path(),
        "disable_token_authorization=false\ndefault_workers_per_model=1",
        &[
            "--model-store",
            store.path().to_str().unwrap(),
            "--models",
            "big1.mar,big2.mar",
        ],
    );
    let mut seen = Vec::new();
    wait_line(&rx, ": unpacking", &mut seen);
    let status = terminate(&mut child);
    for l in rx.try_iter() {
        seen.push(l);
    }
    assert!(status.success(), "{status}: {}", seen.join("\n"));
    assert!(
        seen.iter().any(|l| l.contains("SIGTERM")),
        "{}",
        seen.join("\n")
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "left in TMPDIR");
    assert_eq!(
        entries(cwd.path()),
        ["config.properties"],
        "left in the working folder"
    );
    assert_eq!(entries(store.path()), ["big1.mar", "big2.mar"]);
}
