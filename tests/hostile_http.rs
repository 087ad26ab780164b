//! Hostile HTTP clients against the real binary: slowloris heads, trickled bodies, idle
//! keep-alive connections, connection floods, malformed requests, and error answers sent before
//! the body is read. Each test checks the clear answer AND that the server keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `limit` passes, which fails the test).
fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!(
                "the server did not close the connection: {e}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// The status code and JSON body of a raw HTTP/1.1 answer.
fn parse_answer(raw: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: body {body:?}"));
    (status, json)
}

async fn assert_serving(s: &Server) {
    let (code, v) = s.get_json(format!("{}/ping", s.inference)).await;
    assert_eq!((code, v["status"].as_str()), (200, Some("Healthy")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_closed_at_the_header_timeout() {
    let s = Server::start("http_header_timeout=2\nhttp_keep_alive_timeout=2", &[]);
    s.wait_healthy().await;
    let target = addr(&s.inference);
    // 50 connections that each send a request line and then one header byte at a time.
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let target = target.clone();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(&target).unwrap();
                c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n").unwrap();
                let started = Instant::now();
                // Keep trickling until the server hangs up (a write or read then fails).
                c.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "a slowloris connection was never closed"
                    );
                    if c.write_all(b"X").is_err() {
                        return;
                    }
                    match c.read(&mut buf) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_at_the_body_timeout() {
    let s = Server::start("http_body_timeout=2", &[]);
    s.wait_healthy().await;
    let mut c = TcpStream::connect(addr(&s.inference)).unwrap();
    c.write_all(
        b"POST /predictions/demo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nI love",
    )
    .unwrap();
    // Nothing more is sent: the server must answer and close on its own.
    let raw = read_to_close(&mut c, Duration::from_secs(120));
    let (status, v) = parse_answer(&raw);
    assert_eq!(status, 408, "{v}");
    assert_eq!(v["code"], 408);
    assert_eq!(v["type"], "RequestTimeoutException");
    assert!(
        v["message"].as_str().unwrap().contains("http_body_timeout"),
        "{v}"
    );
    assert_serving(&s).await;
    let r = s.predict("demo", r#"{"text": "I love this"}"#).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let s = Server::start("http_keep_alive_timeout=1", &[]);
    s.wait_healthy().await;
    // 20 connections that each make one request and then stay open, idle.
    let mut conns: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut c = TcpStream::connect(addr(&s.inference)).unwrap();
            c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    for c in &mut conns {
        let raw = read_to_close(c, Duration::from_secs(120));
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("Healthy"), "{text}");
    }
    assert_serving(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_the_cap_frees_up() {
    let s = Server::start(
        "http_max_connections=4\nhttp_keep_alive_timeout=600\nhttp_header_timeout=600",
        &[],
    );
    // No request through the test's pooled client first: its idle connection would hold a slot.
    let target = addr(&s.inference);
    // Four connections hold every slot: each has answered one request, so each is accepted.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&target).unwrap();
        c.write_all(b"GET /api-description HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let n = c.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    let mut extra = TcpStream::connect(&target).unwrap();
    extra
        .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, v) = parse_answer(&read_to_close(&mut extra, Duration::from_secs(60)));
    assert_eq!(status, 503);
    assert_eq!(v["type"], "ServiceUnavailableException");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("http_max_connections=4"),
        "{v}"
    );
    // Other listeners have their own cap.
    let (code, _) = s.mgmt(reqwest::Method::GET, "/models").await;
    assert_eq!(code, 200);
    drop(held);
    // Once the held connections close, the listener serves again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = reqwest::Client::new()
            .get(format!("{}/ping", s.inference))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the cap never freed up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_layer_errors_answer_in_torchserve_json() {
    let s = Server::start("http_max_header_size=4096", &[]);
    s.wait_healthy().await;
    let inf = addr(&s.inference);

    let send = |target: &str, raw: &[u8]| {
        let mut c = TcpStream::connect(target).unwrap();
        c.write_all(raw).unwrap();
        parse_answer(&read_to_close(&mut c, Duration::from_secs(60)))
    };
    // A request line that is not HTTP.
    let (status, v) = send(&inf, b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!((status, v["code"].as_u64()), (400, Some(400)), "{v}");
    assert_eq!(v["type"], "BadRequestException");
    // Headers larger than http_max_header_size.
    let big = format!(
        "GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    let (status, v) = send(&inf, big.as_bytes());
    assert_eq!((status, v["code"].as_u64()), (431, Some(431)), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("http_max_header_size"),
        "{v}"
    );
    // A URI longer than the head limit.
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "p".repeat(10_000));
    let (status, v) = send(&inf, long.as_bytes());
    assert!(matches!(status, 414 | 431), "{status} {v}");
    assert_eq!(v["code"].as_u64(), Some(status as u64));
    // A known management path with a method it does not take.
    let r = s
        .client
        .patch(format!("{}/models", s.management))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "MethodNotAllowedException");
    // Every one of them was counted.
    assert_serving(&s).await;
    let scraped = s.scrape().await;
    let fours = common::sample(&scraped, "Requests4XX{");
    assert!(fours.is_some_and(|n| n >= 4.0), "{scraped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_before_the_body_is_read_reaches_the_client() {
    let s = Server::start("max_request_size=1000000", &[]);
    s.wait_healthy().await;
    let body = vec![b'x'; 110 * 1024];
    for url in [
        format!("{}/no/such/route", s.inference),
        format!("{}/predictions/no_such_model", s.inference),
        format!("{}/models/no_such_model", s.management),
    ] {
        let r = s
            .client
            .post(&url)
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: the client got no answer: {e:?}"));
        assert_eq!(
            r.status(),
            if url.contains("/models/") { 405 } else { 404 },
            "{url}"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["code"].as_u64().is_some(), "{v}");
    }
    // A body over max_request_size: refused with the reason the client can read.
    let big = vec![b'x'; 1_500_000];
    let r = s
        .client
        .post(format!("{}/predictions/demo", s.inference))
        .body(big)
        .send()
        .await
        .expect("the client got no answer to an oversized body");
    assert!(
        r.status().is_client_error() || r.status() == 507,
        "{}",
        r.status()
    );
    assert_serving(&s).await;
}

/// The reported case: 115 idle keep-alive connections against a server with a 128-file limit
/// stopped `/ping` for good. Now the derived connection cap leaves descriptors free and the
/// keep-alive timeout closes idle connections, so `/ping` answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_under_a_128_file_limit_do_not_stop_ping() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\nhttp_keep_alive_timeout=2\ndefault_workers_per_model=1\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["start", "--foreground", "--ts-config"])
        .arg(&config)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe; it only lowers the child's own limit.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 128,
                rlim_max: 128,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            unsafe {
                libc::kill(self.0.id() as i32, libc::SIGTERM);
            }
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _guard = Kill(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let target = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("inference="))
        .expect("listening line")
        .to_string();
    let ping = || async {
        reqwest::Client::new()
            .get(format!("http://{target}/ping"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    // 115 connections, each making one request and then staying open.
    let mut held = Vec::new();
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..115 {
        let Ok(mut c) = TcpStream::connect(&target) else {
            continue;
        };
        let _ = c.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 512];
        let head = match c.read(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n])
                .split("\r\n")
                .next()
                .unwrap_or("")
                .to_string(),
            Err(e) => format!("error {e}"),
        };
        *answers.entry(head).or_default() += 1;
        held.push(c);
    }
    // No connection hung: each got an answer (200/500 while accepted, 503 over the cap) or, past
    // the few refusals answered at a time, was closed at once.
    assert!(
        !answers
            .keys()
            .any(|h| h.contains("timed out") || h.contains("temporarily unavailable")),
        "{answers:?}"
    );
    assert!(
        answers.keys().any(|h| h.starts_with("HTTP/1.1 503")),
        "the cap derived from 128 files never applied: {answers:?}"
    );
    // With the held connections still open on the client side, /ping answers again once the
    // server has closed its idle ones.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(200) = ping().await {
            break;
        }
        assert!(Instant::now() < deadline, "/ping never answered 200 again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
}
