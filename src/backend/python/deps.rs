//! Per-model Python dependencies (`install_py_dep_per_model=true`): the archive's
//! `requirementsFile` (named by MANIFEST.json, as torch-model-archiver's `-r` writes it) is
//! pip-installed once per model version, before its workers start, into a private folder that the
//! workers find on PYTHONPATH after the model folder and that is removed with the version.
//!
//! TorchServe runs `python -m pip install -U -t <model dir> -r <requirements>` in its frontend
//! (ModelManager.setupModelDependencies) and answers a failure with 400 ModelException "Custom pip
//! package installation failed for model <name>". oxserve runs the same command with `-t` naming a
//! folder of its own, so a model folder used in place (the operator's) is never written to; and
//! it adds what TorchServe lacks: a time limit (`install_py_dep_timeout`), the pip output in
//! model_log.log, the reason in the error message, and a check of the requirements that refuses
//! local paths outside the archive and options that disable TLS or replace the machine's index
//! (docs/security.md). pip's own configuration (pip.conf, `PIP_INDEX_URL`, proxies) reaches pip
//! unchanged through the environment.

use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::process::Command;
use tokio::time::timeout;

use super::{logs, process};
use crate::backend::{BackendError, ModelSpec};

/// Nested `-r`/`-c` files followed at most this deep (pip has no limit; a loop of files would
/// otherwise never end the check).
const MAX_NESTING: usize = 8;

/// The private folder the dependencies of one model version are installed in.
pub(super) struct Dependencies {
    dir: tempfile::TempDir,
}

impl Dependencies {
    pub(super) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The requirements file the manifest names, relative to the model folder, when
/// `install_py_dep_per_model` asks for an install (TorchServe installs nothing otherwise, and
/// nothing for an archive whose manifest names no file, even one holding a requirements.txt).
pub(super) fn requirements_file(spec: &ModelSpec) -> Option<&str> {
    if !spec.settings.install_py_dep_per_model {
        return None;
    }
    spec.manifest
        .model
        .requirements_file
        .as_deref()
        .filter(|f| !f.trim().is_empty())
}

/// The message every failure starts with (TorchServe's, word for word).
fn failed(model: &str) -> String {
    format!("Custom pip package installation failed for model {model}")
}

/// Installs the requirements of `spec`'s model, or returns None when there is nothing to install.
pub(super) async fn install(spec: &Arc<ModelSpec>) -> Result<Option<Dependencies>, BackendError> {
    let Some(file) = requirements_file(spec) else {
        return Ok(None);
    };
    let fail = |why: String| BackendError::Load(format!("{}: {why}", failed(&spec.model_name)));
    let model_dir = std::path::absolute(&spec.model_dir).unwrap_or_else(|_| spec.model_dir.clone());
    let requirements = inside(&model_dir, &model_dir, file).ok_or_else(|| {
        fail(format!(
            "requirementsFile {file:?} of the manifest is not a path inside the archive"
        ))
    })?;
    let check_dir = model_dir.clone();
    let checked = requirements.clone();
    tokio::task::spawn_blocking(move || check_requirements(&check_dir, &checked, 0))
        .await
        .map_err(|e| fail(format!("checking the requirements failed: {e}")))?
        .map_err(|e| fail(e.to_string()))?;
    let dir = crate::tempdir::private(crate::tempdir::TempKind::PyDeps)
        .map_err(|e| fail(format!("cannot create a folder for the packages: {e}")))?;

    let python = &spec.settings.python_executable;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "install", "-U", "--no-input"])
        .args(["--disable-pip-version-check", "--no-warn-script-location"])
        .arg("-t")
        .arg(dir.path())
        .arg("-r")
        .arg(&requirements)
        // Relative paths in the requirements name files of the archive, as in TorchServe (whose
        // pip runs in the model folder).
        .current_dir(&model_dir)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    process::die_with_parent(&mut cmd);
    tracing::info!(
        "model {} version {}: installing {file} with {python} -m pip into {}",
        spec.model_name,
        spec.model_version,
        dir.path().display()
    );
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run {python:?} -m pip: {e}")))?;
    let pid = child.id().unwrap_or(0);
    // If this future is dropped while pip runs (the registration abandoned), pip's whole group
    // goes; kill_on_drop alone would only stop pip itself.
    let mut guard = GroupGuard(Some(pid));
    let last = Arc::new(Mutex::new(LastLines::default()));
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let readers = [
        tokio::spawn(forward(stdout, spec.clone(), "stdout", last.clone())),
        tokio::spawn(forward(stderr, spec.clone(), "stderr", last.clone())),
    ];
    let limit = spec.settings.install_py_dep_timeout;
    let status = match timeout(limit, child.wait()).await {
        Ok(status) => {
            // Reaped: the group id is no longer ours to signal.
            guard.0 = None;
            status
        }
        Err(_) => {
            // pip may have started build processes of its own: the whole group goes (before
            // the reap, while the group id cannot belong to anyone else).
            if let Some(pid) = guard.0.take() {
                process::kill_group(pid);
            }
            let _ = child.kill().await;
            Err(std::io::Error::other(format!(
                "pip did not finish within {} s (install_py_dep_timeout)",
                limit.as_secs()
            )))
        }
    };
    for reader in readers {
        let _ = timeout(std::time::Duration::from_secs(2), reader).await;
    }
    let last = std::mem::take(&mut *last.lock().unwrap_or_else(|e| e.into_inner()));
    let detail = last
        .telling
        .or(last.stderr)
        .map(|l| format!("; last output: {l}"))
        .unwrap_or_default();
    match status {
        Ok(s) if s.success() => {
            tracing::info!(
                "Installed custom pip packages for model {} version {}",
                spec.model_name,
                spec.model_version
            );
            Ok(Some(Dependencies { dir }))
        }
        Ok(s) => {
            let e = fail(format!("pip {s}{detail}"));
            tracing::error!("{e} (the pip output is in model_log.log)");
            Err(e)
        }
        Err(e) => {
            let e = fail(format!("{e}{detail}"));
            tracing::error!("{e}");
            Err(e)
        }
    }
}

/// Kills a process group when dropped, unless disarmed (`None`).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            process::kill_group(pid);
        }
    }
}

/// The lines of pip's output that best say why it failed.
#[derive(Default)]
struct LastLines {
    /// The last `ERROR:` line, or stdout line.
    telling: Option<String>,
    /// The last stderr line (a Python error before pip ran: `No module named pip`).
    stderr: Option<String>,
}

/// Forwards pip's output to MODEL_LOG as `pip-<model>_<version>-<stream>` lines, keeping the last
/// non-empty one (pip's `ERROR:` line when it fails) for the error message.
async fn forward(
    stream: impl tokio::io::AsyncRead + Unpin,
    spec: Arc<ModelSpec>,
    name: &'static str,
    last: Arc<Mutex<LastLines>>,
) {
    let worker = format!("pip-{}_{}", spec.model_name, spec.model_version);
    let max = crate::logging::max_line().unwrap_or(spec.settings.log_max_line_bytes);
    logs::read_lines(stream, max, |line, cut| {
        if line.trim().is_empty() {
            return;
        }
        // pip's warnings (stderr) are not the error; its `ERROR:` lines and stdout are.
        {
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if name == "stdout" || line.starts_with("ERROR") {
                last.telling = Some(line.to_string());
            } else {
                last.stderr = Some(line.to_string());
            }
        }
        if name == "stderr" {
            tracing::warn!(
                target: crate::logging::MODEL_LOG,
                worker = %worker, stream = name, model = %spec.model_name,
                version = %spec.model_version, line_bytes = cut, "{line}"
            );
        } else {
            tracing::info!(
                target: crate::logging::MODEL_LOG,
                worker = %worker, stream = name, model = %spec.model_name,
                version = %spec.model_version, line_bytes = cut, "{line}"
            );
        }
    })
    .await;
}

/// `path` (relative to `base`, a folder inside `root`) as an absolute path, if it stays inside
/// `root` by its words alone: no absolute path, no `~`, no `..` climbing out.
fn inside(root: &Path, base: &Path, path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    if path.starts_with('~') || p.is_absolute() {
        return None;
    }
    let mut out = base.to_path_buf();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    out.starts_with(root).then_some(out)
}

/// pip options that tell it where to fetch from, with their short forms.
const INDEX_OPTIONS: &[&str] = &["--index-url", "-i"];
/// pip options that turn certificate checks off.
const INSECURE_OPTIONS: &[&str] = &["--trusted-host"];
/// pip options whose value is a file of more requirements or constraints.
const FILE_OPTIONS: &[&str] = &["-r", "--requirement", "-c", "--constraint"];

/// Why a requirements file of the archive is refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequirementsError {
    #[error(transparent)]
    Read(#[from] crate::config::ReadFileError),
    /// `file` as the archive names it (never the temporary folder), `line` from 1.
    #[error("{file} line {line}: {why}")]
    Line {
        file: String,
        line: usize,
        why: Refused,
    },
}

/// What on a requirements line is refused (docs/security.md).
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    #[error("environment variables (${{...}}) are not allowed")]
    EnvironmentVariable,
    #[error("{0} would replace the package index this machine is configured for (use --extra-index-url)")]
    IndexUrl(String),
    #[error("{0} turns off TLS checks")]
    NoTls(String),
    #[error("{option} {file:?} is outside the archive")]
    IncludeOutside { option: String, file: String },
    #[error("requirement files nest deeper than {MAX_NESTING}")]
    TooDeep,
    #[error("{0:?} points at a local file outside the archive")]
    FileUrlOutside(String),
    #[error("{0:?} is fetched without TLS (use https://)")]
    PlainHttp(String),
    #[error("{0:?} is a local path outside the archive")]
    PathOutside(String),
}

/// Checks a requirements file of the archive, and the files it includes, for what oxserve refuses
/// (docs/security.md): a local path outside the archive (an absolute path, `~`, `..` climbing out,
/// a `file:` URL outside), an environment variable (pip expands `${VAR}`, so it could name any
/// path), `--index-url` (the machine's configured index stays the one packages come from: an
/// archive may add one with `--extra-index-url`, as TorchServe's examples do), `--trusted-host`
/// (no TLS check) and a plain-http index. Errors name the file, line and reason.
pub(super) fn check_requirements(
    root: &Path,
    file: &Path,
    depth: usize,
) -> Result<(), RequirementsError> {
    let shown = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let text = crate::config::read_small_file(file, &shown)?;
    let base = file.parent().unwrap_or(root);
    for (number, line) in logical_lines(&text) {
        let refuse = |why: Refused| {
            Err(RequirementsError::Line {
                file: shown.clone(),
                line: number,
                why,
            })
        };
        if line.contains("${") {
            return refuse(Refused::EnvironmentVariable);
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let mut i = 0;
        while i < tokens.len() {
            let token = tokens[i];
            // `--opt=value`, `--opt value`, and `-rfile` for the one-letter forms.
            let (option, value) = match token.split_once('=') {
                Some((o, v)) if o.starts_with("--") => (Some(o), Some(v.to_string())),
                _ if token.starts_with("--") => (Some(token), value_after(&tokens, &mut i)),
                _ if token.len() > 2 && token.starts_with('-') && !token.starts_with("--") => {
                    (Some(&token[..2]), Some(token[2..].to_string()))
                }
                _ if token.len() == 2 && token.starts_with('-') => {
                    (Some(token), value_after(&tokens, &mut i))
                }
                _ => (None, None),
            };
            i += 1;
            let value = match (option, value) {
                (Some(o), _) if INDEX_OPTIONS.contains(&o) => {
                    return refuse(Refused::IndexUrl(o.to_string()))
                }
                (Some(o), _) if INSECURE_OPTIONS.contains(&o) => {
                    return refuse(Refused::NoTls(o.to_string()))
                }
                (Some(o), Some(v)) if FILE_OPTIONS.contains(&o) => {
                    let Some(nested) = inside(root, base, &v) else {
                        return refuse(Refused::IncludeOutside {
                            option: o.to_string(),
                            file: v,
                        });
                    };
                    if depth + 1 > MAX_NESTING {
                        return refuse(Refused::TooDeep);
                    }
                    check_requirements(root, &nested, depth + 1)?;
                    continue;
                }
                (Some(_), Some(v)) => v,
                (Some(_), None) => continue,
                (None, _) => token.to_string(),
            };
            check_location(root, &value).or_else(refuse)?;
        }
    }
    Ok(())
}

/// The word after option `tokens[*i]` as its value (consumed), unless it is an option itself: a
/// flag without a value must not hide the option that follows it from the check.
fn value_after(tokens: &[&str], i: &mut usize) -> Option<String> {
    let next = tokens.get(*i + 1).filter(|t| !t.starts_with('-'))?;
    *i += 1;
    Some(next.to_string())
}

/// Checks one word of a requirement (a name, a specifier, a URL or a path).
fn check_location(root: &Path, word: &str) -> Result<(), Refused> {
    // `name @ url` and `url#egg=name`: the URL part is what points somewhere.
    let lower = word.to_ascii_lowercase();
    if let Some(i) = lower.find("file:") {
        let rest = &word[i + "file:".len()..];
        let path = rest.strip_prefix("//").unwrap_or(rest);
        let path = path.split(['#', '?']).next().unwrap_or(path);
        // file:///abs/path (empty host) must lie in the archive; file:rel is relative to it.
        let ok = match path.strip_prefix('/') {
            Some(abs) => inside(root, Path::new("/"), abs).is_some(),
            None => inside(root, root, path).is_some(),
        };
        if !ok {
            return Err(Refused::FileUrlOutside(word.to_string()));
        }
        return Ok(());
    }
    if lower.contains("://") {
        if lower.starts_with("http://") || lower.contains("+http://") {
            return Err(Refused::PlainHttp(word.to_string()));
        }
        return Ok(());
    }
    // A path: `./pkg`, `wheels/x.whl`, `/abs`, `~/x`, `../x`.
    let looks_like_path = word.starts_with(['.', '/', '~']) || word.contains('/');
    if looks_like_path && inside(root, root, word).is_none() {
        return Err(Refused::PathOutside(word.to_string()));
    }
    Ok(())
}

/// pip's reading of a requirements file: `\` at a line's end continues it, `#` at the start or
/// after white space starts a comment. Yields (first line number, text) of non-empty lines.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        if current.is_empty() {
            start = i + 1;
        }
        let line = strip_comment(raw);
        if let Some(body) = line.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        if !current.trim().is_empty() {
            out.push((start, current.trim().to_string()));
        }
        current.clear();
    }
    if !current.trim().is_empty() {
        out.push((start, current.trim().to_string()));
    }
    out
}

fn strip_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(), RequirementsError> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/more.txt"), "six\n").unwrap();
        std::fs::write(root.join("sub/loop.txt"), "-r loop.txt\n").unwrap();
        std::fs::write(root.join("sub/bad.txt"), "-e /etc\n").unwrap();
        std::fs::write(root.join("requirements.txt"), text).unwrap();
        check_requirements(&root, &root.join("requirements.txt"), 0).map_err(|e| {
            // Messages name the archive's file, never the temporary folder.
            assert!(
                !e.to_string().contains(&*dir.path().to_string_lossy()),
                "{e}"
            );
            e
        })
    }

    #[test]
    fn ordinary_requirements_pass() {
        let ok = "# a comment\nlru-dict==1.3.0  # pinned\nrequests>=2; python_version >= \"3.8\"\n\
                  --extra-index-url https://download.pytorch.org/whl/cpu\n\
                  numpy \\\n  >=1.0\n-r sub/more.txt\n./wheels/pkg.whl\nwheels/other.whl\n\
                  pkg @ https://example.com/pkg-1.0.tar.gz\n-e ./src\n--find-links=./wheels\n\
                  --no-binary :all:\n--pre\n";
        check(ok).unwrap();
    }

    #[test]
    fn local_paths_outside_the_archive_are_refused() {
        for bad in [
            "/etc/passwd",
            "-e /home/someone/pkg",
            "-e/home/someone/pkg",
            "../outside.whl",
            "./sub/../../outside.whl",
            "~/pkg.whl",
            "pkg @ file:///etc/pkg",
            "file:../pkg",
            "git+file:///srv/repo#egg=x",
            "-r ../../other.txt",
            "--requirement=/etc/req.txt",
            "-c /etc/constraints.txt",
            "--find-links /srv/wheels",
            "-f/srv/wheels",
            "-r sub/bad.txt",
            "${HOME}/pkg.whl",
        ] {
            let e = check(bad).expect_err(bad).to_string();
            assert!(
                e.starts_with("requirements.txt line 1: ") || e.starts_with("sub/bad.txt line 1: "),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn index_replacement_and_insecure_options_are_refused() {
        for (bad, why) in [
            (
                "--index-url https://evil.example/simple",
                "--index-url would replace",
            ),
            ("-i https://evil.example/simple", "-i would replace"),
            ("--trusted-host evil.example", "turns off TLS"),
            (
                "--extra-index-url http://evil.example/simple",
                "without TLS",
            ),
            ("pkg @ http://evil.example/pkg.tar.gz", "without TLS"),
            ("--pre -i https://evil.example/simple", "-i would replace"),
            ("git+http://evil.example/repo#egg=x", "without TLS"),
        ] {
            let e = check(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_loop_of_included_files_ends() {
        let e = check("-r sub/loop.txt").unwrap_err().to_string();
        assert!(e.contains("nest deeper than"), "{e}");
    }

    #[test]
    fn continuation_and_comments_follow_pips_reading() {
        assert_eq!(
            logical_lines("a \\\n b\n#c\nd#e\nf #g\n\n"),
            vec![(1, "a   b".into()), (4, "d#e".into()), (5, "f".into())]
        );
    }

    #[test]
    fn inside_keeps_paths_in_the_root() {
        let root = Path::new("/m");
        assert_eq!(inside(root, root, "a/./b"), Some(PathBuf::from("/m/a/b")));
        assert_eq!(
            inside(root, Path::new("/m/a"), "../b"),
            Some(PathBuf::from("/m/b"))
        );
        assert_eq!(inside(root, root, "../x"), None);
        assert_eq!(inside(root, root, "a/../../x"), None);
        assert_eq!(inside(root, root, "/m/b"), None);
    }
}
