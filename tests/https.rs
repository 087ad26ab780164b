//! HTTPS listeners: `https://` addresses with `private_key_file` and `certificate_file` (PEM),
//! with a certificate the openssl CLI makes for each test. The client verifies it (no
//! "accept anything" switch), and every connection limit is checked to hold over TLS too.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::tls::{make_cert, make_cert_with};
use common::Server;

/// A server whose three listeners are HTTPS, with its certificate in a folder of its own.
fn tls_server(extra: &str) -> (Server, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    make_cert(certs.path());
    let props = format!(
        "inference_address=https://127.0.0.1:0\nmanagement_address=https://127.0.0.1:0\nmetrics_address=https://127.0.0.1:0\nprivate_key_file={}\ncertificate_file={}\n{extra}",
        certs.path().join("key.pem").display(),
        certs.path().join("cert.pem").display()
    );
    (Server::start(&props, &[]), certs)
}

fn client(certs: &Path) -> reqwest::Client {
    let pem = std::fs::read(certs.join("cert.pem")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn https(url: &str) -> String {
    url.replacen("http://", "https://", 1)
}

/// /ping over TLS until it answers 200 (the demo model's worker is up) or 60 s pass; the status
/// it answered last. /ping is 500 while the start-up models have fewer workers than their minimum.
async fn ping_once_healthy(c: &reqwest::Client, inference: &str) -> reqwest::StatusCode {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = c
            .get(format!("{}/ping", https(inference)))
            .send()
            .await
            .unwrap()
            .status();
        if status == 200 || std::time::Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn all_three_listeners_serve_https_with_a_verified_certificate() {
    let (server, certs) = tls_server("");
    let c = client(certs.path());
    assert_eq!(ping_once_healthy(&c, &server.inference).await, 200);
    let r = c
        .post(format!("{}/predictions/demo", https(&server.inference)))
        .body("I love this")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let models = c
        .get(format!("{}/models", https(&server.management)))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let text = models.text().await.unwrap();
    assert!(text.contains("demo"), "{text}");
    let api = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/", https(&server.metrics_url())),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);
    let metrics = c
        .get(format!("{}/metrics", https(&server.metrics_url())))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(server.log().contains("Inference API bind to: https://"));
}

#[tokio::test]
async fn plain_http_to_an_https_listener_gets_no_answer_and_the_server_stays_up() {
    let (server, certs) = tls_server("");
    let addr = server.inference.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /ping HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        !buf.starts_with(b"HTTP/1.1 200"),
        "a plain-text request was served on an HTTPS listener"
    );
    // Still serving over TLS.
    let c = client(certs.path());
    assert_eq!(ping_once_healthy(&c, &server.inference).await, 200);
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped_after_http_header_timeout() {
    // One connection allowed: a client that opens TCP and never starts TLS must lose its slot
    // when http_header_timeout passes, or the listener would be held forever.
    let (server, certs) = tls_server("http_header_timeout=1\nhttp_max_connections=1\n");
    let addr = server.inference.trim_start_matches("http://").to_string();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut buf = [0u8; 16];
    // The server closes it: read returns 0 (or a reset), never data.
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server wrote to a connection that never sent a ClientHello"
    );
    let c = client(certs.path());
    // The slot is free again: a real client gets through (retrying while the close settles).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .get(format!("{}/ping", https(&server.inference)))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the slot never came back: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_short_legacy_rsa_key_is_served_over_tls12() {
    // TorchServe's own test key is 1024-bit RSA, which ring refuses; oxserve serves it over
    // TLS 1.2 (with a warning) rather than refuse TorchServe's documented set-up.
    let certs = tempfile::tempdir().unwrap();
    make_cert_with(certs.path(), &["-newkey", "rsa:1024"]);
    let props = format!(
        "inference_address=https://127.0.0.1:0\nprivate_key_file={}\ncertificate_file={}\n",
        certs.path().join("key.pem").display(),
        certs.path().join("cert.pem").display()
    );
    let server = Server::start(&props, &[]);
    // webpki does not verify signatures of RSA keys under 2048 bits: this client checks nothing
    // about the certificate, only that TLS works.
    let c = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    assert_eq!(ping_once_healthy(&c, &server.inference).await, 200);
    assert!(
        server.log().contains("1024-bit RSA key"),
        "{}",
        server.log()
    );
}

#[test]
fn a_java_keystore_is_refused_with_a_message_naming_pem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=https://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\nkeystore=src/test/resources/keystore.p12\nkeystore_pass=changeit\nkeystore_type=PKCS12\n",
    )
    .unwrap();
    let out = Command::new(common::BIN)
        .args(["start", "--foreground", "--ts-config"])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("keystore") && text.contains("PEM"),
        "stderr: {text}"
    );
}

#[test]
fn an_https_address_without_key_files_or_with_a_bad_key_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    let run = |props: &str| {
        std::fs::write(&config, props).unwrap();
        let out = Command::new(common::BIN)
            .args(["start", "--foreground", "--ts-config"])
            .arg(&config)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let base = "inference_address=https://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n";
    let e = run(base);
    assert!(e.contains("private_key_file"), "stderr: {e}");
    std::fs::write(dir.path().join("k.pem"), "garbage").unwrap();
    std::fs::write(dir.path().join("c.pem"), "garbage").unwrap();
    let e = run(&format!(
        "{base}private_key_file=k.pem\ncertificate_file=c.pem\n"
    ));
    assert!(e.contains("certificate_file"), "stderr: {e}");
}
