//! Log mode: metric events written as TorchServe's metric log lines.
//!
//! Frontend and system metrics go to `ts_metrics.log`, handler metrics to `model_metrics.log`, in the
//! folder named by METRICS_LOCATION / LOG_LOCATION (default `logs`). Each file is rotated by size
//! (`.1` .. `.5`), so a long-running server never fills the disk with metrics.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::registry::{write_value, Series};

const KEEP: u32 = 5;

struct RotatingFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl RotatingFile {
    fn open(path: PathBuf) -> RotatingFile {
        let (file, size) = match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => {
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                (Some(f), size)
            }
            Err(e) => {
                tracing::error!("cannot open metrics log {}: {e}", path.display());
                (None, 0)
            }
        };
        RotatingFile { path, file, size }
    }

    fn write(&mut self, line: &str, max_bytes: u64) {
        if self.size + line.len() as u64 > max_bytes && self.size > 0 {
            self.rotate();
        }
        if let Some(f) = &mut self.file {
            if f.write_all(line.as_bytes()).is_ok() {
                self.size += line.len() as u64;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        let _ = fs::remove_file(numbered(KEEP));
        for n in (1..KEEP).rev() {
            let _ = fs::rename(numbered(n), numbered(n + 1));
        }
        let _ = fs::rename(&self.path, numbered(1));
        *self = RotatingFile::open(self.path.clone());
    }
}

/// Writes metric events to the two metric logs.
pub struct LogSink {
    ts: Mutex<RotatingFile>,
    model: Mutex<RotatingFile>,
    max_bytes: u64,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

impl LogSink {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<LogSink> {
        fs::create_dir_all(dir)?;
        Ok(LogSink {
            ts: Mutex::new(RotatingFile::open(dir.join("ts_metrics.log"))),
            model: Mutex::new(RotatingFile::open(dir.join("model_metrics.log"))),
            max_bytes,
        })
    }

    /// Writes one event of `series` with value `value`, naming the request where there is one
    /// (handler metrics carry it).
    pub fn record(&self, series: &Series, value: f64, request_id: Option<&str>) {
        let line = format_line(series, value, request_id, SystemTime::now());
        let file = if series.family.model_origin {
            &self.model
        } else {
            &self.ts
        };
        file.lock().unwrap().write(&line, self.max_bytes);
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
fn timestamp(secs: u64, millis: u32) -> String {
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
    fn files_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ts_metrics.log");
        let mut f = RotatingFile::open(path.clone());
        let line = "x".repeat(99) + "\n";
        for _ in 0..25 {
            f.write(&line, 1000);
        }
        // 25 lines of 100 bytes with a 1000-byte limit: two full files rotated, 5 lines current.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 500);
        assert_eq!(
            std::fs::metadata(dir.path().join("ts_metrics.log.1"))
                .unwrap()
                .len(),
            1000
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("ts_metrics.log.2"))
                .unwrap()
                .len(),
            1000
        );
        assert!(!dir.path().join("ts_metrics.log.3").exists());
        for _ in 0..100 {
            f.write(&line, 1000);
        }
        assert!(
            !dir.path().join("ts_metrics.log.6").exists(),
            "only {KEEP} old files are kept"
        );
    }

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(timestamp(1_717_105_563, 626), "2024-05-30T21:46:03,626");
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00,000");
    }
}
