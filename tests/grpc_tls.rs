//! gRPC over TLS (`enable_grpc_ssl=true`): the gRPC listeners serve TLS with the HTTPS
//! listeners' `private_key_file` and `certificate_file`, checked with a certificate the openssl
//! CLI makes for the test and grpcio's real client, which verifies it (tests/grpc_client).

mod common;

use std::process::Command;

use common::tls::make_cert;
use common::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_serves_tls_with_the_configured_certificate() {
    let certs = tempfile::tempdir().unwrap();
    make_cert(certs.path());
    let props = format!(
        "enable_grpc_ssl=true\ndefault_workers_per_model=1\nhttp_header_timeout=2\nprivate_key_file={}\ncertificate_file={}\n",
        certs.path().join("key.pem").display(),
        certs.path().join("cert.pem").display()
    );
    let s = Server::start(&props, &[]);
    // HTTP stays cleartext: only the gRPC listeners were asked for TLS.
    s.wait_healthy().await;
    let root = env!("CARGO_MANIFEST_DIR");
    // Connections that never start their handshake hold nothing up: each handshake waits in a
    // task of its own.
    let grpc_addr = s
        .grpc_inference
        .as_deref()
        .unwrap()
        .trim_start_matches("http://");
    let _idle: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(grpc_addr).unwrap())
        .collect();
    let addr = |u: &Option<String>| {
        u.as_deref()
            .unwrap()
            .trim_start_matches("http://")
            .to_string()
    };
    let out = Command::new(common::grpc::grpcio_python())
        .arg(format!("{root}/tests/grpc_client/tls_client.py"))
        .arg(certs.path().join("cert.pem"))
        .args(["demo", "I love this"])
        .env("OXSERVE_GRPC_STUBS", format!("{root}/target/grpc-stubs"))
        .env("OXSERVE_GRPC_INFERENCE", addr(&s.grpc_inference))
        .env("OXSERVE_GRPC_MANAGEMENT", addr(&s.grpc_management))
        .output()
        .expect("run tls_client.py");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}\n{}", s.log());
    assert!(
        text.contains("ping: {   \"status\": \"Healthy\" }"),
        "{text}"
    );
    let over_http = s
        .client
        .post(format!("{}/predictions/demo", s.inference))
        .body("I love this")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!("prediction: {over_http}")),
        "{text} (HTTP answered {over_http})"
    );
    assert!(
        text.contains("models:") && text.contains("\"demo\""),
        "{text}"
    );
    assert!(text.contains("cleartext: refused"), "{text}");

    // A connection that never sends its ClientHello is closed once http_header_timeout (2 s
    // here) has passed, rather than held open.
    use std::io::Read;
    let mut idle = _idle.into_iter().next().unwrap();
    idle.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut buf = [0u8; 16];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the server sent {n} bytes before any ClientHello"),
        Err(e) => assert!(
            matches!(e.kind(), std::io::ErrorKind::ConnectionReset),
            "the idle connection was not closed: {e}"
        ),
    }
}

#[test]
fn grpc_tls_without_a_key_and_certificate_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    // A start with this config.properties, which must stop at once (no listener is ever bound:
    // every address here is OS-chosen anyway).
    let start = |props: &str| {
        let config = dir.path().join("config.properties");
        std::fs::write(&config, format!("{}{props}", common::BASE)).unwrap();
        Command::new(common::BIN)
            .args(["start", "--foreground", "--ts-config"])
            .arg(&config)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = start("enable_grpc_ssl=true\n");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enable_grpc_ssl"), "{err}");

    // A certificate file that is not one: start-up stops naming it, before any listener serves.
    std::fs::write(dir.path().join("junk.pem"), "not pem").unwrap();
    let out = start(&format!(
        "enable_grpc_ssl=true\nprivate_key_file={0}\ncertificate_file={0}\n",
        dir.path().join("junk.pem").display()
    ));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate_file"), "{err}");
}
