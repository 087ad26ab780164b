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

use super::registry::{write_value, Series, Sink};
use crate::logging::writer::{FileSpec, Pace, Writer};
use crate::timefmt::log4j_timestamp;

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
            writer: Writer::spawn("oxserve-metrics-log", files, Pace::Prompt)?,
        })
    }
}

impl Sink for LogSink {
    /// Writes one event of `series` with value `value`, naming the request where there is one
    /// (handler metrics carry it).
    fn record(&self, series: &Series, value: f64, request_id: Option<&str>) {
        let line = format_line(series, value, request_id, SystemTime::now());
        let file = if series.family.model_origin {
            MODEL_FILE
        } else {
            TS_FILE
        };
        self.writer.write(file, line);
    }

    /// Waits (a few seconds at most) until the events recorded so far are in the files.
    fn flush(&self) {
        self.writer.flush(std::time::Duration::from_secs(5));
    }
}

/// `2024-05-30T21:46:03,626 - Name.Unit:1.0|#Dim:v,Dim:v|#hostname:h,[requestID:id,]timestamp:1717105563`
fn format_line(series: &Series, value: f64, request_id: Option<&str>, now: SystemTime) -> String {
    let meta = &series.family;
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut line = log4j_timestamp(since.as_secs(), since.subsec_millis());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::registry::{Family, FamilyDef};
    use crate::metrics::spec::Kind;
    use std::time::Duration;

    #[test]
    fn lines_are_torchserves() {
        let def = FamilyDef::new("HandlerTime", Kind::Gauge, "help")
            .unit("ms")
            .labels(&["ModelName", "Level", "Hostname"])
            .from_handlers();
        let series = Family::new(def, false, None).series(&["m", "Model", "host1"]);
        let at = UNIX_EPOCH + Duration::from_millis(1_717_105_563_626);
        assert_eq!(
            format_line(&series, 5.5, Some("r1"), at),
            "2024-05-30T21:46:03,626 - HandlerTime.ms:5.5|#ModelName:m,Level:Model|#hostname:host1,requestID:r1,timestamp:1717105563\n"
        );
    }
}
