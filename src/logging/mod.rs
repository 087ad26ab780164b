//! The server's logs: TorchServe's log files, an optional JSON form of them, and request ids.
//!
//! TorchServe writes, under `LOG_LOCATION` (default `logs/`), `access_log.log` (one line per
//! request), `model_log.log` (worker stdout/stderr) and `ts_log.log` (the server), with its
//! log4j2.xml's layouts and rollover. oxserve writes the same files with the same line layouts
//! (`log_format=text`, the default) or the same events as JSON lines (`log_format=json`), in the
//! foreground and when detached. The console keeps a human-readable log (stderr, `RUST_LOG`).
//!
//! How it differs from TorchServe (docs/compatibility.md): a `log4j2.xml` given with `--log-config`
//! is not read (the keys in docs/logging.md replace it); time stamps are UTC; ts_log.log does not
//! repeat the access and metric lines (they have files of their own); every message is capped at
//! `log_max_line_bytes`; at most `log_max_files` rolled files are kept.
//!
//! Nothing here blocks the request path: lines are formatted by the caller and handed to a writer
//! thread ([`writer`]) through a bounded queue; if the disk falls behind, lines are dropped and
//! counted, never waited for.

pub mod access;
pub mod writer;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{Config, LogFormat};
use writer::{FileSpec, Pace, Writer};

/// TorchServe's logger name for worker output; oxserve's worker output events use it as their
/// tracing target, so `RUST_LOG=MODEL_LOG=off` silences them on the console.
pub const MODEL_LOG: &str = "MODEL_LOG";
/// TorchServe's logger name for the access log (the name `logger` carries in JSON lines).
pub const ACCESS_LOG: &str = "ACCESS_LOG";

/// The files of [`Logs`], by index into its writer. One list: names, order and indices.
const ACCESS_FILE: usize = 0;
const MODEL_FILE: usize = 1;
const TS_FILE: usize = 2;
const FILES: [&str; 3] = ["access_log.log", "model_log.log", "ts_log.log"];

/// The process's log files, once [`init`] ran.
struct Logs {
    writer: Writer,
    format: LogFormat,
    max_line: usize,
    access: bool,
}

/// One per process: the worker output reader and the connection layer reach it without a handle
/// being threaded through the worker pool.
static LOGS: OnceLock<Logs> = OnceLock::new();

/// Opens the log files and installs the tracing subscriber: the console log on stderr when
/// `console` (the foreground; a detached server has no terminal and its files say it all), and
/// the files always.
pub fn init(config: &Config, console: bool) -> Result<(), InitError> {
    let mut files = Vec::new();
    for name in FILES {
        files.push(FileSpec {
            path: config.log_dir.join(name),
            max_bytes: config.log_max_bytes,
            keep: config.log_max_files,
            notice: Some(match (config.log_format, name) {
                (LogFormat::Text, "access_log.log") => dropped_access_text,
                (LogFormat::Text, _) => dropped_text,
                (LogFormat::Json, _) => dropped_json,
            }),
        });
    }
    let writer =
        Writer::spawn("oxserve-log-writer", files, Pace::Batched).map_err(InitError::Files)?;
    let logs = Logs {
        writer,
        format: config.log_format,
        max_line: config.log_max_line_bytes,
        access: config.enable_access_log,
    };
    if LOGS.set(logs).is_err() {
        return Err(InitError::Twice);
    }

    // The files take oxserve's own events at info and above (TorchServe's ts_log takes its own
    // packages at debug; oxserve's debug events are per-request detail not worth the disk), worker
    // output, and anything else at warn.
    let file_filter = tracing_subscriber::filter::Targets::new()
        .with_target("oxserve", Level::INFO)
        .with_target(MODEL_LOG, Level::TRACE)
        .with_default(Level::WARN);
    let console_layer = console.then(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Started as `torchserve` (src/torchserve.rs): the console log goes to stdout, where
        // TorchServe's log4j console writes and where its launcher waits for
        // "Model server started.".
        let to_stdout = std::env::var_os("OXSERVE_CONSOLE_STDOUT").is_some_and(|v| v == "1");
        let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || {
            if to_stdout {
                Box::new(std::io::stdout()) as Box<dyn std::io::Write>
            } else {
                Box::new(std::io::stderr())
            }
        });
        let ansi = if to_stdout {
            std::io::IsTerminal::is_terminal(&std::io::stdout())
        } else {
            std::io::IsTerminal::is_terminal(&std::io::stderr())
        };
        tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .with_filter(filter)
    });
    tracing_subscriber::registry()
        .with(console_layer)
        .with(FileLayer.with_filter(file_filter))
        .try_init()
        .map_err(|e| InitError::Subscriber(e.to_string()))
}

/// Why the logs could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Files(std::io::Error),
    #[error("logging is already set up")]
    Twice,
    /// Another tracing subscriber is installed (tracing's error type is only `Display`).
    #[error("{0}")]
    Subscriber(String),
}

/// Waits (a few seconds at most) until every line logged so far is in the files; call before
/// the process exits.
pub fn flush() {
    if let Some(logs) = LOGS.get() {
        logs.writer.flush(Duration::from_secs(5));
    }
}

/// A new request id: a random (version 4) UUID, TorchServe's form.
///
/// The bits come from fastrand's per-thread generator (seeded randomly per thread), not the OS:
/// an id must be unique, not secret, and a getrandom(2) call per request is measurable.
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = fastrand::u128(..).to_le_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // Hex by table, not `write!("{:02x}")`: sixteen trips through the formatter showed in the
    // request path's profile.
    let mut s = Vec::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push(b'-');
        }
        s.push(HEX[usize::from(byte >> 4)]);
        s.push(HEX[usize::from(byte & 0x0f)]);
    }
    String::from_utf8(s).expect("hex digits and dashes are ASCII")
}

/// Longest `x-request-id` a client may send.
pub const MAX_REQUEST_ID: usize = 128;

/// Whether a client's `x-request-id` is one oxserve carries: 1 to 128 characters of `A-Z a-z 0-9 - _ . : / + = @`.
///
/// The set covers UUIDs, hex ids and the usual tracing-id forms, and leaves out what would make
/// the id ambiguous where oxserve writes it: spaces and quotes (text logs) and commas (the id
/// lists the Python runtime prints to attribute worker output).
pub fn is_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// The error a refused `x-request-id` gets.
pub const REQUEST_ID_RULE: &str =
    "x-request-id must be 1 to 128 characters of A-Z a-z 0-9 - _ . : / + = @";

/// Cuts `msg` to at most `max` bytes (at a character boundary) and says so.
pub fn cap(msg: &str, max: usize) -> Cow<'_, str> {
    if msg.len() <= max {
        return Cow::Borrowed(msg);
    }
    let mut end = max;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}{}",
        &msg[..end],
        truncation_marker(msg.len() as u64, max)
    ))
}

/// What a cut line ends with: `total` bytes were printed, `kept` are in the log.
pub fn truncation_marker(total: u64, kept: usize) -> String {
    format!(" [oxserve: line truncated: {total} bytes, the first {kept} kept (log_max_line_bytes)]")
}

/// The longest message the files take (worker output readers cap to it before they keep a line).
pub fn max_line() -> Option<usize> {
    LOGS.get().map(|l| l.max_line)
}

/// What the inference API knows about a request that the access log should carry: put into the
/// response's extensions.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model: String,
    pub version: String,
    /// Time the request waited in the queue for a worker.
    pub queue: Option<Duration>,
    /// Time the backend took for the batch that carried it.
    pub backend: Option<Duration>,
}

/// One access log entry.
pub struct AccessRecord<'a> {
    pub remote: Option<SocketAddr>,
    pub method: &'a str,
    pub uri: &'a str,
    pub protocol: &'a str,
    pub status: u16,
    /// Arrival to response head (TorchServe's figure; a streamed body may still be going).
    pub duration: Duration,
    pub request_id: &'a str,
    pub model: Option<&'a ModelInfo>,
}

/// Whether access log lines are written (set up and `enable_access_log`).
pub fn access_enabled() -> bool {
    LOGS.get().is_some_and(|l| l.access)
}

/// Whether access lines carry the model's fields ([`ModelInfo`]): only JSON lines do, so the
/// inference path builds that record only then.
pub fn access_wants_model() -> bool {
    LOGS.get()
        .is_some_and(|l| l.access && matches!(l.format, LogFormat::Json))
}

/// Writes one access log line, if the access log is on.
pub fn access(r: &AccessRecord<'_>) {
    let Some(logs) = LOGS.get().filter(|l| l.access) else {
        return;
    };
    let uri = cap(r.uri, logs.max_line);
    let now = SystemTime::now();
    let line = match logs.format {
        LogFormat::Text => {
            // TorchServe: `/127.0.0.1:43558 "POST /predictions/m HTTP/1.1" 200 9` (Netty's address
            // form, then the time in whole milliseconds).
            let mut line = text_time(now);
            line.push_str(" - ");
            match r.remote {
                Some(a) => {
                    let _ = write!(line, "/{}:{}", a.ip(), a.port());
                }
                None => line.push('-'),
            }
            let _ = writeln!(
                line,
                " \"{} {} {}\" {} {}",
                r.method,
                uri,
                r.protocol,
                r.status,
                r.duration.as_millis()
            );
            line
        }
        LogFormat::Json => {
            let mut o = serde_json::Map::new();
            o.insert("time".into(), crate::timefmt::rfc3339_millis(now).into());
            o.insert("level".into(), "INFO".into());
            o.insert("logger".into(), ACCESS_LOG.into());
            o.insert("request_id".into(), r.request_id.into());
            o.insert(
                "remote".into(),
                r.remote.map(|a| a.to_string()).unwrap_or_default().into(),
            );
            o.insert("method".into(), r.method.into());
            o.insert("uri".into(), uri.as_ref().into());
            o.insert("protocol".into(), r.protocol.into());
            o.insert("status".into(), r.status.into());
            o.insert("duration_ms".into(), millis(r.duration).into());
            if let Some(m) = r.model {
                o.insert("model".into(), m.model.as_str().into());
                o.insert("version".into(), m.version.as_str().into());
                if let Some(q) = m.queue {
                    o.insert("queue_ms".into(), millis(q).into());
                }
                if let Some(b) = m.backend {
                    o.insert("backend_ms".into(), millis(b).into());
                }
            }
            json_line(o)
        }
    };
    logs.writer.write(ACCESS_FILE, line);
}

/// Milliseconds with microsecond precision, for JSON durations.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

fn json_line(o: serde_json::Map<String, serde_json::Value>) -> String {
    let mut s = serde_json::Value::Object(o).to_string();
    s.push('\n');
    s
}

/// log4j2's `%d{ISO8601}`: `2026-11-28T22:28:57,538` (UTC).
fn text_time(t: SystemTime) -> String {
    use std::cell::RefCell;
    // The date and time of day change once a second: each thread keeps the last second's text.
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let mut out = String::with_capacity(128);
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            let full = crate::timefmt::log4j_timestamp(secs, 0);
            last.1 = full[..full.len() - 4].to_string();
            last.0 = secs;
        }
        out.push_str(&last.1);
    });
    let _ = write!(out, ",{:03}", d.subsec_millis());
    out
}

fn dropped_text(n: u64) -> String {
    format!(
        "{} [WARN ] oxserve-log-writer oxserve::logging - {n} log lines were dropped: the disk did not keep up\n",
        text_time(SystemTime::now())
    )
}

fn dropped_access_text(n: u64) -> String {
    format!(
        "{} - oxserve: {n} access log lines were dropped: the disk did not keep up\n",
        text_time(SystemTime::now())
    )
}

fn dropped_json(n: u64) -> String {
    let mut o = serde_json::Map::new();
    o.insert(
        "time".into(),
        crate::timefmt::rfc3339_millis(SystemTime::now()).into(),
    );
    o.insert("level".into(), "WARN".into());
    o.insert("logger".into(), "oxserve::logging".into());
    o.insert(
        "message".into(),
        format!("{n} log lines were dropped: the disk did not keep up").into(),
    );
    o.insert("dropped".into(), n.into());
    json_line(o)
}

/// log4j2's `%-5p`.
fn level_text(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN ",
        Level::INFO => "INFO ",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

/// Collects an event's message and fields.
#[derive(Default)]
struct Fields {
    message: String,
    /// Other fields; numbers stay numbers in JSON lines.
    extra: Vec<(&'static str, serde_json::Value)>,
}

impl Fields {
    fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.extra.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.as_str())
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.extra.push((field.name(), value.into()));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.extra.push((field.name(), value.into()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.extra.push((field.name(), value.into()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.extra.push((field.name(), value.into()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.extra.push((field.name(), format!("{value:?}").into()));
        }
    }
}

/// Writes tracing events to ts_log.log, and worker output ([`MODEL_LOG`] events) to
/// model_log.log as well (TorchServe's MODEL_LOG logger is additive: its lines reach ts_log too).
struct FileLayer;

impl<S: Subscriber> Layer<S> for FileLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(logs) = LOGS.get() else {
            return;
        };
        let meta = event.metadata();
        let mut f = Fields::default();
        event.record(&mut f);
        let mut message = cap(&f.message, logs.max_line);
        // Worker output cut by its reader (python.rs) says how long it was.
        if let Some(total) = f.get("line_bytes").and_then(|v| v.as_u64()) {
            let kept = message.len();
            message.to_mut().push_str(&truncation_marker(total, kept));
        }
        let now = SystemTime::now();
        let model = meta.target() == MODEL_LOG;
        let line = match logs.format {
            LogFormat::Text => {
                let mut line = text_time(now);
                let _ = write!(line, " [{}] ", level_text(meta.level()));
                if model {
                    // TorchServe's thread name for a worker's reader: `W-9000-m_1.0-stdout`.
                    let _ = write!(
                        line,
                        "{}-{} {MODEL_LOG} - {message}",
                        f.get_str("worker").unwrap_or("W-?"),
                        f.get_str("stream").unwrap_or("stdout"),
                    );
                } else {
                    let thread = std::thread::current();
                    let _ = write!(
                        line,
                        "{} {} - {message}",
                        thread.name().unwrap_or("-"),
                        meta.target()
                    );
                    for (k, v) in &f.extra {
                        match v {
                            serde_json::Value::String(v) => {
                                let _ = write!(line, " {k}={}", cap(v, logs.max_line));
                            }
                            v => {
                                let _ = write!(line, " {k}={v}");
                            }
                        }
                    }
                }
                line.push('\n');
                line
            }
            LogFormat::Json => {
                let mut o = serde_json::Map::new();
                o.insert("time".into(), crate::timefmt::rfc3339_millis(now).into());
                o.insert("level".into(), meta.level().as_str().into());
                o.insert("logger".into(), meta.target().into());
                if !model {
                    let thread = std::thread::current();
                    o.insert("thread".into(), thread.name().unwrap_or("-").into());
                }
                o.insert("message".into(), message.as_ref().into());
                for (k, v) in f.extra {
                    let v = match v {
                        serde_json::Value::String(v) => cap(&v, logs.max_line).as_ref().into(),
                        v => v,
                    };
                    o.insert(k.into(), v);
                }
                json_line(o)
            }
        };
        if model {
            logs.writer.write(MODEL_FILE, line.clone());
        }
        logs.writer.write(TS_FILE, line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
        assert!(is_request_id(&a));
    }

    #[test]
    fn client_request_ids_are_checked() {
        assert!(is_request_id("req-1"));
        assert!(is_request_id("Root=1-5759e988/bd862e3f:x@y+z_w.v"));
        assert!(is_request_id(&"a".repeat(MAX_REQUEST_ID)));
        for bad in ["", "a b", "a,b", "a\"b", "é", "a\nb"] {
            assert!(!is_request_id(bad), "{bad:?}");
        }
        assert!(!is_request_id(&"a".repeat(MAX_REQUEST_ID + 1)));
        assert!(REQUEST_ID_RULE.contains(&format!(" {MAX_REQUEST_ID} ")));
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary_and_marked() {
        assert_eq!(cap("short", 10), "short");
        let cut = cap("ééééé", 3);
        assert!(cut.starts_with("é ["), "{cut}");
        assert!(cut.contains("10 bytes"), "{cut}");
    }

    #[test]
    fn json_times_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_369_000_538);
        assert_eq!(
            crate::timefmt::rfc3339_millis(t),
            "2025-11-28T22:30:00.538Z"
        );
        assert_eq!(text_time(t), "2025-11-28T22:30:00,538");
    }
}
