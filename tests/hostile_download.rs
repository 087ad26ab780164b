//! Registration from http:// URLs against hostile or broken archive servers: redirects to hosts
//! not allowed, oversized and stalled downloads, archives that do not unpack, and progress of a
//! slow download in describe. The archives come from a small HTTP server on loopback started by
//! each test; every test checks the clear error, that nothing is left in the model store, and
//! that the server keeps serving.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{demo_manifest, write_mar, Server};
use reqwest::Method;

/// What a route answers: the raw connection is handed over after the request head is read.
type Route = Box<dyn Fn(&mut TcpStream) + Send + Sync>;

/// A loopback HTTP server answering GET by path; it lives as long as the test process.
struct ArchiveServer {
    port: u16,
}

impl ArchiveServer {
    fn start(routes: Vec<(&'static str, Route)>) -> ArchiveServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes = Arc::new(routes);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let routes = routes.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    match routes.iter().find(|(p, _)| *p == path) {
                        Some((_, route)) => route(&mut stream),
                        None => {
                            let _ = stream.write_all(
                                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                            );
                        }
                    }
                });
            }
        });
        ArchiveServer { port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn serve_bytes(bytes: Vec<u8>) -> Route {
    Box::new(move |s: &mut TcpStream| {
        let _ = s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                bytes.len()
            )
            .as_bytes(),
        );
        let _ = s.write_all(&bytes);
    })
}

fn redirect(to: String) -> Route {
    Box::new(move |s: &mut TcpStream| {
        let _ = s.write_all(
            format!(
                "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
    })
}

/// A demo .mar as bytes.
fn mar_bytes(name: &str, padding: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    // Incompressible padding, so that the archive really is this large.
    let mut x: u32 = 12345;
    let pad: Vec<u8> = (0..padding)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let path = write_mar(
        dir.path(),
        "x.mar",
        &demo_manifest(name, "1.0"),
        &[("padding.bin", &pad)],
    );
    std::fs::read(path).unwrap()
}

/// Every file in the model store (hidden ones included).
fn store_files(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn start(store: &Path, props: &str) -> Server {
    Server::start_store(
        &format!("default_workers_per_model=1\n{props}"),
        store,
        "",
        &["--enable-model-api"],
    )
}

async fn register(s: &Server, url: &str) -> (u16, serde_json::Value) {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("url", url)
        .append_pair("synchronous", "true")
        .finish();
    s.mgmt(Method::POST, &format!("/models?{q}")).await
}

async fn assert_serving(s: &Server) {
    let (code, v) = s.get_json(format!("{}/ping", s.inference)).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("Healthy")), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_host_not_allowed_is_refused() {
    let evil = ArchiveServer::start(vec![("/evil.mar", serve_bytes(mar_bytes("evil", 0)))]);
    let good = ArchiveServer::start(vec![
        ("/hop.mar", redirect(evil.url("/evil.mar"))),
        ("/ok.mar", serve_bytes(mar_bytes("ok", 0))),
    ]);
    let good_port = good.port;
    let store = tempfile::tempdir().unwrap();
    let s = start(
        store.path(),
        &format!("allowed_urls=http://127\\.0\\.0\\.1:{good_port}/.*"),
    );
    let (code, v) = register(&s, &good.url("/hop.mar")).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["type"], "BadRequestException", "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("redirects to") && msg.contains("allowed"),
        "{v}"
    );
    assert!(
        store_files(store.path()).is_empty(),
        "{:?}",
        store_files(store.path())
    );
    assert_eq!(s.mgmt(Method::GET, "/models/evil").await.0, 404);
    // An allowed URL still registers, and only then appears in the store.
    let (code, v) = register(&s, &good.url("/ok.mar")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(store_files(store.path()), ["ok.mar"]);
    assert_eq!(s.predict("ok", r#""good""#).await.status(), 200);
    assert_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_download_leaves_nothing_and_can_be_retried() {
    let not_zip = b"this is not a zip archive".to_vec();
    let web = ArchiveServer::start(vec![
        ("/broken.mar", serve_bytes(not_zip)),
        ("/big.mar", serve_bytes(mar_bytes("big", 300_000))),
        (
            // No Content-Length: the size is only known while streaming.
            "/unsized.mar",
            Box::new(|s: &mut TcpStream| {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(&vec![1u8; 300_000]);
            }),
        ),
        (
            // Half a body, then nothing: the read timeout must end it.
            "/stalled.mar",
            Box::new(|s: &mut TcpStream| {
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\nconnection: close\r\n\r\n",
                );
                let _ = s.write_all(&[0u8; 1000]);
                std::thread::sleep(Duration::from_secs(600));
            }),
        ),
    ]);
    let store = tempfile::tempdir().unwrap();
    let s = start(
        store.path(),
        "max_download_size=100000\ndownload_read_timeout=2",
    );
    s.wait_healthy().await;
    for _ in 0..2 {
        // Twice: a retry gets the same clear error, not a 409 about a leftover file.
        let (code, v) = register(&s, &web.url("/broken.mar")).await;
        assert_eq!(code, 400, "{v}");
        assert!(v["message"].as_str().unwrap().contains("zip"), "{v}");
        // Downloaded, but not an archive: a bad request, not a failed download.
        assert_eq!(v["type"], "BadRequestException", "{v}");
        assert!(store_files(store.path()).is_empty());
    }
    // TorchServe's suite ("Register Model - Invalid URL"): a URL the server answers 404 for.
    let (code, v) = register(&s, &web.url("/absent.mar")).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["type"], "DownloadArchiveException", "{v}");
    assert!(v["message"].as_str().unwrap().contains("404"), "{v}");
    assert!(store_files(store.path()).is_empty());
    for path in ["/big.mar", "/unsized.mar"] {
        let (code, v) = register(&s, &web.url(path)).await;
        assert_eq!(code, 400, "{path}: {v}");
        // TorchServe's answer for an archive it cannot download (ArchiveUtils.downloadArchive).
        assert_eq!(v["type"], "DownloadArchiveException", "{path}: {v}");
        assert!(
            v["message"].as_str().unwrap().contains("max_download_size"),
            "{path}: {v}"
        );
        assert!(store_files(store.path()).is_empty());
    }
    let (code, v) = register(&s, &web.url("/stalled.mar")).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["type"], "DownloadArchiveException", "{v}");
    assert!(v["message"].as_str().unwrap().contains("timed out"), "{v}");
    assert!(store_files(store.path()).is_empty());
    assert_serving(&s).await;
    let (_, list) = s.mgmt(Method::GET, "/models").await;
    assert_eq!(list["models"].as_array().unwrap().len(), 0, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_the_progress_of_a_slow_download() {
    let archive = mar_bytes("slow", 400_000);
    let half = archive.len() / 2;
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let total = archive.len();
    let web = ArchiveServer::start(vec![(
        "/slow.mar",
        Box::new(move |s: &mut TcpStream| {
            let _ = s.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
            let _ = s.write_all(&archive[..half]);
            let _ = s.flush();
            // The rest only once the test has seen the progress.
            let _ = release_rx.lock().unwrap().recv();
            let _ = s.write_all(&archive[half..]);
        }),
    )]);
    let store = tempfile::tempdir().unwrap();
    let s = start(store.path(), "");
    s.wait_healthy().await;
    let url = web.url("/slow.mar");
    let registering = {
        let client = s.client.clone();
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("url", &url)
            .append_pair("synchronous", "true")
            .finish();
        let target = format!("{}/models?{q}", s.management);
        tokio::spawn(async move { client.post(target).send().await.unwrap().status() })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let (code, v) = s.mgmt(Method::GET, "/models/slow").await;
        if code == 200 && v[0]["loading"]["bytes"].as_u64() >= Some(half as u64) {
            break v;
        }
        assert!(Instant::now() < deadline, "no progress shown: {code} {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let entry = &progress[0];
    assert_eq!(entry["status"], "LOADING", "{progress}");
    assert_eq!(entry["modelUrl"], url.as_str());
    assert_eq!(entry["loading"]["phase"], "downloading");
    assert_eq!(entry["loading"]["totalBytes"], total as u64);
    assert!(
        entry["loading"]["percent"].as_f64().unwrap() >= 49.0,
        "{progress}"
    );
    // Nothing in the store under the archive's name while it downloads.
    assert!(!store.path().join("slow.mar").exists());
    release_tx.send(()).unwrap();
    assert_eq!(registering.await.unwrap(), 200);
    let (code, v) = s.mgmt(Method::GET, "/models/slow").await;
    assert_eq!(code, 200);
    assert_eq!(v[0]["modelVersion"], "1.0", "{v}");
    assert!(v[0].get("loading").is_none());
    assert_eq!(store_files(store.path()), ["slow.mar"]);
    assert!(
        s.log().contains("model slow from") && s.log().contains("downloading"),
        "{}",
        s.log()
    );
    assert_serving(&s).await;
}

/// Peak resident memory of a process in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_download_streams_to_disk() {
    // 96 MiB of random bytes, stored uncompressed: held whole in memory it would show in the
    // server's peak RSS.
    const MIB: usize = 1024 * 1024;
    let web_dir = tempfile::tempdir().unwrap();
    let path = web_dir.path().join("large.mar");
    let manifest = demo_manifest("large", "1.0").to_string();
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_STORED) as z:\n\
             \x20   z.writestr('MAR-INF/MANIFEST.json', sys.argv[2])\n\
             \x20   z.writestr('weights.bin', os.urandom(96 * 1024 * 1024))",
        ])
        .arg(&path)
        .arg(&manifest)
        .status()
        .unwrap();
    assert!(ok.success());
    let size = std::fs::metadata(&path).unwrap().len();
    let web = ArchiveServer::start(vec![(
        "/large.mar",
        Box::new(move |s: &mut TcpStream| {
            let _ = s.write_all(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            );
            let mut f = std::fs::File::open(&path).unwrap();
            let _ = std::io::copy(&mut f, s);
        }),
    )]);
    let store = tempfile::tempdir().unwrap();
    let s = start(store.path(), "");
    s.wait_healthy().await;
    let before = peak_rss_kib(s.child.id());
    let (code, v) = register(&s, &web.url("/large.mar")).await;
    assert_eq!(code, 200, "{v}");
    let after = peak_rss_kib(s.child.id());
    let grown = (after.saturating_sub(before)) as usize * 1024;
    assert!(
        grown < 48 * MIB,
        "peak RSS grew by {} MiB for a {} MiB download",
        grown / MIB,
        size as usize / MIB
    );
    assert_eq!(store_files(store.path()), ["large.mar"]);
    assert_eq!(s.predict("large", r#""good""#).await.status(), 200);
}
