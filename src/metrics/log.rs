//! Metric log files: every metric event written as TorchServe's metric log lines.
//!
//! Frontend and system metrics go to `ts_metrics.log`, handler metrics to `model_metrics.log`, in the
//! folder named by METRICS_LOCATION (default `logs`, whatever LOG_LOCATION says, as TorchServe's log4j2.xml). Both files are created in every
//! metrics mode, as TorchServe's log4j2 appenders are; metric lines reach them in log and legacy
//! modes (prometheus mode serves them on /metrics instead, as TorchServe does). The lines go through the log writer thread (`crate::logging::writer`),
//! so recording a metric on the request path never waits for the disk; the files roll over by size
//! (`metrics_log_max_bytes`) and by day into gzip files, like the other logs, 5 kept.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::registry::{write_value, Series};
use crate::logging::writer::{FileSpec, Writer};

const KEEP: usize = 5;
const TS_FILE: usize = 0;
const MODEL_FILE: usize = 1;

/// Writes metric events to the two metric logs.
pub struct LogSink {
    writer: Writer,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

impl LogSink {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<LogSink> {
        // No drop notice in these files: their parsers expect metric lines only.
        let file = |name: &str| FileSpec {
            path: dir.join(name),
            max_bytes,
            keep: KEEP,
            notice: None,
        };
        let files = vec![file("ts_metrics.log"), file("model_metrics.log")];
        Ok(LogSink {
            writer: Writer::spawn("oxserve-metrics-log", files)?,
        })
    }

    /// Writes one event of `series` with value `value`, naming the request where there is one
    /// (handler metrics carry it).
    pub fn record(&self, series: &Series, value: f64, request_id: Option<&str>) {
        let line = format_line(series, value, request_id, SystemTime::now());
        let file = if series.family.model_origin {
            MODEL_FILE
        } else {
            TS_FILE
        };
        self.writer.write(file, line);
    }

    /// Waits (a few seconds at most) until the events recorded so far are in the files.
    pub fn flush(&self) {
        self.writer.flush(std::time::Duration::from_secs(5));
    }
}

/// `2024-05-30T21:46:03,626 - Name.Unit:1.0|#Dim:v,Dim:v|#hostname:h,[requestID:id,]timestamp:1717105563`
fn format_line(series: &Series, value: f64, request_id: Option<&str>, now: SystemTime) -> String {
    let meta = &series.family;
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut line = timestamp(since.as_secs(), since.subsec_millis());
    line.push_str(" - ");
    line.push_str(&meta.name);
    line.push('.');
    line.push_str(&meta.unit);
    line.push(':');
    write_value(value, &mut line);
    line.push_str("|#");
    let mut hostname = "";
    let mut first = true;
    for (name, value) in meta.label_names.iter().zip(&series.label_values) {
        if name.eq_ignore_ascii_case("hostname") {
            hostname = value;
            continue;
        }
        if !first {
            line.push(',');
        }
        first = false;
        line.push_str(name);
        line.push(':');
        line.push_str(value);
    }
    line.push_str("|#hostname:");
    line.push_str(hostname);
    if let Some(id) = request_id {
        line.push_str(",requestID:");
        line.push_str(id);
    }
    line.push_str(",timestamp:");
    line.push_str(&since.as_secs().to_string());
    line.push('\n');
    line
}

/// `YYYY-MM-DDTHH:MM:SS,mmm` in UTC, TorchServe's metric log time stamp.
pub(crate) fn timestamp(secs: u64, millis: u32) -> String {
    let (year, month, day, h, m, s) = civil_utc(secs);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02},{millis:03}")
}

/// (year, month, day, hour, minute, second) of a Unix time in UTC (civil-from-days), so that no
/// date crate is needed for the two fixed formats oxserve prints.
pub(crate) fn civil_utc(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, (rem / 60) % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(timestamp(1_717_105_563, 626), "2024-05-30T21:46:03,626");
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00,000");
    }
}
