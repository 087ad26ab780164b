//! TorchServe's failure semantics and request decoding, behind the real server with real Python
//! workers: what a handler that fails at start-up leaves in the logs (the full traceback in
//! model_log.log, `Backend worker error`), and how a body sent as `application/json;` or
//! `application/json; charset=utf-8` reaches the worker (decoded as JSON, as TorchServe's
//! frontend makes its worker do). The TorchServe-worker variants need TorchServe's Python
//! (`OXSERVE_TEST_TORCHSERVE_PYTHON=/work/ts-venv/bin/python cargo test --test torchserve_semantics -- --ignored`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Server;

/// Writes an unpacked model folder (the layout of a .mar) named `name` with handler `code`.
fn model_folder(store: &Path, name: &str, code: &str) {
    let dir = store.join(name);
    std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
    std::fs::write(
        dir.join("MAR-INF/MANIFEST.json"),
        format!(
            r#"{{"runtime": "python", "model": {{"modelName": "{name}", "modelVersion": "1.0", "handler": "{name}.py"}}}}"#
        ),
    )
    .unwrap();
    std::fs::write(dir.join(format!("{name}.py")), code).unwrap();
}

/// Config lines that run TorchServe's own worker, from `OXSERVE_TEST_TORCHSERVE_PYTHON`.
fn torchserve_runtime() -> String {
    let python = std::env::var("OXSERVE_TEST_TORCHSERVE_PYTHON").expect(
        "set OXSERVE_TEST_TORCHSERVE_PYTHON to a Python with torchserve installed (/work/ts-venv/bin/python)",
    );
    format!("worker_runtime=torchserve\npython_executable={python}\n")
}

/// Waits until `file` contains every one of `needles`; its text.
async fn wait_for_all(file: &Path, needles: &[&str], what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        let missing: Vec<_> = needles.iter().filter(|n| !text.contains(*n)).collect();
        assert!(
            Instant::now() < deadline,
            "{what}: {missing:?} never appeared in {}:\n{text}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// TorchServe's test_handler_traceback_logging handler: initialize fails five calls deep.
const FAILING: &str = "\
class FailingModel(object):
    def initialize(self, context):
        self.call1()

    def handle(self, data, context):
        return None

    def call1(self):
        self.call2()

    def call2(self):
        self.call3()

    def call3(self):
        assert False, 'deliberate failure in call3'
";

async fn start_up_failure_is_logged_with_its_traceback(runtime: &str, torchserve_worker: bool) {
    let store = tempfile::tempdir().unwrap();
    model_folder(store.path(), "failing", FAILING);
    let s = Server::start_store(
        &format!("{runtime}default_workers_per_model=1\ndefault_startup_timeout=60"),
        store.path(),
        "",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    // Registered without waiting: the load fails in the background, again on every retry.
    let (status, body) = s
        .mgmt(
            reqwest::Method::POST,
            "/models?url=failing&initial_workers=1&synchronous=false",
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let logs = s.path().join("logs");
    // The whole traceback, line by line, in model_log.log (TorchServe's MODEL_LOG).
    let model_log = wait_for_all(
        &logs.join("model_log.log"),
        &[
            "Traceback (most recent call last):",
            "in initialize",
            "self.call1()",
            "in call1",
            "self.call2()",
            "in call2",
            "self.call3()",
            "in call3",
            "assert False, 'deliberate failure in call3'",
            "AssertionError: deliberate failure in call3",
        ],
        "the handler's traceback",
    )
    .await;
    assert!(model_log.contains("failing"), "{model_log}");
    // The frontend's line operators grep, with the retry.
    let ts_log = wait_for_all(
        &logs.join("ts_log.log"),
        &["Backend worker error", "Retry worker: W-"],
        "the frontend's failure lines",
    )
    .await;
    assert!(ts_log.contains("failing"), "{ts_log}");
    // With TorchServe's worker (which dies on a failed load, as under TorchServe) the exception's
    // last line appears once per failure, in the traceback: the frontend's line does not repeat
    // the worker's last output (TorchServe's test reads up to each `AssertionError` as one
    // attempt). oxserve's runtime answers the load with the exception as its reason instead of
    // dying, and the frontend line names that reason.
    if torchserve_worker {
        for line in ts_log
            .lines()
            .filter(|l| l.contains("Backend worker error"))
        {
            assert!(!line.contains("AssertionError"), "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_failure_traceback_with_oxserve_runtime() {
    start_up_failure_is_logged_with_its_traceback("", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs TorchServe's Python: OXSERVE_TEST_TORCHSERVE_PYTHON=/work/ts-venv/bin/python"]
async fn start_up_failure_traceback_with_torchserve_worker() {
    start_up_failure_is_logged_with_its_traceback(&torchserve_runtime(), true).await;
}

/// Answers the Python type the body arrived as, and the value when it is a dict.
const TYPES: &str = "\
import json

class Types(object):
    def initialize(self, context):
        pass

    def handle(self, data, context):
        out = []
        for row in data:
            body = row.get('body', row.get('data'))
            out.append(json.dumps({'type': type(body).__name__,
                                   'value': body if isinstance(body, dict) else None}))
        return out
";

async fn json_with_parameters_reaches_the_worker_as_json(runtime: &str) {
    let store = tempfile::tempdir().unwrap();
    // (Not "types": the handler module would shadow Python's own `types`.)
    model_folder(store.path(), "body_types", TYPES);
    let s = Server::start_store(
        &format!("{runtime}default_workers_per_model=1"),
        store.path(),
        "body_types",
        &[],
    );
    s.wait_healthy().await;
    let send = |content_type: &'static str, body: &'static str| {
        let r = s
            .client
            .post(format!("{}/predictions/body_types", s.inference))
            .header("content-type", content_type)
            .body(body);
        async move {
            let r = r.send().await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            assert_eq!(status, 200, "{content_type}: {text}");
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{content_type}: {e}: {text}"))
        }
    };
    for content_type in [
        "application/json",
        "application/json;",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
    ] {
        let v = send(content_type, r#"{"x": [1, 2]}"#).await;
        assert_eq!(v["type"], "dict", "{content_type}: {v}");
        assert_eq!(v["value"]["x"][1], 2, "{content_type}: {v}");
    }
    // Text stays text with its charset, bytes stay bytes.
    let v = send("text/plain; charset=utf-8", "hello").await;
    assert_eq!(v["type"], "str", "{v}");
    let v = send("application/octet-stream", "hello").await;
    assert!(v["type"] == "bytearray" || v["type"] == "bytes", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_with_parameters_with_oxserve_runtime() {
    json_with_parameters_reaches_the_worker_as_json("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs TorchServe's Python: OXSERVE_TEST_TORCHSERVE_PYTHON=/work/ts-venv/bin/python"]
async fn json_with_parameters_with_torchserve_worker() {
    json_with_parameters_reaches_the_worker_as_json(&torchserve_runtime()).await;
}

/// The metric logs are TorchServe's `${env:METRICS_LOCATION:-logs}`: created in every metrics
/// mode (empty of metric lines in prometheus mode, as TorchServe's MetricBuilder makes Prometheus
/// metrics there, never log metrics), and in `./logs` even when LOG_LOCATION moves the other logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_logs_exist_in_every_mode_and_ignore_log_location() {
    for mode in ["prometheus", "log"] {
        let elsewhere = tempfile::tempdir().unwrap();
        let s = Server::start_with_env(
            &format!("metrics_mode={mode}\ndefault_workers_per_model=1\nmetric_time_interval=1"),
            &[],
            &[("LOG_LOCATION", elsewhere.path().to_str().unwrap())],
        );
        s.wait_healthy().await;
        assert_eq!(s.predict("demo", r#""good""#).await.status(), 200);
        let metrics_dir = s.path().join("logs");
        // The server's own log follows LOG_LOCATION...
        wait_for_all(
            &elsewhere.path().join("ts_log.log"),
            &["Model server started."],
            mode,
        )
        .await;
        // ...the metric logs do not.
        for file in ["ts_metrics.log", "model_metrics.log"] {
            assert!(metrics_dir.join(file).is_file(), "{mode}: {file}");
            assert!(!elsewhere.path().join(file).exists(), "{mode}: {file}");
        }
        let ts_metrics = metrics_dir.join("ts_metrics.log");
        if mode == "log" {
            wait_for_all(&ts_metrics, &["Requests2XX.Count:1"], mode).await;
        } else {
            let mut s = s;
            assert!(s.stop().success());
            let text = std::fs::read_to_string(&ts_metrics).unwrap();
            assert!(
                text.is_empty(),
                "prometheus mode wrote metric lines: {text}"
            );
        }
    }
}
