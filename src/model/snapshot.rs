//! Config snapshots, TorchServe's SnapshotManager/FSSnapshotSerializer file for file: unless
//! `--ncs`, the server writes `{LOG_LOCATION}/config/<yyyyMMddHHmmssSSS>-startup.cfg` once the
//! start-up models are loaded, `...-snapshot.cfg` after every management call that changes the
//! models (register, unregister, scale, set-default) and `...-shutdown.cfg` at shutdown. Each is a
//! Java properties file: the server's properties plus `model_snapshot`, a JSON document
//! `{name, modelCount, created, models: {name: {version: {defaultVersion, marName, minWorkers,
//! maxWorkers, batchSize, maxBatchDelay, responseTimeout, startupTimeout, runtimeType}}}}`.
//! Started without `--ts-config` (and without TS_CONFIG_FILE), the server reads the newest
//! snapshot as its config; any config holding `model_snapshot` restores those models (and
//! `--models` is ignored), as TorchServe does.
//!
//! Differences from TorchServe, and why: the file is written to a temporary name and renamed
//! (a crash mid-write never leaves a half snapshot that the next start would restore); two
//! snapshots in the same millisecond get successive names instead of the second being dropped
//! (it holds the newer state); the time stamp is UTC (TorchServe: the JVM's time zone); a model
//! whose archive is missing from the store is skipped with an error in the log instead of
//! aborting the whole restore.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The properties key holding the JSON document.
pub const MODEL_SNAPSHOT: &str = "model_snapshot";

/// One model version's state, TorchServe's `Model.getModelState` field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelState {
    pub default_version: bool,
    pub mar_name: String,
    pub min_workers: u32,
    pub max_workers: u32,
    pub batch_size: u32,
    /// Milliseconds.
    pub max_batch_delay: u64,
    /// Seconds.
    #[serde(default)]
    pub response_timeout: Option<u64>,
    /// Seconds.
    #[serde(default)]
    pub startup_timeout: Option<u64>,
    #[serde(default)]
    pub runtime_type: Option<String>,
}

/// TorchServe's `Snapshot` class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    pub model_count: u32,
    #[serde(default)]
    pub created: u64,
    pub models: BTreeMap<String, BTreeMap<String, ModelState>>,
}

/// `{log_dir}/config`, where TorchServe keeps its snapshots.
pub fn dir(log_dir: &Path) -> PathBuf {
    log_dir.join("config")
}

/// The time stamp of a snapshot file name (`yyyyMMddHHmmssSSS-kind.cfg`), if it is one.
fn stamp_of(file_name: &str) -> Option<u64> {
    let (stamp, rest) = file_name.split_once('-')?;
    (stamp.len() == 17 && stamp.bytes().all(|b| b.is_ascii_digit()) && rest.ends_with(".cfg"))
        .then(|| stamp.parse().ok())
        .flatten()
}

/// The newest snapshot in `dir` (by the time stamp in its name, as TorchServe picks it).
pub fn last(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            stamp_of(&name).map(|s| (s, name, e.path()))
        })
        .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
        .map(|(_, _, p)| p)
}

/// `yyyyMMddHHmmssSSS` (UTC) of a point in time.
fn stamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (y, mo, day, h, mi, s) = crate::timefmt::civil_utc(d.as_secs());
    format!(
        "{y:04}{mo:02}{day:02}{h:02}{mi:02}{s:02}{:03}",
        d.subsec_millis()
    )
}

/// Parses a `model_snapshot` value.
pub fn parse(json: &str) -> Result<Snapshot, serde_json::Error> {
    serde_json::from_str(json)
}

/// Writes a snapshot of `kind` (startup, snapshot, shutdown) into `dir`: `props` plus
/// `model_snapshot`. Returns the file written.
pub fn write(
    dir: &Path,
    kind: &str,
    props: &BTreeMap<String, String>,
    models: BTreeMap<String, BTreeMap<String, ModelState>>,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let now = SystemTime::now();
    let mut millis = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    // A name already taken (two changes in one millisecond) moves on to the next millisecond.
    let (name, path) = loop {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(millis);
        let name = format!("{}-{kind}.cfg", stamp(t));
        let path = dir.join(&name);
        if !path.exists() {
            break (name, path);
        }
        millis += 1;
    };
    let snapshot = Snapshot {
        name: name.clone(),
        model_count: models.values().map(|v| v.len() as u32).sum(),
        created: millis,
        models,
    };
    let json = serde_json::to_string_pretty(&snapshot).map_err(std::io::Error::other)?;
    let mut text = String::from("#Saving snapshot\n");
    let mut entry = |k: &str, v: &str| {
        java_escape(k, true, &mut text);
        text.push('=');
        java_escape(v, false, &mut text);
        text.push('\n');
    };
    for (k, v) in props {
        if k != MODEL_SNAPSHOT && k != "tsConfigFile" {
            entry(k, v);
        }
    }
    entry(MODEL_SNAPSHOT, &json);
    let buf = text.into_bytes();
    // Owner-only: a snapshot holds the whole configuration, tokens included.
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&buf)?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Escapes `s` as java.util.Properties.store does (its saveConvert): in a value only a leading
/// space is escaped, so the pretty-printed model_snapshot keeps its spaces and reads back with
/// TorchServe's own tooling (test_snapshot.py's test_empty_runtime only unescapes `\:` and `\n`
/// before parsing the JSON); `=`, `:`, `#`, `!` and `\\` are escaped, control characters take
/// their letter, and anything outside printable ASCII becomes `\uXXXX` (store(OutputStream)).
fn java_escape(s: &str, is_key: bool, out: &mut String) {
    for (i, c) in s.chars().enumerate() {
        match c {
            ' ' if i == 0 || is_key => out.push_str("\\ "),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\x0c' => out.push_str("\\f"),
            '=' | ':' | '#' | '!' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(default: bool) -> ModelState {
        ModelState {
            default_version: default,
            mar_name: "m.mar".into(),
            min_workers: 1,
            max_workers: 2,
            batch_size: 4,
            max_batch_delay: 50,
            response_timeout: Some(120),
            startup_timeout: Some(120),
            runtime_type: Some("python".into()),
        }
    }

    #[test]
    fn written_file_reads_back_as_properties_and_json() {
        let d = tempfile::tempdir().unwrap();
        let mut props = BTreeMap::new();
        props.insert("inference_address".into(), "http://127.0.0.1:8080".into());
        props.insert(" odd key".into(), " v=1:#!\\ \t\u{e9}".into());
        let mut models = BTreeMap::new();
        models.insert(
            "m".to_string(),
            BTreeMap::from([("1.0".to_string(), state(true))]),
        );
        let a = write(d.path(), "snapshot", &props, models.clone()).unwrap();
        let b = write(d.path(), "snapshot", &props, models).unwrap();
        assert_ne!(
            a, b,
            "same-millisecond snapshots must not overwrite each other"
        );
        assert_eq!(last(d.path()).unwrap(), b);
        let text = std::fs::read_to_string(&b).unwrap();
        assert!(text.starts_with("#Saving snapshot\n"), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&b).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            text.contains("inference_address=http\\://127.0.0.1\\:8080"),
            "{text}"
        );
        let read = crate::config::parse_properties(&text).unwrap();
        assert_eq!(read[" odd key"], " v=1:#!\\ \t\u{e9}", "{text}");
        // TorchServe's test_empty_runtime reads the line its own way: it only unescapes `\:` and
        // `\n`, so spaces inside the value must not be escaped (java.util.Properties' rule).
        let line = text
            .lines()
            .find(|l| l.starts_with("model_snapshot="))
            .unwrap();
        let json = line["model_snapshot=".len()..]
            .replace("\\:", ":")
            .replace("\\n", "");
        let v: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["models"]["m"]["1.0"]["runtimeType"], "python");
        let snap = parse(&read[MODEL_SNAPSHOT]).unwrap();
        assert_eq!(snap.model_count, 1);
        assert_eq!(snap.models["m"]["1.0"], state(true));
        assert_eq!(snap.name, b.file_name().unwrap().to_string_lossy());
    }

    #[test]
    fn only_stamped_cfg_files_count_and_the_newest_wins() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "20261129010203004-startup.cfg",
            "20261129010203005-shutdown.cfg",
            "99999999999999999-notes.txt",
            "junk.cfg",
            "2026-snapshot.cfg",
        ] {
            std::fs::write(d.path().join(f), "").unwrap();
        }
        assert_eq!(
            last(d.path()).unwrap().file_name().unwrap(),
            "20261129010203005-shutdown.cfg"
        );
        assert!(last(&d.path().join("missing")).is_none());
        assert!(parse("{\"name\": 1}").is_err());
    }
}
