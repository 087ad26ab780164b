//! HTTPS for the listeners: the rustls server configuration built from `private_key_file` and
//! `certificate_file` (PEM), as TorchServe documents them.
//!
//! Differences from TorchServe (docs/compatibility.md, "HTTPS"): PEM only (TorchServe also reads a
//! Java keystore), no self-signed certificate when none is configured, TLS 1.2 and 1.3 only with
//! rustls' safe defaults (RSA keys under 2048 bits: TLS 1.2 only, with a warning), HTTP/1.1 only (ALPN `http/1.1`). The handshake runs inside the
//! connection's slot and under `http_header_timeout` (src/api/http.rs), so every connection
//! limit applies to HTTPS as it does to HTTP.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// A PEM key or chain larger than this is refused: real ones are a few KiB, and a path pointed
/// at a huge file by mistake should fail with a message, not fill memory.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why the HTTPS listeners cannot be set up; each names the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `private_key_file` or `certificate_file` cannot be read, or does not hold what it should.
    #[error("config key {key}: {reason}")]
    File { key: &'static str, reason: String },
    /// The key and the certificate do not go together.
    #[error("config keys private_key_file and certificate_file: {0}")]
    Pair(String),
    /// rustls refused the protocol set-up.
    #[error("TLS set-up failed: {0}")]
    Setup(rustls::Error),
}

fn read_pem(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    let file_error = |reason: String| TlsError::File { key, reason };
    let file = std::fs::File::open(path)
        .map_err(|e| file_error(format!("cannot read {}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(file_error(format!(
            "{} is larger than {MAX_PEM_BYTES} bytes; it is not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The acceptor every HTTPS listener shares. Errors name the key and file at fault.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    acceptor_with_alpn(files, b"http/1.1")
}

/// An acceptor offering one ALPN protocol: `http/1.1` for the HTTPS listeners, `h2` for gRPC.
pub fn acceptor_with_alpn(files: &TlsFiles, alpn: &[u8]) -> Result<TlsAcceptor, TlsError> {
    let cert_pem = read_pem(&files.certificate_file, "certificate_file")?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            key: "certificate_file",
            reason: format!(
                "{} is not a PEM certificate chain: {e}",
                files.certificate_file.display()
            ),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            key: "certificate_file",
            reason: format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                files.certificate_file.display()
            ),
        });
    }
    let key_pem = read_pem(&files.private_key_file, "private_key_file")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
        key: "private_key_file",
        reason: format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            files.private_key_file.display()
        ),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?
        .with_no_client_auth();
    let unusable = |e: &dyn std::fmt::Display| {
        TlsError::Pair(format!(
            "{} and {} do not make a usable key and certificate: {e}",
            files.private_key_file.display(),
            files.certificate_file.display()
        ))
    };
    let mut config = match builder.with_single_cert(certs.clone(), key.clone_key()) {
        Ok(config) => config,
        Err(e) => {
            let Some(short) = legacy_rsa::Key::short(&key) else {
                return Err(unusable(&e));
            };
            tracing::warn!(
                "private_key_file {} is a {}-bit RSA key: insecure (2048 bits is the minimum); served with TLS 1.2 only for compatibility, replace it",
                files.private_key_file.display(),
                short.bits()
            );
            let certified = rustls::sign::CertifiedKey::new(certs, Arc::new(short));
            rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS12])
                .map_err(TlsError::Setup)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)))
        }
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// RSA keys shorter than 2048 bits, which ring refuses to sign with. TorchServe serves them (its
/// own test key, resources/key.pem, is 1024-bit RSA), so oxserve does too, but only over TLS 1.2
/// with PKCS#1 v1.5 signatures made by the pure-Rust `rsa` crate, and with a warning at start.
mod legacy_rsa {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::{SignatureEncoding, Signer as _};
    use rsa::traits::PublicKeyParts;
    use rustls_pki_types::PrivateKeyDer;
    use tokio_rustls::rustls::{self, SignatureAlgorithm, SignatureScheme};

    const SCHEMES: [SignatureScheme; 3] = [
        SignatureScheme::RSA_PKCS1_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384,
        SignatureScheme::RSA_PKCS1_SHA512,
    ];

    #[derive(Debug, Clone)]
    pub struct Key(rsa::RsaPrivateKey);

    impl Key {
        /// The key, when it is an RSA key of 1024 to 2047 bits (smaller ones stay refused).
        pub fn short(key: &PrivateKeyDer<'_>) -> Option<Key> {
            let k = match key {
                PrivateKeyDer::Pkcs1(k) => {
                    rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der()).ok()?
                }
                PrivateKeyDer::Pkcs8(k) => {
                    rsa::RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der()).ok()?
                }
                _ => return None,
            };
            (1024..2048).contains(&(k.size() * 8)).then_some(Key(k))
        }

        pub fn bits(&self) -> usize {
            self.0.size() * 8
        }
    }

    impl rustls::sign::SigningKey for Key {
        fn choose_scheme(
            &self,
            offered: &[SignatureScheme],
        ) -> Option<Box<dyn rustls::sign::Signer>> {
            let scheme = SCHEMES.into_iter().find(|s| offered.contains(s))?;
            Some(Box::new(Signer {
                key: self.0.clone(),
                scheme,
            }))
        }

        fn algorithm(&self) -> SignatureAlgorithm {
            SignatureAlgorithm::RSA
        }
    }

    #[derive(Debug)]
    struct Signer {
        key: rsa::RsaPrivateKey,
        scheme: SignatureScheme,
    }

    impl rustls::sign::Signer for Signer {
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
            use rsa::pkcs1v15::SigningKey;
            use rsa::sha2::{Sha256, Sha384, Sha512};
            let key = self.key.clone();
            let signed = match self.scheme {
                SignatureScheme::RSA_PKCS1_SHA384 => SigningKey::<Sha384>::new(key)
                    .try_sign(message)
                    .map(|s| s.to_vec()),
                SignatureScheme::RSA_PKCS1_SHA512 => SigningKey::<Sha512>::new(key)
                    .try_sign(message)
                    .map(|s| s.to_vec()),
                _ => SigningKey::<Sha256>::new(key)
                    .try_sign(message)
                    .map(|s| s.to_vec()),
            };
            signed.map_err(|e| rustls::Error::General(format!("RSA signing failed: {e}")))
        }

        fn scheme(&self) -> SignatureScheme {
            self.scheme
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(files: &TlsFiles) -> String {
        match acceptor(files) {
            Ok(_) => panic!("accepted {files:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn files(dir: &Path, key: &[u8], cert: &[u8]) -> TlsFiles {
        std::fs::write(dir.join("key.pem"), key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        TlsFiles {
            private_key_file: dir.join("key.pem"),
            certificate_file: dir.join("cert.pem"),
        }
    }

    #[test]
    fn refuses_files_that_are_not_pem() {
        let dir = tempfile::tempdir().unwrap();
        let e = error(&files(dir.path(), b"not a key", b"not a cert"));
        assert!(e.contains("certificate_file"), "{e}");
        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = error(&files(dir.path(), b"not a key", cert));
        assert!(e.contains("private_key_file"), "{e}");
    }

    #[test]
    fn refuses_a_missing_file_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = TlsFiles {
            private_key_file: dir.path().join("none.pem"),
            certificate_file: dir.path().join("nothing.pem"),
        };
        let e = error(&f);
        assert!(e.contains("nothing.pem"), "{e}");
    }

    #[test]
    fn refuses_an_oversized_file() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'A'; MAX_PEM_BYTES as usize + 10];
        let e = error(&files(dir.path(), b"k", &big));
        assert!(e.contains("larger than"), "{e}");
    }
}
