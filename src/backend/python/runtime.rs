//! oxserve's own Python worker runtime (`python/` in the repository: `oxserve_worker.py`, the
//! `oxserve_runtime` package and the stdlib subset of TorchServe's `ts` package that handlers
//! import), embedded whole in the binary and written once to a private temporary folder that the
//! workers run from. TorchServe instead runs its worker from the installed `ts` package; oxserve
//! ships its own so that a bare `python3` without torch or torchserve serves handlers.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use include_dir::{include_dir, Dir, DirEntry};

/// Every file under `python/`, captured at build time (build.rs reruns when the folder changes, so
/// a file added there is embedded without a list to keep in step).
static PYTHON_DIR: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/python");

/// The metrics configuration a worker gets when `metrics_config` is unset; not under `python/`
/// because the server parses the same text for its own registry.
const DEFAULT_METRICS_YAML: (&str, &str) =
    ("default_metrics.yaml", crate::metrics::spec::DEFAULT_YAML);

/// Whether an embedded file belongs to the runtime: Python sources only, so byte-code caches or
/// editor files left in a developer's `python/` folder never ship.
fn is_runtime_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "py")
        && !path.components().any(|c| c.as_os_str() == "__pycache__")
}

/// The runtime's files as (relative path, contents).
pub(super) fn files() -> Vec<(&'static Path, &'static [u8])> {
    fn walk(dir: &'static Dir<'static>, out: &mut Vec<(&'static Path, &'static [u8])>) {
        for entry in dir.entries() {
            match entry {
                DirEntry::Dir(d) => walk(d, out),
                DirEntry::File(f) if is_runtime_file(f.path()) => {
                    out.push((f.path(), f.contents()))
                }
                DirEntry::File(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&PYTHON_DIR, &mut out);
    out.push((
        Path::new(DEFAULT_METRICS_YAML.0),
        DEFAULT_METRICS_YAML.1.as_bytes(),
    ));
    out
}

/// The runtime files on disk; removed when the last backend and loader using them are gone.
pub(super) struct RuntimeDir {
    pub(super) dir: tempfile::TempDir,
}

impl RuntimeDir {
    /// oxserve's worker program.
    pub(super) fn worker_script(&self) -> std::path::PathBuf {
        self.dir.path().join("oxserve_worker.py")
    }

    /// The program torchrun runs per rank: it ties the rank's life to torchrun's, then runs the
    /// worker program named by its first argument.
    pub(super) fn rank_wrapper(&self) -> std::path::PathBuf {
        self.dir.path().join("oxserve_rank.py")
    }

    /// The metrics configuration used when `metrics_config` is unset.
    pub(super) fn default_metrics_config(&self) -> std::path::PathBuf {
        self.dir.path().join(DEFAULT_METRICS_YAML.0)
    }
}

static RUNTIME: Mutex<Weak<RuntimeDir>> = Mutex::new(Weak::new());

/// Writes the embedded runtime into a private folder once, or returns the folder in use.
pub(super) fn runtime_dir() -> io::Result<Arc<RuntimeDir>> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = slot.upgrade() {
        return Ok(rt);
    }
    let dir = crate::tempdir::private(crate::tempdir::TempKind::Python)?;
    for (rel, text) in files() {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    let rt = Arc::new(RuntimeDir { dir });
    *slot = Arc::downgrade(&rt);
    Ok(rt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_is_written_once_and_removed_after_use() {
        let a = runtime_dir().unwrap();
        let b = runtime_dir().unwrap();
        assert_eq!(a.dir.path(), b.dir.path());
        for (rel, text) in files() {
            assert_eq!(std::fs::read(a.dir.path().join(rel)).unwrap(), text);
        }
        assert!(a.worker_script().is_file());
        assert!(a.rank_wrapper().is_file());
        assert!(a.default_metrics_config().is_file());
        let path = a.dir.path().to_path_buf();
        drop((a, b));
        // Other tests of this binary may still hold the folder; otherwise it is gone.
        let still_used = RUNTIME.lock().unwrap().upgrade().is_some();
        if !still_used {
            assert!(!path.exists());
        }
    }

    #[test]
    fn every_python_source_of_the_repository_is_embedded() {
        // The embedded set is the folder itself: compare with what is on disk now.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        let mut on_disk = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let rel = path.strip_prefix(&root).unwrap().to_path_buf();
                    if is_runtime_file(&rel) {
                        on_disk.push(rel);
                    }
                }
            }
        }
        on_disk.sort();
        let mut embedded: Vec<_> = files()
            .into_iter()
            .map(|(p, _)| p.to_path_buf())
            .filter(|p| p.extension().is_some_and(|e| e == "py"))
            .collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
        assert!(embedded.len() >= 17, "{embedded:?}");
        assert!(embedded.contains(&Path::new("ts/protocol/otf_message_handler.py").into()));
        assert!(!is_runtime_file(Path::new(
            "oxserve_runtime/__pycache__/service.cpython-311.pyc"
        )));
    }
}
