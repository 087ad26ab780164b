//! The commands the README and docs/*.md show, run against a real server, so that the docs cannot
//! rot.
//!
//! A fenced shell block (`sh`, `bash`, `shell`) runs when its info string is `sh doctest`, optionally
//! followed by the server it needs: nothing (the default server: the demo model), `onnx` (examples/
//! with tiny_classifier), `none` (no server), or `own-server` (the block starts and stops its servers
//! itself, as a reader in a fresh clone does: see [`Scratch`]). A block that cannot run here says
//! why in its info string, `sh no-doctest <reason>` (GPU, Docker, the test command itself, ...);
//! in a file that has doctest blocks every shell block is one or the other, so a new block cannot
//! silently go untested. Each command line runs in `sh -c` (lines ending in `\` continue) and must
//! exit 0, within a time limit. Expected output is checked where the doc shows it: a comment line
//! right after a command holding JSON (`# {"status":"Healthy"}`, `# 6`), or a ```json block right
//! after the doctest block (for its last command); numbers compare to within 1e-6 relative.
//!
//! The docs name TorchServe's fixed ports; the test's servers listen on ports the OS chose, and the
//! commands are rewritten to them: 127.0.0.1 / localhost :8080, :8081, :8082 become the inference,
//! management and metrics addresses of the block's server (for `own-server`, of the server its
//! latest `oxserve start` started). `curl` gets `-sS --fail-with-body --max-time 60` (an HTTP error
//! fails the command), `oxserve` is the binary under test, `oxserve top` prints one frame (`--once`)
//! from this server, and `xdg-open URL` fetches the page instead of opening a browser. The default
//! server has token authorization on, as a new user's has: `key_file.json` names the test server's
//! key file, and a variable assignment (`INFERENCE="..."`) is evaluated once and carries over to the
//! block's later commands, as in the shell the reader pastes them into.

mod common;

use common::Server;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_oxserve");

/// The languages of the fenced blocks that hold shell commands.
const SHELLS: [&str; 3] = ["sh", "bash", "shell"];

/// What a shell block's info string says about running it.
#[derive(Debug, PartialEq)]
enum Kind {
    /// `sh doctest SETUP`: runs, against the server SETUP names.
    Run(String),
    /// `sh no-doctest REASON`: cannot run here, for this reason.
    Skip(String),
    /// Neither: allowed only in a doc that runs none of its blocks.
    Unmarked,
}

/// One shell block of a doc.
#[derive(Debug)]
struct Block {
    /// `file:line` of the opening fence.
    at: String,
    kind: Kind,
    /// Command lines with their line numbers (continuations joined).
    lines: Vec<(usize, String)>,
    /// The body of a ```json block right after this one, if any.
    json_after: Option<String>,
}

impl Block {
    fn setup(&self) -> Option<&str> {
        match &self.kind {
            Kind::Run(setup) => Some(setup),
            _ => None,
        }
    }
}

/// The shell blocks of one Markdown text.
fn blocks_of(file: &str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let at = format!("{file}:{}", i + 1);
        let (lang, rest) = info.trim().split_once(' ').unwrap_or((info.trim(), ""));
        let rest = rest.trim();
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            body.push((i + 1, lines[i]));
            i += 1;
        }
        assert!(i < lines.len(), "{at}: unclosed block");
        i += 1;
        if !SHELLS.contains(&lang) {
            continue;
        }
        let kind = if let Some(setup) = rest.strip_prefix("no-doctest") {
            let reason = setup.trim();
            assert!(!reason.is_empty(), "{at}: `no-doctest` without a reason");
            Kind::Skip(reason.to_string())
        } else if let Some(setup) = rest.strip_prefix("doctest") {
            Kind::Run(setup.trim().to_string())
        } else {
            Kind::Unmarked
        };
        // A ```json block after nothing but blank lines: the last command's expected output.
        let mut j = i;
        while j < lines.len() && lines[j].trim().is_empty() {
            j += 1;
        }
        let mut json_after = None;
        if j < lines.len() && lines[j].trim() == "```json" {
            let end = (j + 1..lines.len())
                .find(|&k| lines[k].trim() == "```")
                .unwrap_or_else(|| panic!("{file}:{}: unclosed json block", j + 1));
            json_after = Some(lines[j + 1..end].join("\n"));
        }
        let mut joined: Vec<(usize, String)> = Vec::new();
        let mut continuing = false;
        for (n, line) in body {
            if continuing {
                let last = joined.last_mut().expect("a continued line");
                last.1.push(' ');
                last.1.push_str(line.trim());
            } else {
                joined.push((n, line.to_string()));
            }
            continuing = line.trim_end().ends_with('\\');
            if continuing {
                let last = joined.last_mut().expect("a line");
                last.1 = last
                    .1
                    .trim_end()
                    .trim_end_matches('\\')
                    .trim_end()
                    .to_string();
            }
        }
        out.push(Block {
            at,
            kind,
            lines: joined,
            json_after,
        });
    }
    out
}

/// Every doctest block of README.md and docs/*.md.
fn all_blocks() -> Vec<Block> {
    let mut files = vec![Path::new(ROOT).join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(Path::new(ROOT).join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .iter()
        .flat_map(|p| {
            let name = p.strip_prefix(ROOT).unwrap().display().to_string();
            blocks_of(&name, &std::fs::read_to_string(p).unwrap())
        })
        .collect()
}

/// Where a block's commands reach its server.
#[derive(Clone, Debug)]
struct Addrs {
    inference: String,
    management: String,
    metrics: String,
    /// The server's key file, where the commands name `key_file.json` from another folder.
    key_file: Option<PathBuf>,
}

impl Addrs {
    fn of(s: &Server, key_file: Option<PathBuf>) -> Addrs {
        Addrs {
            inference: s.inference.clone(),
            management: s.management.clone(),
            metrics: s.metrics_url(),
            key_file,
        }
    }

    /// The addresses in oxserve's `oxserve listening: inference=... management=... metrics=...`
    /// line.
    fn from_listening(line: &str) -> Option<Addrs> {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .map(|a| format!("http://{a}"))
        };
        Some(Addrs {
            inference: field("inference")?,
            management: field("management")?,
            metrics: field("metrics")?,
            key_file: None,
        })
    }
}

/// A command as it runs against the server at `addrs` (see the module doc).
fn rewrite(cmd: &str, addrs: Option<&Addrs>) -> String {
    let mut cmd = cmd.trim().to_string();
    // A doc builds the release binary (README) or runs it through cargo (docs/llm.md); the test
    // runs the binary `cargo test` already built instead (linked as target/release/oxserve in the
    // block's folder, see [`Scratch`]): a second, release build of the whole tree would take
    // minutes and gigabytes, and would test the same code. The rest of the line stays literal.
    if cmd == "cargo build --release" {
        cmd = "test -x target/release/oxserve".to_string();
    } else if let Some(rest) = cmd.strip_prefix("cargo run --release -- ") {
        cmd = format!("target/release/oxserve {rest}");
    }
    if let Some(a) = addrs {
        if let Some(key_file) = &a.key_file {
            cmd = cmd.replace("key_file.json", &key_file.display().to_string());
        }
        for (port, url) in [
            ("8080", &a.inference),
            ("8081", &a.management),
            ("8082", &a.metrics),
        ] {
            for host in [
                "http://127.0.0.1",
                "http://localhost",
                "localhost",
                "127.0.0.1",
            ] {
                cmd = cmd.replace(&format!("{host}:{port}"), url);
            }
        }
    }
    if let Some(rest) = cmd.strip_prefix("curl ") {
        cmd = format!("curl -sS --fail-with-body --max-time 60 {rest}");
    } else if let Some(rest) = cmd.strip_prefix("xdg-open ") {
        cmd = format!("curl -sS --fail-with-body --max-time 60 -o /dev/null {rest}");
    } else if cmd.starts_with("oxserve top") {
        let url = addrs.map(|a| a.metrics.as_str()).unwrap_or_default();
        let rest = &cmd["oxserve top".len()..];
        cmd = format!("{BIN} top --once --url {url}{rest}");
    } else if let Some(rest) = cmd.strip_prefix("oxserve ") {
        cmd = format!("{BIN} {rest}");
    }
    cmd
}

/// How a command starts a server, if it does: `oxserve start` (or target/release/oxserve) in the
/// background, or with `--foreground`.
#[derive(Debug, PartialEq)]
enum Start {
    No,
    Background,
    Foreground,
}

fn starts_server(cmd: &str) -> Start {
    let mut words = cmd.split_whitespace();
    let is_start =
        words.next().is_some_and(|w| w.ends_with("oxserve")) && words.next() == Some("start");
    match (
        is_start,
        cmd.split_whitespace().any(|w| w == "--foreground"),
    ) {
        (false, _) => Start::No,
        (true, false) => Start::Background,
        (true, true) => Start::Foreground,
    }
}

/// The name a line assigns (`NAME=value`, `NAME="..."`, `NAME=$(...)`), if it only sets a shell
/// variable (`NAME=value command` sets it for that command only: not an assignment).
fn assigned_name(line: &str) -> Option<&str> {
    let (name, value) = without_comment(line).split_once('=')?;
    let one_word = (value.starts_with('"') && value.ends_with('"'))
        || (value.starts_with('\'') && value.ends_with('\''))
        || (value.starts_with("$(") && value.ends_with(')'))
        || !value.contains(char::is_whitespace);
    let is_name = !name.is_empty()
        && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
        && !name.starts_with(|c: char| c.is_ascii_digit());
    (is_name && one_word).then_some(name)
}

/// A command line without its trailing `# comment` (a `#` after a blank, outside quotes).
fn without_comment(line: &str) -> &str {
    let mut quote = None;
    let mut after_blank = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if after_blank => return line[..i].trim_end(),
            _ => {}
        }
        after_blank = c.is_whitespace();
    }
    line.trim_end()
}

/// Whether two JSON values are equal, numbers to within 1e-6 relative.
fn json_matches(got: &serde_json::Value, want: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (got, want) {
        (Number(a), Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
        }
        (Array(a), Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| json_matches(x, y))
        }
        (Object(a), Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| json_matches(v, w)))
        }
        _ => got == want,
    }
}

/// Runs one command (two minutes at most) in `dir`; its stdout, or a failure naming the doc line.
fn run(at: &str, cmd: &str, dir: &Path) -> String {
    common::run_ok(
        &format!("{at}: `{cmd}`"),
        Command::new("timeout")
            .args(["120", "sh", "-c", cmd])
            .current_dir(dir)
            // `oxserve start` (in the background), `status` and `stop` find each other through
            // this file; the default (in /tmp) would be shared with every other test and user.
            .env("OXSERVE_PID_FILE", dir.join("oxserve.pid")),
    )
}

/// The folder an `own-server` block runs in: the reader's fresh clone, as far as the block can
/// tell. `examples` is the repository's, `target/release/oxserve` is the binary under test (see
/// [`rewrite`]), `target/mar-venv` is the repository's torch-model-archiver virtualenv (which
/// examples/make_archives.sh creates on first use; sharing it saves a PyPI install per block),
/// and `config.properties`, which oxserve reads from the folder it starts in, sets OS-chosen
/// ports where the reader's server takes 8080-8082. `target/model-store`, the key file, the logs
/// and the pid file are the block's own, and go with the folder. Dropping it stops the servers
/// the block left running, foreground (children here) or background (by the pid file).
struct Scratch {
    dir: tempfile::TempDir,
    foreground: Vec<Server>,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(ROOT);
        let venv = root.join("target/mar-venv");
        if !venv.join("bin/torch-model-archiver").exists() {
            // Created here from its own path (a virtualenv's scripts name the folder it was made
            // in, so it must not be made through the link below).
            let store = tempfile::tempdir().unwrap();
            run(
                "creating target/mar-venv",
                &format!("examples/make_archives.sh {}", store.path().display()),
                root,
            );
        }
        let p = dir.path();
        std::os::unix::fs::symlink(root.join("examples"), p.join("examples")).unwrap();
        std::fs::create_dir_all(p.join("target/release")).unwrap();
        std::os::unix::fs::symlink(BIN, p.join("target/release/oxserve")).unwrap();
        std::os::unix::fs::symlink(&venv, p.join("target/mar-venv")).unwrap();
        std::fs::write(p.join("config.properties"), common::BASE).unwrap();
        Scratch {
            dir,
            foreground: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a `--foreground` start the way the reader does, in a terminal of its own: as a child
    /// until the block ends. The server it started.
    async fn start_foreground(&mut self, cmd: &str) -> Addrs {
        let mut command = Command::new("sh");
        command
            .args(["-c", &format!("exec {cmd}")])
            .current_dir(self.path())
            .env("OXSERVE_PID_FILE", self.path().join("oxserve.pid"));
        let s = Server::spawn(command, tempfile::tempdir().unwrap());
        let addrs = Addrs::of(&s, None);
        wait_healthy(&addrs).await;
        self.foreground.push(s);
        addrs
    }

    /// The server a background `oxserve start` just started: its listening line in
    /// logs/oxserve.log (where the detached server's stdout goes), once it serves every model.
    async fn started_in_background(&self) -> Addrs {
        let log = self.path().join("logs/oxserve.log");
        let what = format!("a listening line in {}", log.display());
        let addrs = common::wait_until(&what, Duration::from_secs(120), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let found = text
                .lines()
                .rev()
                .find(|l| l.contains("oxserve listening"))
                .and_then(Addrs::from_listening);
            std::future::ready(found.ok_or(text))
        })
        .await;
        wait_healthy(&addrs).await;
        addrs
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let pid_file = self.path().join("oxserve.pid");
        let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        else {
            return;
        };
        // SAFETY: signals to the pid the block's own `oxserve start` recorded.
        let alive = || unsafe { libc::kill(pid, 0) == 0 };
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Waits (two minutes at most) until the server answers /ping 200: every start-up model has its
/// workers, which the reader sees as the server's start-up lines before pasting the next command.
async fn wait_healthy(a: &Addrs) {
    let client = reqwest::Client::new();
    let ping = format!("{}/ping", a.inference);
    common::wait_until(&ping, Duration::from_secs(120), || async {
        match client.get(&ping).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

async fn server_for(block: &Block, setup: &str) -> Option<Server> {
    let examples = format!("{ROOT}/examples");
    let s = match setup {
        // A new user's server: token authorization on, as by default.
        "" => Server::start_secure("", &[], &[]),
        "onnx" => Server::start(
            "default_workers_per_model=1",
            &[
                "--model-store",
                &examples,
                "--models",
                "tiny_classifier=onnx",
            ],
        ),
        "none" | "own-server" => return None,
        other => panic!("{}: unknown doctest setup {other:?}", block.at),
    };
    s.wait_healthy().await;
    Some(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_commands_run() {
    let blocks = all_blocks();
    // The README's tour at least; a doc that loses its marker shows up here.
    assert!(
        blocks
            .iter()
            .any(|b| b.at.starts_with("README.md") && b.setup().is_some()),
        "no doctest block in README.md: {blocks:?}"
    );
    let mut ran = 0;
    for block in &blocks {
        let Some(setup) = block.setup() else {
            continue;
        };
        let server = server_for(block, setup).await;
        let mut scratch = (setup == "own-server").then(Scratch::new);
        let dir = scratch
            .as_ref()
            .map_or(Path::new(ROOT).to_path_buf(), |s| s.path().to_path_buf());
        let mut addrs = server
            .as_ref()
            .map(|s| Addrs::of(s, Some(s.path().join("key_file.json"))));
        let mut last_out: Option<String> = None;
        // Variable assignments (`KEY="..."`), evaluated once as the reader's shell does, carry
        // over to the block's later commands.
        let mut assignments = String::new();
        for (n, line) in &block.lines {
            let at = format!("{}:{n}", block.at.split(':').next().unwrap());
            let trimmed = line.trim();
            if let Some(comment) = trimmed.strip_prefix('#') {
                // `# <json>` right after a command: its expected output.
                let comment = comment.trim();
                if let (Some(out), true) = (
                    &last_out,
                    serde_json::from_str::<serde_json::Value>(comment).is_ok(),
                ) {
                    check(&(at, comment.to_string()), out);
                }
                continue;
            }
            if trimmed.is_empty() {
                continue;
            }
            let cmd = rewrite(trimmed, addrs.as_ref());
            let start = starts_server(&cmd);
            if start == Start::Foreground {
                let scratch = scratch.as_mut().unwrap_or_else(|| {
                    panic!("{at}: a server started in the foreground needs `own-server`")
                });
                addrs = Some(scratch.start_foreground(&cmd).await);
                last_out = None;
                ran += 1;
                continue;
            }
            let script = match assigned_name(trimmed) {
                Some(name) => format!("{assignments}{cmd}\nprintf %s \"${name}\""),
                None => format!("{assignments}{cmd}"),
            };
            let out = tokio::task::spawn_blocking({
                let (at, dir) = (at.clone(), dir.clone());
                move || run(&at, &script, &dir)
            })
            .await
            .unwrap();
            if let Some(name) = assigned_name(trimmed) {
                assignments.push_str(&format!("{name}='{}'\n", out.replace('\'', r"'\''")));
            }
            if start == Start::Background {
                let scratch = scratch.as_ref().unwrap_or_else(|| {
                    panic!("{at}: a server started in the background needs `own-server`")
                });
                addrs = Some(scratch.started_in_background().await);
            }
            last_out = Some(out);
            ran += 1;
        }
        if let (Some(want), Some(out)) = (&block.json_after, &last_out) {
            check(&(format!("{} (json block)", block.at), want.clone()), out);
        }
        // The block's servers stop here, before the next block starts its own.
        drop(scratch);
    }
    assert!(ran >= 10, "only {ran} documented commands ran");
}

/// In a doc that runs its shell blocks, every shell block either runs or says why it cannot.
#[test]
fn every_shell_block_of_a_tested_doc_runs_or_says_why_not() {
    let blocks = all_blocks();
    let file = |b: &Block| b.at.split(':').next().unwrap().to_string();
    let tested: std::collections::HashSet<String> = blocks
        .iter()
        .filter(|b| b.setup().is_some())
        .map(file)
        .collect();
    let unmarked: Vec<&str> = blocks
        .iter()
        .filter(|b| b.kind == Kind::Unmarked && tested.contains(&file(b)))
        .map(|b| b.at.as_str())
        .collect();
    assert!(
        unmarked.is_empty(),
        "shell blocks neither `sh doctest ...` nor `sh no-doctest <reason>`: {unmarked:?}"
    );
    let untested: Vec<&str> = [
        "README.md",
        "docs/llm.md",
        "docs/onnx.md",
        "docs/monitoring.md",
    ]
    .into_iter()
    .filter(|doc| !tested.contains(*doc))
    .collect();
    assert!(
        untested.is_empty(),
        "these docs run none of their blocks: {untested:?}"
    );
}

/// Compares a command's output with the JSON the doc shows.
fn check((at, want): &(String, String), got: &str) {
    let want: serde_json::Value = serde_json::from_str(want)
        .unwrap_or_else(|e| panic!("{at}: the doc's expected output is not JSON ({e}): {want}"));
    let got_json: serde_json::Value = serde_json::from_str(got)
        .unwrap_or_else(|e| panic!("{at}: the output is not JSON ({e}): {got}"));
    assert!(
        json_matches(&got_json, &want),
        "{at}: the doc shows {want}, the command printed {got_json}"
    );
}

#[test]
fn blocks_are_found_and_continuations_joined() {
    let md = "text\n```sh doctest onnx\ncurl a \\\n  -d 'x'\n# {\"a\": 1}\n```\n\n```json\n{\"b\":\n 2}\n```\n```sh\nnot run\n```\n```yaml\n```sh doctest\n```\n```bash no-doctest needs a GPU\nnvidia-smi\n```\n";
    let b = blocks_of("x.md", md);
    assert_eq!(b.len(), 3, "{b:?}");
    assert_eq!(b[0].at, "x.md:2");
    assert_eq!(b[0].kind, Kind::Run("onnx".into()));
    assert_eq!(
        b[0].lines,
        [
            (3, "curl a -d 'x'".to_string()),
            (5, "# {\"a\": 1}".to_string())
        ]
    );
    assert_eq!(b[0].json_after.as_deref(), Some("{\"b\":\n 2}"));
    // A fence inside another language's block is that block's text, not a block.
    assert_eq!(b[1].kind, Kind::Unmarked);
    assert_eq!(b[2].kind, Kind::Skip("needs a GPU".into()));
    assert_eq!(
        rewrite("curl http://localhost:8080/ping", None),
        "curl -sS --fail-with-body --max-time 60 http://localhost:8080/ping"
    );
    assert_eq!(
        rewrite("cargo run --release -- start --foreground", None),
        "target/release/oxserve start --foreground"
    );
    assert_eq!(
        starts_server("target/release/oxserve start --models all"),
        Start::Background
    );
    assert_eq!(
        starts_server(&rewrite("oxserve start --foreground --models x", None)),
        Start::Foreground
    );
    assert_eq!(starts_server("target/release/oxserve stop"), Start::No);
    assert_eq!(assigned_name("SEQ=$(curl x)"), Some("SEQ"));
    assert_eq!(assigned_name("curl -d a=b x"), None);
    assert_eq!(assigned_name("TS_X=1 oxserve start"), None);
    assert_eq!(assigned_name("A=\"x y\""), Some("A"));
    assert_eq!(assigned_name("A=\"x # y\"   # a comment"), Some("A"));
    let a = Addrs::from_listening("oxserve listening: inference=127.0.0.1:1 management=127.0.0.1:2 metrics=127.0.0.1:3 grpc_inference=127.0.0.1:4").unwrap();
    assert_eq!(
        rewrite("curl -s localhost:8082/metrics", Some(&a)),
        "curl -sS --fail-with-body --max-time 60 -s http://127.0.0.1:3/metrics"
    );
    assert!(json_matches(
        &serde_json::json!({"x": [1.0000000001, "s"]}),
        &serde_json::json!({"x": [1, "s"]})
    ));
    assert!(!json_matches(
        &serde_json::json!({"x": 1.1}),
        &serde_json::json!({"x": 1})
    ));
}
