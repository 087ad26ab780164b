//! The server's private temporary folders (unpacked models, the Python runtime, worker sockets,
//! workflow archives, Python dependencies), and the sweep of those that dead servers left behind.
//!
//! A server that stops removes its folders; one killed with SIGKILL (the OOM killer, a container
//! runtime's hard stop) cannot, and every such death used to leave an unpacked copy of each model
//! in the temporary folder: gigabytes per restart for an LLM's weights, until the disk is full.
//! TorchServe has the same leak (its /tmp/models/<id> folders). So each folder's name carries its
//! owner, `<prefix><ns>.<pid>.<start>-<random>`: the process's pid namespace (the inode of
//! /proc/self/ns/pid), pid, and start time in clock ticks after boot (/proc/<pid>/stat), which
//! tells a reused pid from the owner. At start-up a server removes the folders of owners in its
//! own pid namespace that are no longer running; a folder of another namespace (a container
//! sharing the temporary folder) is left alone, since its pid means nothing here. Nothing is
//! written inside the folders themselves: an unpacked model folder is the handler's working
//! directory.

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
    /// Worker sockets. Short and without an owner (so never swept): a unix socket's path has at
    /// most 107 bytes, and `$TMPDIR` may be long already. It holds nothing but the sockets.
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

    /// Whether the folder's name carries its owner (and may be swept).
    fn owned(self) -> bool {
        self != TempKind::Socket
    }

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
    let prefix = if kind.owned() {
        format!("{}{}-", kind.prefix(), own_tag())
    } else {
        kind.prefix().to_string()
    };
    tempfile::Builder::new()
        .prefix(&prefix)
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// `<ns>.<pid>.<start>` of this process.
fn own_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        // Without /proc both are 0, and the sweep (which needs /proc) never runs.
        format!(
            "{}.{pid}.{}",
            pid_namespace().unwrap_or(0),
            start_time(pid).unwrap_or(0)
        )
    })
}

/// This process's pid namespace: the inode /proc/self/ns/pid names (`pid:[4026531836]`).
fn pid_namespace() -> Option<u64> {
    let link = fs::read_link("/proc/self/ns/pid").ok()?;
    let text = link.to_str()?;
    text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// A process's start time in clock ticks after boot, if it is running.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    // starttime is field 22 of the line, the 20th after the name.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The owner a folder name gives, `(pid namespace, pid, start)`, if it is one of ours.
fn owner(name: &str) -> Option<(u64, u32, u64)> {
    let rest = TempKind::ALL
        .iter()
        .filter(|k| k.owned())
        .find_map(|k| name.strip_prefix(k.prefix()))?;
    let (tag, random) = rest.split_once('-')?;
    if random.is_empty() || random.contains('-') {
        return None;
    }
    let mut parts = tag.split('.');
    let owner = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    parts.next().is_none().then_some(owner)
}

/// Removes the folders in `dir` (the temporary folder) that oxserve processes no longer running
/// left behind: only folders named by [`private`] in this process's pid namespace, owned by this
/// user, whose owner's pid is gone or now belongs to a process started at another time. Returns
/// the owners' pids, one per folder removed. Does nothing where /proc is missing (it could not
/// tell the living from the dead).
pub fn sweep_stale(dir: &Path) -> Vec<u32> {
    let mut removed = Vec::new();
    let Some(ns) = pid_namespace() else {
        return removed;
    };
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
        let Some((owner_ns, pid, start)) = name.to_str().and_then(owner) else {
            continue;
        };
        if owner_ns != ns || start_time(pid) == Some(start) {
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
        let (ns, pid, start) = owner(&name).expect(&name);
        assert_eq!(Some(ns), pid_namespace());
        assert_eq!(pid, std::process::id());
        assert_eq!(Some(start), start_time(pid));
        assert_eq!(
            fs::metadata(d.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn only_our_names_are_read_as_owned() {
        assert_eq!(owner("oxserve-model-9.12.345-AbC123"), Some((9, 12, 345)));
        assert_eq!(owner("oxserve-python-1.7.8-x"), Some((1, 7, 8)));
        for other in [
            "oxserve-model-AbC123",      // an older server's name: no owner, never removed
            "oxs-9.12.345-AbC123",       // socket folders carry no owner
            "oxserve-model-12.3-AbC",    // no namespace
            "oxserve-model-1.12.x-AbC",  // not a number
            "oxserve-model-1.2.3.4-AbC", // one field too many
            "oxserve-model-1.12.3-",     // no random part
            "oxserve-model-1.12.3-a-b",  // more than tempfile makes
            "oxserve-download-1.12.3-abc", // not a kind of ours
            "something-1.12.3-abc",
        ] {
            assert_eq!(owner(other), None, "{other}");
        }
    }

    #[test]
    fn the_sweep_removes_dead_owners_folders_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let me = own_tag();
        let ns = pid_namespace().unwrap();
        let mine = dir.path().join(format!("oxserve-model-{me}-live01"));
        // pid 0 never runs a process of ours; a pid alive with another start time was reused.
        let dead = dir.path().join(format!("oxserve-model-{ns}.0.1-dead01"));
        let reused = dir.path().join(format!(
            "oxserve-python-{ns}.{}.1-reuse1",
            std::process::id()
        ));
        // Another pid namespace (a container sharing the folder): its pids mean nothing here.
        let foreign = dir
            .path()
            .join(format!("oxserve-model-{}.0.1-other1", ns + 1));
        let old_style = dir.path().join("oxserve-model-Old123");
        let file = dir.path().join(format!("oxserve-python-{ns}.0.1-file01"));
        for d in [&mine, &dead, &reused, &foreign, &old_style] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("weights.bin"), b"x").unwrap();
        }
        fs::write(&file, b"not a folder").unwrap();
        let link = dir.path().join(format!("oxserve-model-{ns}.0.2-link01"));
        std::os::unix::fs::symlink(&mine, &link).unwrap();

        let removed = sweep_stale(dir.path());
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!dead.exists() && !reused.exists());
        assert!(
            mine.join("weights.bin").exists(),
            "a live owner's folder is kept"
        );
        assert!(foreign.exists(), "another namespace's folder is kept");
        assert!(old_style.exists() && file.exists());
        assert!(
            fs::symlink_metadata(&link).is_ok(),
            "a link is not followed or removed"
        );
    }
}
