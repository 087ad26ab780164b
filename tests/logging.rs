//! The log files over the real binary: TorchServe's line layouts (compared with lines captured from
//! a real TorchServe 0.12.0 run), rollover at the configured size, JSON lines carrying the request
//! id the client saw, worker output attributed to its request, and a handler's huge output line
//! cut instead of kept.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Server;
use regex::Regex;

/// Lines a real TorchServe 0.12.0 wrote (logs/access_log.log, logs/model_log.log, logs/ts_log.log),
/// and the regexes they and oxserve's lines must both match.
const TS_ACCESS: &str = r#"2026-11-28T22:28:57,538 - /127.0.0.1:43558 "POST /predictions/squeezenet1_1 HTTP/1.1" 200 9"#;
const TS_MODEL: &str =
    "2026-11-28T22:28:49,112 [INFO ] W-9000-squeezenet1_1_1.0-stdout MODEL_LOG - Torch worker started.";
const TS_STARTED: &str =
    "2026-11-28T22:28:48,016 [INFO ] main org.pytorch.serve.ModelServer - Model server started.";
const TIME: &str = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d,\d{3}";

fn access_re() -> Regex {
    Regex::new(&format!(
        r#"^{TIME} - /127\.0\.0\.1:\d+ "(GET|POST|PUT|DELETE) (\S+) HTTP/1\.1" (\d{{3}}) (\d+)$"#
    ))
    .unwrap()
}

fn model_re() -> Regex {
    Regex::new(&format!(
        r"^{TIME} \[(INFO |WARN )\] (W-\d+-\S+_[\d.]+)-(stdout|stderr) MODEL_LOG - (.*)$"
    ))
    .unwrap()
}

fn server_re() -> Regex {
    Regex::new(&format!(
        r"^{TIME} \[(INFO |WARN |ERROR|DEBUG)\] \S+ \S+ - (.*)$"
    ))
    .unwrap()
}

fn logs(s: &Server) -> PathBuf {
    s.path().join("logs")
}

/// Waits until `file` has a line for which `pred` holds; returns the file's text.
async fn wait_line(file: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let what = format!("a line in {} for {what}", file.display());
    common::wait_until(&what, Duration::from_secs(90), || {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        std::future::ready(if text.lines().any(&pred) {
            Ok(text)
        } else {
            Err(format!("file:\n{text}"))
        })
    })
    .await
}

#[test]
fn the_patterns_match_torchserve_lines() {
    // The regexes below are the contract: they must hold for TorchServe's own lines first.
    assert!(access_re().is_match(TS_ACCESS));
    assert!(model_re().is_match(TS_MODEL));
    assert!(server_re().is_match(TS_STARTED));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_torchserve_layouts_and_responses_carry_request_ids() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    let r = s.predict("demo", r#""I love this""#).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    // A client's own id is kept; another request gets another id.
    let r = s
        .client
        .post(format!("{}/predictions/demo", s.inference))
        .header("x-request-id", "client-req-42")
        .body("great")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-req-42");
    let (code, _) = s.mgmt(reqwest::Method::GET, "/models").await;
    assert_eq!(code, 200);

    let access = wait_line(
        &logs(&s).join("access_log.log"),
        "the management call",
        |l| l.contains("\"GET /models HTTP/1.1\" 200"),
    )
    .await;
    let re = access_re();
    for line in access.lines() {
        assert!(re.is_match(line), "not TorchServe's access layout: {line}");
    }
    assert!(
        access
            .lines()
            .any(|l| l.contains("\"POST /predictions/demo HTTP/1.1\" 200 ")),
        "{access}"
    );

    let ts_log = wait_line(&logs(&s).join("ts_log.log"), "start-up", |l| {
        l.ends_with(" - Model server started.")
    })
    .await;
    let re = server_re();
    for line in ts_log.lines() {
        assert!(re.is_match(line), "not TorchServe's ts_log layout: {line}");
    }
    for start_line in [
        "Inference API bind to: http://127.0.0.1:",
        "Management API bind to: http://127.0.0.1:",
        "Metrics API bind to: http://127.0.0.1:",
    ] {
        assert!(ts_log.contains(start_line), "{start_line}: {ts_log}");
    }
    // The metric log files exist in prometheus mode too, as TorchServe's appenders create them
    // (its prometheus-mode metrics are not LogMetrics, so they stay empty there as well).
    for file in ["ts_metrics.log", "model_metrics.log", "model_log.log"] {
        assert!(logs(&s).join(file).is_file(), "{file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_ids_are_refused_with_a_clear_error() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    for bad in ["has space", "a,b", &"x".repeat(129)] {
        let r = s
            .client
            .post(format!("{}/predictions/demo", s.inference))
            .header("x-request-id", bad)
            .body("great")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        // Even a refusal carries an id of its own.
        assert_eq!(r.headers()["x-request-id"].len(), 36);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["code"], 400);
        assert_eq!(v["type"], "BadRequestException");
        assert!(
            v["message"].as_str().unwrap().contains("x-request-id"),
            "{v}"
        );
    }
    // Non-UTF-8 bytes in the header are refused the same way.
    let r = s
        .client
        .get(format!("{}/ping", s.inference))
        .header(
            "x-request-id",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The longest allowed id is kept whole.
    let long = "y".repeat(128);
    let r = s
        .client
        .get(format!("{}/ping", s.inference))
        .header("x-request-id", &long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], long.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_parse_and_carry_the_request_id_the_client_saw() {
    let s = Server::start("default_workers_per_model=1\nlog_format=json", &[]);
    s.wait_healthy().await;
    let r = s.predict("demo", r#""I love this""#).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let file = logs(&s).join("access_log.log");
    let text = wait_line(&file, "the prediction", |l| l.contains(&id)).await;
    let mut found = false;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["logger"], "ACCESS_LOG");
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
        if v["request_id"] == id.as_str() {
            found = true;
            assert_eq!(v["method"], "POST");
            assert_eq!(v["uri"], "/predictions/demo");
            assert_eq!(v["status"], 200);
            assert_eq!(v["model"], "demo");
            assert_eq!(v["version"], "1.0");
            assert!(v["duration_ms"].as_f64().unwrap() >= 0.0, "{v}");
            assert!(
                v["queue_ms"].is_number() && v["backend_ms"].is_number(),
                "{v}"
            );
            assert!(
                v["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
                "{v}"
            );
        }
    }
    assert!(found, "{text}");
    let ts_log = wait_line(&logs(&s).join("ts_log.log"), "start-up", |l| {
        l.contains("Model server started.")
    })
    .await;
    for line in ts_log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["logger"].is_string() && v["message"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_rolls_over_at_the_configured_size() {
    let s = Server::start(
        "default_workers_per_model=1\nlog_max_bytes=2048\nlog_max_files=2",
        &[],
    );
    s.wait_healthy().await;
    // About 90 bytes a line: 150 requests are 13 KB, six or more rollovers of 2 KB.
    for _ in 0..150 {
        let r = s
            .client
            .get(format!("{}/ping", s.inference))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let dir = logs(&s);
    let rolled = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with("access_log.") && n.ends_with(".log.gz")
            })
            .collect();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    // Rollovers happened, and only log_max_files of them are kept.
    while rolled(&dir).len() != 2
        || std::fs::read_dir(&dir).unwrap().any(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with("access_log.") && n.ends_with(".log") && n != "access_log.log"
        })
    {
        assert!(
            Instant::now() < deadline,
            "rolled files: {:?}",
            rolled(&dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name_re = Regex::new(r"^access_log\.\d\d-[A-Z][a-z]{2}(\.\d+)?\.log\.gz$").unwrap();
    let re = access_re();
    for gz in rolled(&dir) {
        let name = gz.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name_re.is_match(&name), "{name}");
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.len() <= 2048, "{name} is {} bytes", text.len());
        assert!(text.lines().count() > 5, "{name}: {text}");
        for line in text.lines() {
            assert!(re.is_match(line), "{line}");
        }
    }
    assert!(std::fs::metadata(dir.join("access_log.log")).unwrap().len() <= 2048);
}

/// A model folder laid out like an unpacked .mar, in a model store of its own.
fn printer_store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().join("printer");
    std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
    let manifest = serde_json::json!({
        "createdOn": "28/11/2026 12:00:00",
        "runtime": "python",
        "model": {"modelName": "printer", "modelVersion": "1.0", "handler": "printer_handler.py"},
        "archiverVersion": "0.12.0"
    });
    std::fs::write(dir.join("MAR-INF/MANIFEST.json"), manifest.to_string()).unwrap();
    std::fs::write(
        dir.join("printer_handler.py"),
        r#"
import sys

def handle(data, context):
    if data is None:
        return None
    out = []
    for i, request in enumerate(data):
        body = request.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = body.decode()
        if body == "huge":
            # 256 MiB without a newline, in pieces, as a runaway handler would print it.
            piece = "y" * (1 << 20)
            for _ in range(256):
                sys.stdout.write(piece)
            sys.stdout.write("\n")
            sys.stdout.flush()
        print("hello from the handler: " + str(body))
        print("a warning from the handler: " + str(body), file=sys.stderr)
        out.append(context.get_request_id(i))
    return out
"#,
    )
    .unwrap();
    store
}

fn start_printer(props: &str, store: &Path) -> Server {
    Server::start_store(
        &format!("default_workers_per_model=1\n{props}"),
        store,
        "printer",
        &[],
    )
}

async fn post(s: &Server, body: &str, id: Option<&str>) -> (u16, String, String) {
    let mut req = s
        .client
        .post(format!("{}/predictions/printer", s.inference))
        .header("content-type", "text/plain")
        .body(body.to_string());
    if let Some(id) = id {
        req = req.header("x-request-id", id);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let header = r.headers()["x-request-id"].to_str().unwrap().to_string();
    (status, header, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_output_has_torchserve_layout_and_the_handler_sees_the_request_id() {
    let store = printer_store();
    let s = start_printer("", store.path());
    s.wait_healthy().await;
    let (status, header, body) = post(&s, "first", Some("trace-7")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header, "trace-7");
    // context.request_ids carries the id the client sent.
    assert_eq!(body, "trace-7");
    let (status, header, body) = post(&s, "second", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, header, "a generated id reaches the handler too");

    let file = logs(&s).join("model_log.log");
    let text = wait_line(&file, "the stderr line", |l| {
        l.ends_with("MODEL_LOG - a warning from the handler: second")
    })
    .await;
    let re = model_re();
    for line in text.lines() {
        assert!(
            re.is_match(line),
            "not TorchServe's model_log layout: {line}"
        );
        assert!(!line.contains("OXSERVE_REQUEST_IDS"), "{line}");
    }
    assert!(
        text.lines().any(|l| l.contains(
            "[INFO ] W-9000-printer_1.0-stdout MODEL_LOG - hello from the handler: first"
        )),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains(
            "[WARN ] W-9000-printer_1.0-stderr MODEL_LOG - a warning from the handler: first"
        )),
        "{text}"
    );
    assert!(
        text.contains("W-9000-printer_1.0-stdout MODEL_LOG - Torch worker started."),
        "{text}"
    );
    // TorchServe's MODEL_LOG is additive: worker lines are in ts_log.log as well.
    wait_line(&logs(&s).join("ts_log.log"), "worker output", |l| {
        l.contains("MODEL_LOG - hello from the handler: first")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_worker_lines_name_model_version_worker_and_request() {
    let store = printer_store();
    let s = start_printer("log_format=json", store.path());
    s.wait_healthy().await;
    let (status, id, body) = post(&s, "json", None).await;
    assert_eq!(status, 200, "{body}");
    let file = logs(&s).join("model_log.log");
    let text = wait_line(&file, "the stderr line", |l| {
        l.contains("a warning from the handler: json")
    })
    .await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for (message, stream, level) in [
        ("hello from the handler: json", "stdout", "INFO"),
        ("a warning from the handler: json", "stderr", "WARN"),
    ] {
        let v = lines
            .iter()
            .find(|v| v["message"] == message)
            .unwrap_or_else(|| panic!("{message}: {text}"));
        assert_eq!(v["logger"], "MODEL_LOG");
        assert_eq!(v["level"], level);
        assert_eq!(v["stream"], stream);
        assert_eq!(v["model"], "printer");
        assert_eq!(v["version"], "1.0");
        assert_eq!(v["worker"], "W-9000-printer_1.0");
        assert_eq!(v["request_id"], id.as_str(), "{v}");
    }
    // Lines outside a request name none.
    let started = lines
        .iter()
        .find(|v| v["message"] == "Torch worker started.")
        .unwrap();
    assert!(started.get("request_id").is_none(), "{started}");
    // The access line of the same request carries the same id.
    let access = wait_line(&logs(&s).join("access_log.log"), "the request", |l| {
        l.contains(&id)
    })
    .await;
    assert!(access.lines().any(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["request_id"] == id.as_str() && v["model"] == "printer"
    }));
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_output_line_is_cut_and_marked_and_the_server_keeps_serving() {
    let store = printer_store();
    let s = start_printer("log_max_line_bytes=4096", store.path());
    s.wait_healthy().await;
    let (status, _, body) = post(&s, "huge", None).await;
    assert_eq!(status, 200, "{body}");
    // The server still serves, the worker too.
    let (status, _, _) = post(&s, "after", None).await;
    assert_eq!(status, 200);
    let file = logs(&s).join("model_log.log");
    let text = wait_line(&file, "the cut line", |l| l.contains("line truncated")).await;
    let line = text.lines().find(|l| l.contains("line truncated")).unwrap();
    assert!(
        line.contains(&format!(
            "MODEL_LOG - {} [oxserve: line truncated: {} bytes, the first 4096 kept (log_max_line_bytes)]",
            "y".repeat(4096),
            256u64 << 20
        )),
        "{}",
        &line[line.len().saturating_sub(300)..]
    );
    assert!(line.len() < 4096 + 300, "{} bytes", line.len());
    wait_line(&file, "the next request", |l| {
        l.ends_with("hello from the handler: after")
    })
    .await;
    // No copy of the 256 MiB line was ever held: the server's peak memory (about 45 MiB in a debug
    // build) stays far below the line's size.
    let peak = peak_rss_kib(s.child.id());
    assert!(peak < 160 * 1024, "peak RSS {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log4j2_config_is_accepted_and_said_to_be_ignored() {
    let s = Server::start(
        "default_workers_per_model=1",
        &["--log-config", "/etc/torchserve/log4j2.xml"],
    );
    s.wait_healthy().await;
    let ts_log = wait_line(&logs(&s).join("ts_log.log"), "the warning", |l| {
        l.contains("--log-config /etc/torchserve/log4j2.xml is not read")
    })
    .await;
    let line = ts_log.lines().find(|l| l.contains("--log-config")).unwrap();
    assert!(
        line.contains("[WARN ]") && line.contains("log_format"),
        "{line}"
    );
    assert!(s.log().contains("is not read"), "the console says so too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_access_log_ids_are_still_given() {
    let mut s = Server::start("default_workers_per_model=1\nenable_access_log=false", &[]);
    s.wait_healthy().await;
    let r = s.predict("demo", r#""fine""#).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"].len(), 36);
    // A stopped server has written everything it queued (it drains the log writer on exit).
    assert!(s.stop().success());
    let ts_log = std::fs::read_to_string(logs(&s).join("ts_log.log")).unwrap();
    assert!(ts_log.contains(" - Model server started."), "{ts_log}");
    let access = std::fs::read_to_string(logs(&s).join("access_log.log")).unwrap();
    assert_eq!(access, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_has_written_every_queued_line() {
    let mut s = Server::start(
        "default_workers_per_model=1\nmetrics_mode=log\ndisable_system_metrics=true",
        &[],
    );
    s.wait_healthy().await;
    for _ in 0..20 {
        let r = s.predict("demo", r#""ok""#).await;
        assert_eq!(r.status(), 200);
    }
    assert!(s.stop().success());
    // No waiting: the lines are in the files once the process has exited.
    let metrics = std::fs::read_to_string(logs(&s).join("ts_metrics.log")).unwrap();
    assert_eq!(
        metrics
            .matches("ts_inference_requests_total.Count:1.0|#model_name:demo")
            .count(),
        20,
        "{metrics}"
    );
    let access = std::fs::read_to_string(logs(&s).join("access_log.log")).unwrap();
    let predictions = access
        .lines()
        .filter(|l| l.contains("\"POST /predictions/demo HTTP/1.1\" 200 "))
        .count();
    assert_eq!(predictions, 20, "{access}");
    let ts_log = std::fs::read_to_string(logs(&s).join("ts_log.log")).unwrap();
    assert!(ts_log.contains("shutting down"), "{ts_log}");
}
