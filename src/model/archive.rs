//! Model archives: `.mar` zip files and unpacked folders holding `MAR-INF/MANIFEST.json`.
//!
//! An archive is unpacked once into a private temporary folder that lives as long as the model;
//! every entry name is checked so that nothing is ever written outside that folder.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::model::loading::{Counting, Loading};

use serde::{Deserialize, Serialize};

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
    #[error("invalid model archive {path}: {reason}")]
    Invalid { path: String, reason: String },
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

/// Opens a `.mar` file (unpacking it into a fresh private folder) or a folder of the same layout.
pub fn open(path: &Path) -> Result<UnpackedArchive, ArchiveError> {
    open_observed(path, None)
}

/// [`open`], counting the archive bytes read into `loading` (progress), and stopping with an
/// error (the partial folder removed) once `loading` is cancelled.
pub fn open_observed(
    path: &Path,
    loading: Option<Arc<Loading>>,
) -> Result<UnpackedArchive, ArchiveError> {
    if !path.exists() {
        return Err(ArchiveError::NotFound(path.display().to_string()));
    }
    if path.is_dir() {
        let manifest = read_manifest(path)?;
        return Ok(UnpackedArchive {
            dir: path.to_path_buf(),
            manifest,
            _temp: None,
        });
    }
    let temp = tempfile::Builder::new()
        .prefix("oxserve-model-")
        .tempdir()
        .map_err(|e| invalid(path, format!("cannot create a temporary folder: {e}")))?;
    unpack_zip(path, temp.path(), loading)?;
    let manifest = read_manifest(temp.path()).map_err(|e| match e {
        ArchiveError::Invalid { reason, .. } => invalid(path, reason),
        other => other,
    })?;
    Ok(UnpackedArchive {
        dir: temp.path().to_path_buf(),
        manifest,
        _temp: Some(temp),
    })
}

fn read_manifest(dir: &Path) -> Result<Manifest, ArchiveError> {
    let file = dir.join("MAR-INF").join("MANIFEST.json");
    let text = fs::read_to_string(&file)
        .map_err(|e| invalid(dir, format!("cannot read MAR-INF/MANIFEST.json: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| invalid(dir, format!("MAR-INF/MANIFEST.json is not valid: {e}")))
}

/// The archive's model-config.yaml (manifest `configFile`, as torch-model-archiver's `--config-file`
/// stores it), as JSON; `None` when the manifest names none. TorchServe reads worker settings
/// (`minWorkers`, `batchSize`, ...) from it and hands all of it to handlers as
/// `context.model_yaml_config`.
pub fn model_config(dir: &Path, manifest: &Manifest) -> Result<Option<serde_json::Value>, String> {
    let Some(file) = manifest
        .model
        .config_file
        .as_deref()
        .filter(|f| !f.is_empty())
    else {
        return Ok(None);
    };
    let relative = safe_relative(file)?;
    let path = dir.join(relative);
    let text = fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the model config {file}: {e}"))?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| format!("the model config {file} is not valid YAML: {e}"))?;
    let json = serde_json::to_value(yaml)
        .map_err(|e| format!("the model config {file} cannot be represented as JSON: {e}"))?;
    Ok(Some(json))
}

/// A zip entry name as a relative path that stays inside the destination, or why not.
fn safe_relative(name: &str) -> Result<PathBuf, String> {
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(format!("entry {name:?} points outside the archive")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("entry {name:?} has an empty name"));
    }
    Ok(out)
}

fn unpack_zip(
    archive: &Path,
    dest: &Path,
    loading: Option<Arc<Loading>>,
) -> Result<(), ArchiveError> {
    let file = fs::File::open(archive).map_err(|e| invalid(archive, e.to_string()))?;
    let file = Counting::new(file, loading);
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| invalid(archive, format!("not a zip file: {e}")))?;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| invalid(archive, format!("corrupt entry {i}: {e}")))?;
        let relative = safe_relative(entry.name()).map_err(|r| invalid(archive, r))?;
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
        io::copy(&mut entry, &mut out).map_err(|e| {
            invalid(
                archive,
                format!("corrupt entry {:?}: {e}", relative.display()),
            )
        })?;
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
}
