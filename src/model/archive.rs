//! Model archives: `.mar` zip files and unpacked folders holding `MAR-INF/MANIFEST.json`.
//!
//! An archive is unpacked once into a private (0700) temporary folder that lives as long as the
//! model; every entry name is checked so that nothing is ever written outside that folder.
//!
//! An archive is outside input: its entry count and the bytes it unpacks to are capped
//! ([`Limits`], config keys `max_archive_entries` and `max_archive_unpacked_bytes`), counting the
//! bytes actually written rather than the sizes the zip headers claim, and MANIFEST.json and
//! model-config.yaml are read only up to [`crate::config::MAX_SMALL_FILE_BYTES`]. TorchServe has none of these
//! caps: a small zip bomb fills its disk, a large manifest its heap.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::model::loading::{Counting, Loading};

use serde::{Deserialize, Serialize};

use crate::config::{read_small_file, Config, ReadFileError};

/// What an archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of all entries together.
    pub max_unpacked_bytes: u64,
    /// Entries (files and folders).
    pub max_entries: u64,
}

impl Default for Limits {
    /// The documented defaults of the config keys.
    fn default() -> Limits {
        Limits {
            max_unpacked_bytes: crate::config::DEFAULT_MAX_ARCHIVE_UNPACKED_BYTES,
            max_entries: crate::config::DEFAULT_MAX_ARCHIVE_ENTRIES,
        }
    }
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_unpacked_bytes: config.max_archive_unpacked_bytes,
            max_entries: config.max_archive_entries,
        }
    }
}

/// `MAR-INF/MANIFEST.json` as torch-model-archiver writes it. Unknown fields are kept out of the way.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub created_on: String,
    #[serde(default)]
    pub runtime: String,
    #[serde(default)]
    pub model: ManifestModel,
    #[serde(default)]
    pub archiver_version: String,
}

/// The `model` object of a manifest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestModel {
    #[serde(default)]
    pub model_name: String,
    #[serde(default)]
    pub model_version: String,
    #[serde(default)]
    pub handler: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serialized_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<String>,
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("model archive not found: {0}")]
    NotFound(String),
    /// The archive's structure is refused (not a zip, over a limit, an entry outside it, a
    /// link). The reason is a sentence: the many limits of unpacking are only ever shown.
    #[error("invalid model archive {path}: {reason}")]
    Invalid { path: String, reason: String },
    /// A file of the archive (its manifest, an entry name) is refused.
    #[error("invalid model archive {path}: {source}")]
    File { path: String, source: FileError },
    /// The manifest's `configFile` is missing, outside the archive, or not YAML.
    #[error(transparent)]
    ModelConfig(FileError),
}

/// Why a file named by or inside an archive is refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Read(#[from] ReadFileError),
    #[error("MAR-INF/MANIFEST.json is not valid: {0}")]
    Manifest(serde_json::Error),
    #[error("the model config {file} is not valid YAML: {source}")]
    Yaml {
        file: String,
        source: serde_yaml::Error,
    },
    #[error("the model config {file} cannot be represented as JSON: {source}")]
    NotJson {
        file: String,
        source: serde_json::Error,
    },
    #[error("entry {0:?} points outside the archive")]
    Outside(String),
    #[error("entry {0:?} has an empty name")]
    EmptyName(String),
}

fn invalid(path: &Path, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// An archive unpacked (or a folder used in place), ready for workers.
#[derive(Debug)]
pub struct UnpackedArchive {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Keeps the private folder alive; `None` for folders used in place.
    _temp: Option<tempfile::TempDir>,
}

/// Opens a `.mar` file (unpacking it into a fresh private folder, within `limits`) or a folder of
/// the same layout (used in place: it is the operator's, so no limits apply).
pub fn open(path: &Path, limits: &Limits) -> Result<UnpackedArchive, ArchiveError> {
    open_observed(path, limits, None)
}

/// [`open`], counting the archive bytes read into `loading` (progress), and stopping with an
/// error (the partial folder removed) once `loading` is cancelled.
pub fn open_observed(
    path: &Path,
    limits: &Limits,
    loading: Option<Arc<Loading>>,
) -> Result<UnpackedArchive, ArchiveError> {
    if !path.exists() {
        return Err(ArchiveError::NotFound(path.display().to_string()));
    }
    if path.is_dir() {
        let manifest = read_manifest(path).map_err(|source| ArchiveError::File {
            path: path.display().to_string(),
            source,
        })?;
        return Ok(UnpackedArchive {
            dir: path.to_path_buf(),
            manifest,
            _temp: None,
        });
    }
    let temp = crate::tempdir::private(crate::tempdir::TempKind::Model)
        .map_err(|e| invalid(path, format!("cannot create a temporary folder: {e}")))?;
    unpack_zip(path, temp.path(), limits, loading)?;
    // Errors name the archive, not the temporary folder it was unpacked into.
    let manifest = read_manifest(temp.path()).map_err(|source| ArchiveError::File {
        path: path.display().to_string(),
        source,
    })?;
    Ok(UnpackedArchive {
        dir: temp.path().to_path_buf(),
        manifest,
        _temp: Some(temp),
    })
}

fn read_manifest(dir: &Path) -> Result<Manifest, FileError> {
    let file = dir.join("MAR-INF").join("MANIFEST.json");
    parse_manifest(&read_small_file(&file, "MAR-INF/MANIFEST.json")?)
}

/// Parses MANIFEST.json text.
pub fn parse_manifest(text: &str) -> Result<Manifest, FileError> {
    serde_json::from_str(text).map_err(FileError::Manifest)
}

/// The archive's model-config.yaml (manifest `configFile`, as torch-model-archiver's `--config-file`
/// stores it), as JSON; `None` when the manifest names none. TorchServe reads worker settings
/// (`minWorkers`, `batchSize`, ...) from it and hands all of it to handlers as
/// `context.model_yaml_config`.
pub fn model_config(
    dir: &Path,
    manifest: &Manifest,
) -> Result<Option<serde_json::Value>, ArchiveError> {
    let Some(file) = manifest
        .model
        .config_file
        .as_deref()
        .filter(|f| !f.is_empty())
    else {
        return Ok(None);
    };
    let relative = safe_relative(file).map_err(ArchiveError::ModelConfig)?;
    let path = dir.join(relative);
    let text = read_small_file(&path, &format!("the model config {file}"))
        .map_err(|e| ArchiveError::ModelConfig(e.into()))?;
    parse_model_config(&text, file)
        .map(Some)
        .map_err(ArchiveError::ModelConfig)
}

/// Parses model-config.yaml text (`file` names it in errors) into JSON.
pub fn parse_model_config(text: &str, file: &str) -> Result<serde_json::Value, FileError> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(|source| FileError::Yaml {
        file: file.to_string(),
        source,
    })?;
    serde_json::to_value(yaml).map_err(|source| FileError::NotJson {
        file: file.to_string(),
        source,
    })
}

/// A zip entry name as a relative path that stays inside the destination, or why not.
fn safe_relative(name: &str) -> Result<PathBuf, FileError> {
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(FileError::Outside(name.to_string())),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(FileError::EmptyName(name.to_string()));
    }
    Ok(out)
}

/// Unpacks a zip file into `dest` within `limits` (entry count, bytes written, no entry outside
/// `dest`, no symbolic link); counts progress into `loading`.
pub fn unpack_zip(
    archive: &Path,
    dest: &Path,
    limits: &Limits,
    loading: Option<Arc<Loading>>,
) -> Result<(), ArchiveError> {
    let file = fs::File::open(archive).map_err(|e| invalid(archive, e.to_string()))?;
    let file = Counting::new(file, loading);
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| invalid(archive, format!("not a zip file: {e}")))?;
    if zip.len() as u64 > limits.max_entries {
        return Err(invalid(
            archive,
            format!(
                "it holds {} entries, more than max_archive_entries ({})",
                zip.len(),
                limits.max_entries
            ),
        ));
    }
    let too_large = || {
        invalid(
            archive,
            format!(
                "it unpacks to more than max_archive_unpacked_bytes ({} bytes)",
                limits.max_unpacked_bytes
            ),
        )
    };
    // The sizes the headers declare refuse an honest large archive before anything is written;
    // the bytes actually written are what is enforced, since a header can lie.
    let mut declared = 0u64;
    for i in 0..zip.len() {
        let entry = zip
            .by_index_raw(i)
            .map_err(|e| invalid(archive, format!("corrupt entry {i}: {e}")))?;
        declared = declared.saturating_add(entry.size());
    }
    if declared > limits.max_unpacked_bytes {
        return Err(too_large());
    }
    let mut left = limits.max_unpacked_bytes;
    for i in 0..zip.len() {
        let entry = zip
            .by_index(i)
            .map_err(|e| invalid(archive, format!("corrupt entry {i}: {e}")))?;
        let relative = safe_relative(entry.name()).map_err(|source| ArchiveError::File {
            path: archive.display().to_string(),
            source,
        })?;
        if entry.is_symlink() {
            return Err(invalid(
                archive,
                format!("entry {:?} is a symbolic link", entry.name()),
            ));
        }
        let target = dest.join(&relative);
        if entry.is_dir() {
            fs::create_dir_all(&target).map_err(|e| invalid(archive, e.to_string()))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| invalid(archive, e.to_string()))?;
        }
        let mut out = fs::File::create(&target).map_err(|e| invalid(archive, e.to_string()))?;
        // One byte more than what is left tells "exactly the limit" from "past it".
        let written = io::copy(&mut io::Read::take(entry, left.saturating_add(1)), &mut out)
            .map_err(|e| {
                invalid(
                    archive,
                    format!("corrupt entry {:?}: {e}", relative.display()),
                )
            })?;
        if written > left {
            return Err(too_large());
        }
        left -= written;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_names_are_refused() {
        assert!(safe_relative("../evil").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../b").is_err());
        assert_eq!(safe_relative("./a/b.py").unwrap(), PathBuf::from("a/b.py"));
    }

    /// A zip of `entries`, deflated.
    fn zip_of(path: &Path, entries: &[(&str, &[u8])]) {
        use std::io::Write;
        let mut zip = zip::ZipWriter::new(fs::File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            zip.start_file(*name, opts).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    fn bytes_under(dir: &Path) -> u64 {
        let mut total = 0;
        for e in fs::read_dir(dir).unwrap().filter_map(Result::ok) {
            let meta = e.metadata().unwrap();
            total += if meta.is_dir() {
                bytes_under(&e.path())
            } else {
                meta.len()
            };
        }
        total
    }

    #[test]
    fn the_unpacked_size_counts_what_is_written_not_what_headers_claim() {
        let dir = tempfile::tempdir().unwrap();
        let mar = dir.path().join("liar.mar");
        let manifest = br#"{"model": {"modelName": "liar", "handler": "builtin"}}"#;
        zip_of(
            &mar,
            &[
                ("MAR-INF/MANIFEST.json", manifest),
                ("weights.bin", &vec![0u8; 2 << 20]),
            ],
        );
        // Every header claims 10 bytes of uncompressed data.
        let mut bytes = fs::read(&mar).unwrap();
        let mut i = 0;
        while i + 4 <= bytes.len() {
            match bytes[i..i + 4] {
                [0x50, 0x4b, 0x03, 0x04] => {
                    bytes[i + 22..i + 26].copy_from_slice(&10u32.to_le_bytes())
                }
                [0x50, 0x4b, 0x01, 0x02] => {
                    bytes[i + 24..i + 28].copy_from_slice(&10u32.to_le_bytes())
                }
                _ => {}
            }
            i += 1;
        }
        fs::write(&mar, &bytes).unwrap();
        let limits = Limits {
            max_unpacked_bytes: 1 << 20,
            max_entries: 10,
        };
        let dest = tempfile::tempdir().unwrap();
        let result = unpack_zip(&mar, dest.path(), &limits, None);
        let e = result.expect_err("a 2 MiB entry unpacked under a 1 MiB cap");
        assert!(e.to_string().contains("max_archive_unpacked_bytes"), "{e}");
        assert!(bytes_under(dest.path()) <= limits.max_unpacked_bytes + 1);
        // Honest headers are refused before anything is written.
        zip_of(
            &mar,
            &[
                ("MAR-INF/MANIFEST.json", manifest),
                ("w", &vec![0u8; 2 << 20]),
            ],
        );
        let dest = tempfile::tempdir().unwrap();
        let e = unpack_zip(&mar, dest.path(), &limits, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_archive_unpacked_bytes"), "{e}");
        assert_eq!(bytes_under(dest.path()), 0);
        let e = unpack_zip(
            &mar,
            dest.path(),
            &Limits {
                max_unpacked_bytes: 1 << 30,
                max_entries: 1,
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_archive_entries"), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const MANIFEST: &str = r#"{"createdOn": "28/11/2026 12:00:00", "runtime": "python", "model": {"modelName": "m", "modelVersion": "1.0", "handler": "h.py", "configFile": "c.yaml"}, "archiverVersion": "0.12.0"}"#;
        const MODEL_CONFIG: &str =
            "minWorkers: 1\nmaxWorkers: 3\nbatchSize: 2\nhandler:\n  labels: [a, b]\n";

        fn mutate(text: &str, edits: &[(proptest::sample::Index, char)]) -> String {
            let mut chars: Vec<char> = text.chars().collect();
            for (at, c) in edits {
                let i = at.index(chars.len());
                chars[i] = *c;
            }
            chars.into_iter().collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn manifests_never_panic(
                text in "\\PC{0,200}",
                edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<char>()), 1..6),
            ) {
                let _ = parse_manifest(&text);
                let _ = parse_manifest(&mutate(MANIFEST, &edits));
            }

            #[test]
            fn model_configs_never_panic(
                text in "\\PC{0,200}",
                edits in proptest::collection::vec((any::<proptest::sample::Index>(), "[ :\\-\\[\\]{}&*a-z0-9\n]"), 1..6),
            ) {
                let mut chars: Vec<char> = MODEL_CONFIG.chars().collect();
                for (at, s) in &edits {
                    let i = at.index(chars.len());
                    chars.splice(i..=i, s.chars());
                }
                let mutated: String = chars.into_iter().collect();
                for t in [text.as_str(), mutated.as_str()] {
                    if let Ok(v) = parse_model_config(t, "c.yaml") {
                        let _ = crate::config::ModelSettings::from_fields(&v, "c.yaml");
                    }
                }
            }

            #[test]
            fn entry_names_never_leave_the_folder(name in "\\PC{0,40}|(\\.\\./|/|\\./|[a-z]{1,3}/){0,5}[a-z.]{0,4}") {
                if let Ok(p) = safe_relative(&name) {
                    prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
                }
            }
        }
    }
}
