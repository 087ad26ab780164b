//! Worker output: reads a worker's stdout and stderr line by line (each line capped), records
//! `[METRICS]` lines in the registry, notices `Torch worker started.`, and forwards everything
//! else to MODEL_LOG attributed to the model, worker and (with oxserve's runtime) the requests it
//! belongs to. TorchServe's frontend does the same in its reader threads, without a line cap.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

use crate::backend::WorkerSpec;

/// The line a worker prints once its socket listens (each rank of a torchrun worker prints it;
/// TorchServe matches the end of the line).
pub(super) const STARTED_LINE: &str = "Torch worker started.";
pub(super) const METRICS_PREFIX: &str = "[METRICS]";

/// The last lines a worker printed, for error messages.
#[derive(Default)]
pub(super) struct Tail {
    pub(super) stdout: Option<String>,
    pub(super) stderr: Option<String>,
}

/// Reads `stream` line by line, handing each line to `on_line` with the number of bytes cut from
/// it. A line is kept up to `max` bytes; the rest of a longer one is read and thrown away as it
/// arrives, so a handler printing gigabytes without a newline costs `max` bytes of memory, not
/// gigabytes.
pub(super) async fn read_lines(
    stream: impl AsyncRead + Unpin,
    max: usize,
    mut on_line: impl FnMut(&str, Option<u64>),
) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut raw: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let mut emit = |raw: &mut Vec<u8>, total: &mut u64| {
        if raw.last() == Some(&b'\r') && *total == raw.len() as u64 {
            raw.pop();
            *total -= 1;
        }
        let line = String::from_utf8_lossy(raw);
        let cut = (*total > raw.len() as u64).then_some(*total);
        on_line(&line, cut);
        raw.clear();
        *total = 0;
    };
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => {
                if total > 0 {
                    emit(&mut raw, &mut total);
                }
                return;
            }
            Ok(chunk) => chunk,
        };
        let (part, used, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = max.saturating_sub(raw.len()).min(part.len());
        raw.extend_from_slice(&part[..room]);
        total += part.len() as u64;
        reader.consume(used);
        if end {
            emit(&mut raw, &mut total);
        }
    }
}

/// The line oxserve's runtime prints on stdout and stderr before a batch (`<prefix>id1,id2`)
/// and after it (`<prefix>` alone), so that the reader of each stream knows which requests the
/// lines in between belong to: the order of lines within one pipe is the order they were written,
/// which no timing on the server side could give. TorchServe's own worker prints none, and its
/// lines carry no request id.
const REQUEST_IDS_PREFIX: &str = "[OXSERVE_REQUEST_IDS]";

/// Which stream a reader forwards: TorchServe's reader thread names end in it, stderr is WARN.
#[derive(Clone, Copy, PartialEq)]
enum Stream {
    Stdout,
    Stderr,
}

/// Forwards one worker output line to MODEL_LOG (model_log.log, ts_log.log, the console), with
/// the model, version, worker and request it belongs to.
fn log_line(spec: &WorkerSpec, stream: Stream, line: &str, cut: Option<u64>, ids: Option<&str>) {
    // A cut line names its full length in `line_bytes`; the log files add the marker.
    let (model, version) = (&spec.model.model_name, &spec.model.model_version);
    match stream {
        Stream::Stdout => tracing::info!(
            target: crate::logging::MODEL_LOG,
            worker = %spec.name, stream = "stdout", model = %model, version = %version,
            request_id = ids, line_bytes = cut, "{line}"
        ),
        Stream::Stderr => tracing::warn!(
            target: crate::logging::MODEL_LOG,
            worker = %spec.name, stream = "stderr", model = %model, version = %version,
            request_id = ids, line_bytes = cut, "{line}"
        ),
    }
}

/// The longest worker output line kept: the files' cap once logging is set up, the configured one
/// otherwise (a backend used as a library).
fn max_line(spec: &WorkerSpec) -> usize {
    crate::logging::max_line().unwrap_or(spec.model.settings.log_max_line_bytes)
}

pub(super) async fn forward_stdout(
    stdout: impl AsyncRead + Unpin,
    spec: WorkerSpec,
    tail: Arc<Mutex<Tail>>,
    started: watch::Sender<usize>,
) {
    let mut ids: Option<String> = None;
    read_lines(stdout, max_line(&spec), |line, cut| {
        if let Some(rest) = line.strip_prefix(REQUEST_IDS_PREFIX) {
            ids = (!rest.is_empty()).then(|| rest.to_string());
            return;
        }
        if let Some(rest) = line.strip_prefix(METRICS_PREFIX) {
            spec.model
                .metrics
                .record_backend_line(rest, &spec.model.model_name);
            return;
        }
        if line.ends_with(STARTED_LINE) {
            // Counted: a torchrun worker is up once every rank listens.
            started.send_modify(|n| *n += 1);
        }
        if !line.trim().is_empty() {
            tail.lock().unwrap_or_else(|e| e.into_inner()).stdout = Some(line.to_string());
        }
        log_line(&spec, Stream::Stdout, line, cut, ids.as_deref());
    })
    .await;
}

pub(super) async fn forward_stderr(
    stderr: impl AsyncRead + Unpin,
    spec: WorkerSpec,
    tail: Arc<Mutex<Tail>>,
) {
    let mut ids: Option<String> = None;
    read_lines(stderr, max_line(&spec), |line, cut| {
        if let Some(rest) = line.strip_prefix(REQUEST_IDS_PREFIX) {
            ids = (!rest.is_empty()).then(|| rest.to_string());
            return;
        }
        if !line.trim().is_empty() {
            tail.lock().unwrap_or_else(|e| e.into_inner()).stderr = Some(line.to_string());
        }
        log_line(&spec, Stream::Stderr, line, cut, ids.as_deref());
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_huge_line_is_cut_without_being_kept() {
        // 8 MB without a newline, then a normal line, then a last line without a newline.
        let mut data = vec![b'x'; 8 << 20];
        data.extend_from_slice(b"\nsecond\r\nlast");
        let mut got = Vec::new();
        read_lines(&data[..], 1000, |line, cut| {
            got.push((line.to_string(), cut))
        })
        .await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, "x".repeat(1000));
        assert_eq!(got[0].1, Some(8 << 20));
        assert_eq!(got[1], ("second".to_string(), None));
        assert_eq!(got[2], ("last".to_string(), None));
    }
}
