//! The server's private temporary folders (unpacked models, the Python runtime, worker sockets,
//! workflow archives, Python dependencies), and the sweep of those that dead servers left behind.
//!
//! A server that stops removes its folders; one killed with SIGKILL (the OOM killer, a container
//! runtime's hard stop) cannot, and every such death used to leave an unpacked copy of each model
//! in the temporary folder: gigabytes per restart for an LLM's weights, until the disk is full.
//! TorchServe has the same leak (its /tmp/models/<id> folders). So each folder's name carries its
//! owner, `<prefix><pid>.<start>-<random>`, where `<start>` is the process's start time in clock
//! ticks after boot (/proc/<pid>/stat), which tells a reused pid from the owner; at start-up a
//! server removes the folders of owners that are no longer running. Nothing is written inside
//! the folders themselves: an unpacked model folder is the handler's working directory.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;

/// What a folder holds; its name prefix. One list: creation and the sweep both read it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TempKind {
    /// An unpacked model archive.
    Model,
    /// oxserve's Python worker runtime.
    Python,
    /// Python packages installed for a model (`install_py_dep_per_model`).
    PyDeps,
    /// An unpacked workflow archive.
    Workflow,
    /// Worker sockets (short: a unix socket path has at most 107 bytes).
    Socket,
}

impl TempKind {
    const ALL: [TempKind; 5] = [
        TempKind::Model,
        TempKind::Python,
        TempKind::PyDeps,
        TempKind::Workflow,
        TempKind::Socket,
    ];

    fn prefix(self) -> &'static str {
        match self {
            TempKind::Model => "oxserve-model-",
            TempKind::Python => "oxserve-python-",
            TempKind::PyDeps => "oxserve-pydeps-",
            TempKind::Workflow => "oxserve-workflow-",
            TempKind::Socket => "oxs-",
        }
    }
}

/// A fresh temporary folder only this user can enter (0700), whatever the umask: other local
/// users have no business reading a model or connecting to a worker. Its name names this process.
pub fn private(kind: TempKind) -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{}{}-", kind.prefix(), own_tag()))
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// `<pid>.<start>` of this process.
fn own_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        // Without /proc the start is 0, and the sweep (which needs /proc) never runs.
        format!("{pid}.{}", start_time(pid).unwrap_or(0))
    })
}

/// A process's start time in clock ticks after boot, if it is running.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    // starttime is field 22 of the line, the 20th after the name.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owner `(pid, start)` a folder name gives, if it is one of ours.
fn owner(name: &str) -> Option<(u32, u64)> {
    let rest = TempKind::ALL
        .iter()
        .find_map(|k| name.strip_prefix(k.prefix()))?;
    let (tag, random) = rest.split_once('-')?;
    if random.is_empty() || random.contains('-') {
        return None;
    }
    let (pid, start) = tag.split_once('.')?;
    Some((pid.parse().ok()?, start.parse().ok()?))
}

/// Removes the folders in `dir` (the temporary folder) that oxserve processes no longer running
/// left behind: only folders named by [`private`], owned by this user, whose owner's pid is gone
/// or now belongs to a process started at another time. Returns the owners' pids, one per folder
/// removed. Does nothing where /proc is missing (it could not tell the living from the dead).
pub fn sweep_stale(dir: &Path) -> Vec<u32> {
    let mut removed = Vec::new();
    if start_time(std::process::id()).is_none() {
        return removed;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return removed;
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, start)) = name.to_str().and_then(owner) else {
            continue;
        };
        if start_time(pid) == Some(start) {
            continue;
        }
        let path = entry.path();
        // Not through a link, and only our own user's folders.
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && m.uid() == uid => {}
            _ => continue,
        }
        match fs::remove_dir_all(&path) {
            Ok(()) => removed.push(pid),
            Err(e) => tracing::debug!("cannot remove {}: {e}", path.display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_carry_their_owner() {
        let d = private(TempKind::Model).unwrap();
        let name = d.path().file_name().unwrap().to_str().unwrap().to_string();
        let (pid, start) = owner(&name).expect(&name);
        assert_eq!(pid, std::process::id());
        assert_eq!(Some(start), start_time(pid));
        assert_eq!(
            fs::metadata(d.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn only_our_names_are_read_as_owned() {
        assert_eq!(owner("oxs-12.345-AbC123"), Some((12, 345)));
        assert_eq!(owner("oxserve-python-7.8-x"), Some((7, 8)));
        for other in [
            "oxs-AbC123",                // an older server's name: no owner, never removed
            "oxserve-model-12-AbC",      // no start time
            "oxserve-model-12.x-AbC",    // not a number
            "oxserve-model-12.3-",       // no random part
            "oxserve-model-12.3-a-b",    // more than tempfile makes
            "oxserve-download-12.3-abc", // not a kind of ours
            "something-12.3-abc",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
    }

    #[test]
    fn the_sweep_removes_dead_owners_folders_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let me = own_tag();
        let mine = dir.path().join(format!("oxserve-model-{me}-live01"));
        // pid 0 never runs a process of ours; a pid alive with another start time was reused.
        let dead = dir.path().join("oxserve-model-0.1-dead01");
        let reused = dir
            .path()
            .join(format!("oxs-{}.1-reuse1", std::process::id()));
        let old_style = dir.path().join("oxserve-model-Old123");
        let file = dir.path().join("oxserve-python-0.1-file01");
        for d in [&mine, &dead, &reused, &old_style] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("weights.bin"), b"x").unwrap();
        }
        fs::write(&file, b"not a folder").unwrap();
        let link = dir.path().join("oxserve-model-0.2-link01");
        std::os::unix::fs::symlink(&mine, &link).unwrap();

        let removed = sweep_stale(dir.path());
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dead.exists() && !reused.exists());
        assert!(
            mine.join("weights.bin").exists(),
            "a live owner's folder is kept"
        );
        assert!(old_style.exists() && file.exists());
        assert!(
            fs::symlink_metadata(&link).is_ok(),
            "a link is not followed or removed"
        );
    }
}
