//! TorchServe's token authorization: a management key, an inference key and an API key, written to
//! `key_file.json` (mode 0600) in the working directory, sent as `Authorization: Bearer <key>`.
//!
//! A bad or missing key answers as TorchServe 0.12 does: 400 `InvalidKeyException` with its message
//! (clients and TorchServe's own tests check for it). Differences from TorchServe, on purpose: keys
//! are compared in constant time, and `/ping` needs no key so health probes keep working.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorKind};
use super::{parse_query, AppState};

/// Which API a key opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Inference,
    Management,
}

#[derive(Debug, Clone)]
struct Key {
    value: String,
    expires: SystemTime,
}

/// The server's keys and the file that shows them to the operator.
#[derive(Debug)]
pub struct Tokens {
    management: RwLock<Key>,
    inference: RwLock<Key>,
    api: String,
    lifetime: Duration,
    file: PathBuf,
}

/// 16 random bytes from the kernel, hex-encoded.
fn random_key() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (y, mo, day, h, mi, s) = crate::timefmt::civil_utc(d.as_secs());
    format!(
        "{y:04}-{mo:02}-{day:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        d.subsec_micros()
    )
}

impl Tokens {
    /// Generates the three keys and writes `key_file.json` into `dir`.
    pub fn create(dir: &Path, lifetime: Duration) -> std::io::Result<Tokens> {
        let expires = SystemTime::now() + lifetime;
        let tokens = Tokens {
            management: RwLock::new(Key {
                value: random_key()?,
                expires,
            }),
            inference: RwLock::new(Key {
                value: random_key()?,
                expires,
            }),
            api: random_key()?,
            lifetime,
            file: dir.join("key_file.json"),
        };
        tokens.write_file()?;
        Ok(tokens)
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    fn as_json(&self) -> serde_json::Value {
        let m = self.management.read().unwrap();
        let i = self.inference.read().unwrap();
        serde_json::json!({
            "management": {"key": m.value, "expiration time": rfc3339(m.expires)},
            "inference": {"key": i.value, "expiration time": rfc3339(i.expires)},
            "API": {"key": self.api},
        })
    }

    /// Writes the keys to a fresh file (created 0600 by tempfile) next to `key_file.json` and
    /// renames it over: an existing key file with lax permissions (0644) is replaced, never
    /// written into, and a reader never sees a half-written file.
    fn write_file(&self) -> std::io::Result<()> {
        use std::io::Write;
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let mut f = tempfile::Builder::new()
            .prefix(".key_file.")
            .suffix(".json")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .tempfile_in(dir)?;
        f.write_all(format!("{:#}\n", self.as_json()).as_bytes())?;
        f.as_file().sync_all()?;
        f.persist(&self.file).map_err(|e| e.error)?;
        Ok(())
    }

    /// Removes the key file (at shutdown, as TorchServe does).
    pub fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.file);
    }

    /// Checks a request's bearer key against the key of `scope`.
    pub(crate) fn check(&self, scope: Scope, given: &str) -> Result<(), &'static str> {
        let key = match scope {
            Scope::Inference => self.inference.read().unwrap().clone(),
            Scope::Management => self.management.read().unwrap().clone(),
        };
        if !bool::from(given.as_bytes().ct_eq(key.value.as_bytes())) {
            return Err(TOKEN_FAILED);
        }
        if SystemTime::now() > key.expires {
            return Err(
                "Token Authorization failed: the key has expired; get a new one from the token API",
            );
        }
        Ok(())
    }

    /// Replaces one key (the token API), returning the new key file contents.
    fn rotate(&self, scope: Scope) -> std::io::Result<serde_json::Value> {
        let key = Key {
            value: random_key()?,
            expires: SystemTime::now() + self.lifetime,
        };
        match scope {
            Scope::Inference => *self.inference.write().unwrap() = key,
            Scope::Management => *self.management.write().unwrap() = key,
        }
        self.write_file()?;
        Ok(self.as_json())
    }
}

/// TorchServe's message for every failed token check, HTTP and gRPC alike.
pub(crate) const TOKEN_FAILED: &str =
    "Token Authorization failed. Token either incorrect, expired, or not provided correctly";

fn bearer(req: &Request) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// TorchServe's answer to a failed token check (TokenAuthorizationHandler): 400, not 401, because
/// scripts and TorchServe's own tests written against it test for exactly that. The
/// `WWW-Authenticate` header still tells HTTP clients that a bearer key is what is missing.
fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(ErrorKind::InvalidKey, message).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn require(state: &AppState, scope: Scope, req: Request, next: Next) -> Response {
    if let Some(tokens) = &state.tokens {
        let exempt = scope == Scope::Inference && req.uri().path() == "/ping";
        if !exempt {
            if let Err(why) = tokens.check(scope, bearer(&req)) {
                return unauthorized(why);
            }
        }
    }
    next.run(req).await
}

/// Middleware of the inference listener.
pub async fn inference(State(state): State<AppState>, req: Request, next: Next) -> Response {
    require(&state, Scope::Inference, req, next).await
}

/// Middleware of the management listener (the token API checks the API key itself).
pub async fn management(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/token" {
        return next.run(req).await;
    }
    require(&state, Scope::Management, req, next).await
}

/// `GET|POST /token?type=management|inference` with the API key: a new key of that type.
pub async fn token_api(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    req: Request,
) -> Response {
    let Some(tokens) = state.tokens.clone() else {
        return ApiError::not_found("token authorization is disabled").into_response();
    };
    if !bool::from(bearer(&req).as_bytes().ct_eq(tokens.api.as_bytes())) {
        return unauthorized("Token Authorization failed: the token API needs the API key");
    }
    let kind = match parse_query(q.as_deref()) {
        Ok(pairs) => pairs.into_iter().find(|(k, _)| k == "type").map(|(_, v)| v),
        Err(e) => return e.into_response(),
    };
    let scope = match kind.as_deref() {
        Some("management") => Scope::Management,
        Some("inference") => Scope::Inference,
        other => {
            return ApiError::bad_request(format!(
                "Parameter type must be management or inference, got {other:?}"
            ))
            .into_response()
        }
    };
    match tokens.rotate(scope) {
        Ok(keys) => Json(keys).into_response(),
        Err(e) => ApiError::internal(format!("cannot write the key file: {e}")).into_response(),
    }
}

/// Creates the keys when token authorization is on (the default, as in TorchServe 0.12).
pub fn setup(config: &crate::config::Config) -> std::io::Result<Option<Arc<Tokens>>> {
    if config.disable_token_authorization {
        tracing::info!(
            "Token Authorization Disabled (disable_token_authorization=true, --disable-token-auth or TS_DISABLE_TOKEN_AUTHORIZATION): the inference and management APIs take requests from anyone who reaches them"
        );
        return Ok(None);
    }
    let dir = std::env::current_dir()?;
    let tokens = Tokens::create(&dir, config.token_expiration)?;
    tracing::info!(
        "Token Authorization Enabled: keys are in {} (send `Authorization: Bearer <key>`; turn it off with --disable-token-auth or disable_token_authorization=true)",
        tokens.file().display()
    );
    Ok(Some(Arc::new(tokens)))
}

/// A ready-to-paste first prediction for `inference` (the demo model's), with the inference key
/// read from the key file at the moment it runs, so no key lands in a log file and a rotated key
/// still works. `jq` is what TorchServe's own docs use to read key_file.json.
pub fn first_prediction(key_file: Option<&Path>, url: &str) -> String {
    match key_file {
        Some(file) => format!(
            "curl -H \"Authorization: Bearer $(jq -r .inference.key {})\" -X POST {url} -d 'I love this'",
            file.display()
        ),
        None => format!("curl -X POST {url} -d 'I love this'"),
    }
}

/// The same with the current key written out, for an operator at a terminal (never logged).
pub fn first_prediction_inline(tokens: &Tokens, url: &str) -> String {
    let key = tokens.inference.read().unwrap().value.clone();
    format!("curl -H 'Authorization: Bearer {key}' -X POST {url} -d 'I love this'")
}
