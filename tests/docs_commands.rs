//! The commands the README and docs/*.md show, run against a real server, so that the docs cannot
//! rot.
//!
//! A block runs when its info string is `sh doctest`, optionally followed by the server it needs:
//! nothing (the default server: the demo model), `onnx` (examples/ with tiny_classifier), or `none`
//! (no server). Each command line runs in `sh -c` (lines ending in `\` continue) and must exit 0,
//! within a time limit. Expected output is checked where the doc shows it: a comment line right
//! after a command holding JSON (`# {"status":"Healthy"}`), or a ```json block right after the
//! doctest block (for its last command); numbers compare to within 1e-6 relative.
//!
//! The docs name TorchServe's fixed ports; the test's server listens on ports the OS chose, and the
//! commands are rewritten to them: 127.0.0.1 / localhost :8080, :8081, :8082 become the inference,
//! management and metrics addresses. `curl` gets `-sS --fail-with-body --max-time 60` (an HTTP
//! error fails the command), `oxserve` is the binary under test, `oxserve top` prints one frame
//! (`--once`) from this server, and `xdg-open URL` fetches the page instead of opening a browser.
//! The default server has token authorization on, as a new user's has: `key_file.json` names the
//! test server's key file, and variable assignments (`INFERENCE="..."`) carry over to the block's
//! later commands, as in the shell the reader pastes them into.

mod common;

use common::Server;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_oxserve");

/// One runnable block of a doc.
#[derive(Debug)]
struct Block {
    /// `file:line` of the opening fence.
    at: String,
    setup: String,
    /// Command lines with their line numbers (continuations joined).
    lines: Vec<(usize, String)>,
    /// The body of a ```json block right after this one, if any.
    json_after: Option<String>,
}

/// The doctest blocks of one Markdown text.
fn blocks_of(file: &str, text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim().strip_prefix("```sh doctest") else {
            i += 1;
            continue;
        };
        let at = format!("{file}:{}", i + 1);
        let setup = info.trim().to_string();
        let mut body = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim() != "```" {
            body.push((i + 1, lines[i]));
            i += 1;
        }
        assert!(i < lines.len(), "{at}: unclosed block");
        i += 1;
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
            setup,
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

/// A command as it runs against `s` (see the module doc).
fn rewrite(cmd: &str, s: Option<&Server>) -> String {
    let mut cmd = cmd.trim().to_string();
    if let Some(s) = s {
        // The keys of this run are in the server's folder, where the reader's server writes them
        // too (the folder it started from).
        let key_file = s.path().join("key_file.json");
        cmd = cmd.replace("key_file.json", &key_file.display().to_string());
        for (port, url) in [
            ("8080", &s.inference),
            ("8081", &s.management),
            ("8082", &s.metrics_url()),
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
        let url = s.map(Server::metrics_url).unwrap_or_default();
        let rest = &cmd["oxserve top".len()..];
        cmd = format!("{BIN} top --once --url {url}{rest}");
    } else if let Some(rest) = cmd.strip_prefix("oxserve ") {
        cmd = format!("{BIN} {rest}");
    }
    cmd
}

/// Whether a line only sets a shell variable (`NAME=value`).
fn is_assignment(line: &str) -> bool {
    line.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
            && !name.starts_with(|c: char| c.is_ascii_digit())
    })
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

/// Runs one command (two minutes at most); its stdout, or a failure naming the doc line.
fn run(at: &str, cmd: &str) -> String {
    let out = Command::new("timeout")
        .args(["120", "sh", "-c", cmd])
        .current_dir(ROOT)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{at}: `{cmd}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn server_for(block: &Block) -> Option<Server> {
    let examples = format!("{ROOT}/examples");
    let s = match block.setup.as_str() {
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
        "none" => return None,
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
        blocks.iter().any(|b| b.at.starts_with("README.md")),
        "no doctest block in README.md: {blocks:?}"
    );
    let mut ran = 0;
    for block in &blocks {
        let server = server_for(block).await;
        let mut last_out: Option<String> = None;
        // Variable assignments (`KEY="..."`) carry over to the block's later commands, as in the
        // shell the reader pastes them into.
        let mut assignments = String::new();
        for (n, line) in &block.lines {
            let at = format!("{}:{n}", block.at.split(':').next().unwrap());
            let trimmed = line.trim();
            if let Some(comment) = trimmed.strip_prefix('#') {
                // `# {json}` right after a command: its expected output.
                let comment = comment.trim();
                if let (Some(out), true) = (&last_out, comment.starts_with(['{', '['])) {
                    check(&(at, comment.to_string()), out);
                }
                continue;
            }
            if trimmed.is_empty() {
                continue;
            }
            let cmd = rewrite(trimmed, server.as_ref());
            if is_assignment(trimmed) {
                assignments.push_str(&cmd);
                assignments.push('\n');
            }
            let cmd = format!("{assignments}{cmd}");
            let out = tokio::task::spawn_blocking({
                let (at, cmd) = (at.clone(), cmd.clone());
                move || run(&at, &cmd)
            })
            .await
            .unwrap();
            last_out = Some(out);
            ran += 1;
        }
        if let (Some(want), Some(out)) = (&block.json_after, &last_out) {
            check(&(format!("{} (json block)", block.at), want.clone()), out);
        }
    }
    assert!(ran >= 10, "only {ran} documented commands ran");
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
    let md = "text\n```sh doctest onnx\ncurl a \\\n  -d 'x'\n# {\"a\": 1}\n```\n\n```json\n{\"b\":\n 2}\n```\n```sh\nnot run\n```\n";
    let b = blocks_of("x.md", md);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].at, "x.md:2");
    assert_eq!(b[0].setup, "onnx");
    assert_eq!(
        b[0].lines,
        [
            (3, "curl a -d 'x'".to_string()),
            (5, "# {\"a\": 1}".to_string())
        ]
    );
    assert_eq!(b[0].json_after.as_deref(), Some("{\"b\":\n 2}"));
    assert_eq!(
        rewrite("curl http://localhost:8080/ping", None),
        "curl -sS --fail-with-body --max-time 60 http://localhost:8080/ping"
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
