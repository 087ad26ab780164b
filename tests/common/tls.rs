//! Certificates for the TLS tests (HTTPS listeners, gRPC over TLS), made by the openssl CLI.

use std::path::Path;
use std::process::Command;

/// A self-signed P-256 certificate for 127.0.0.1 in `dir`: key.pem, cert.pem.
pub fn make_cert(dir: &Path) {
    make_cert_with(
        dir,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
    );
}

/// The same with another key (`key`: openssl's `-newkey ...` arguments).
pub fn make_cert_with(dir: &Path, key: &[&str]) {
    let status = Command::new("openssl")
        .args(["req", "-x509"])
        .args(key)
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            // A server certificate, not a CA: webpki refuses a CA certificate as the end entity.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl CLI");
    assert!(status.success(), "openssl could not make a certificate");
}
