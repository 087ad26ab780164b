//! The Python backend driven through the Backend trait, with real Python worker processes.
//!
//! Needs `python3` (3.8+, standard library only) on PATH. Timeouts are generous and nothing asserts
//! on timing: waits are "until this is true, or fail after a long time".

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxserve::backend::python::PythonLoader;
use oxserve::backend::{
    Backend, BackendError, BackendLoader, InferRequest, InferResponse, ModelSpec, NoStream, Param,
    StreamSink, WorkerSpec,
};
use oxserve::config::{Config, Overrides};
use oxserve::metrics::spec::Spec;
use oxserve::metrics::{Metrics, Settings};
use oxserve::model::archive::Manifest;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

static PORT: AtomicU32 = AtomicU32::new(9000);

/// A folder laid out like an unpacked .mar: MAR-INF/MANIFEST.json and the handler file.
fn model_dir(name: &str, handler_file: &str, source: &str, handler: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("oxs-test-")
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("MAR-INF")).unwrap();
    let manifest = serde_json::json!({
        "createdOn": "28/11/2026 12:00:00",
        "runtime": "python",
        "model": {"modelName": name, "modelVersion": "1.0", "handler": handler},
        "archiverVersion": "0.12.0"
    });
    std::fs::write(
        dir.path().join("MAR-INF/MANIFEST.json"),
        manifest.to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join(handler_file), source).unwrap();
    dir
}

/// A model folder named `name` whose handler is the example file `rel` (examples/`rel`).
fn example_dir(name: &str, rel: &str) -> tempfile::TempDir {
    let file = Path::new(rel).file_name().unwrap().to_str().unwrap();
    model_dir(name, file, &example(rel), file)
}

fn example(rel: &str) -> String {
    std::fs::read_to_string(Path::new(EXAMPLES).join(rel)).unwrap()
}

fn config(props: &[(&str, &str)]) -> Config {
    let file: HashMap<String, String> = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_sources(file, &[], &Overrides::default())
        .unwrap()
        .0
}

fn spec(dir: &Path, name: &str, metrics: Arc<Metrics>, config: Config) -> WorkerSpec {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("MAR-INF/MANIFEST.json")).unwrap()).unwrap();
    let port = PORT.fetch_add(1, Ordering::Relaxed);
    WorkerSpec {
        id: port,
        name: format!("W-{port}-{name}_1.0"),
        gpu_id: -1,
        model: Arc::new(ModelSpec {
            model_name: name.into(),
            model_version: "1.0".into(),
            model_dir: dir.to_path_buf(),
            manifest: Arc::new(manifest),
            batch_size: 8,
            startup_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(60),
            metrics,
            settings: Arc::new(config),
        }),
    }
}

async fn load(dir: &Path, name: &str) -> Box<dyn Backend> {
    let metrics = Arc::new(Metrics::for_tests());
    PythonLoader::new()
        .load(&spec(dir, name, metrics, config(&[])))
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"))
}

fn request(id: &str, content_type: &str, body: &[u8]) -> InferRequest {
    InferRequest {
        id: id.into(),
        headers: vec![("x-test".into(), format!("header-of-{id}"))],
        params: vec![Param {
            name: "body".into(),
            content_type: content_type.into(),
            value: Bytes::copy_from_slice(body),
        }],
    }
}

fn text(body: &str) -> InferRequest {
    request(&format!("id-{body}"), "text/plain", body.as_bytes())
}

fn json(r: &InferResponse) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&r.body)))
}

/// Loads `spec`, expecting a load error; its message.
async fn load_error(loader: &PythonLoader, spec: &WorkerSpec) -> String {
    match loader.load(spec).await {
        Err(BackendError::Load(m)) => m,
        Err(e) => panic!("expected Load, got {e:?}"),
        Ok(_) => panic!("expected a Load error"),
    }
}

/// Runs `batch`, expecting the whole batch to fail; the status and message.
async fn infer_failure(backend: &mut Box<dyn Backend>, batch: &[InferRequest]) -> (u16, String) {
    match backend.infer(batch, &NoStream).await {
        Err(BackendError::Failed { status, message }) => (status, message),
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Runs `batch`, expecting the worker to die; the reason.
async fn infer_died(backend: &mut Box<dyn Backend>, batch: &[InferRequest]) -> String {
    match backend.infer(batch, &NoStream).await {
        Err(BackendError::Died(reason)) => reason,
        other => panic!("expected Died, got {other:?}"),
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn echo_batch_of_three_in_order() {
    let dir = example_dir("echo", "echo/echo_handler.py");
    let mut backend = load(dir.path(), "echo").await;
    assert!(backend.pid().is_some());
    assert!(backend.reports_handler_metrics());
    let batch = vec![
        request("a", "application/json", br#"{"x": [1, 2]}"#),
        request("b", "text/plain; charset=utf-8", "héllo".as_bytes()),
        request("c", "application/octet-stream", b"\x00\xffraw"),
    ];
    let replies = backend.infer(&batch, &NoStream).await.unwrap();
    assert_eq!(replies.len(), 3);
    assert_eq!(replies[0].status, 200);
    assert_eq!(replies[0].content_type, "application/json");
    assert_eq!(json(&replies[0]), serde_json::json!({"x": [1, 2]}));
    assert_eq!(&replies[1].body[..], "héllo".as_bytes());
    assert_eq!(replies[1].content_type, "");
    assert_eq!(&replies[2].body[..], b"\x00\xffraw");
    // A second batch on the same worker.
    let replies = backend.infer(&[text("again")], &NoStream).await.unwrap();
    assert_eq!(&replies[0].body[..], b"again");
    // Duplicate ids (clients choose their own x-request-id) are told apart on the wire: each
    // request gets its own reply, in order, and the worker stays in step.
    let dup = [
        request("d", "text/plain", b"first"),
        request("d", "text/plain", b"second"),
    ];
    let replies = backend.infer(&dup, &NoStream).await.unwrap();
    assert_eq!(&replies[0].body[..], b"first");
    assert_eq!(&replies[1].body[..], b"second");
    let replies = backend.infer(&[text("after")], &NoStream).await.unwrap();
    assert_eq!(&replies[0].body[..], b"after");
    backend.shutdown().await;
}

const INSPECT: &str = r#"
def handle(data, context):
    if data is None:
        return None
    out = []
    for idx, req in enumerate(data):
        body = req.get("body")
        context.set_response_header(idx, "x-request-id", context.get_request_id(idx))
        if isinstance(body, str) and body == "teapot":
            context.set_response_status(418, "I'm a teapot", idx)
        out.append({
            "type": type(body).__name__,
            "header": context.get_request_header(idx, "x-test"),
            "param_type": context.get_request_header(idx, "body"),
            "model_name": context.model_name,
            "manifest_handler": context.manifest["model"]["handler"],
            "batch_size": context.system_properties["batch_size"],
            "gpu_id": context.system_properties["gpu_id"],
            "model_dir_ok": context.system_properties["model_dir"] != "",
        })
    return out
"#;

#[tokio::test]
async fn decoding_context_and_per_request_status() {
    let dir = model_dir("inspect", "inspector.py", INSPECT, "inspector:handle");
    let mut backend = load(dir.path(), "inspect").await;
    let batch = vec![
        request("j", "application/json", b"[1, 2, 3]"),
        request("t", "text/csv", b"a,b"),
        request("b", "image/png", b"\x89PNG"),
        request("bad", "application/json", b"{not json"),
        text("teapot"),
    ];
    let replies = backend.infer(&batch, &NoStream).await.unwrap();
    let types: Vec<String> = replies
        .iter()
        .map(|r| json(r)["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["list", "str", "bytes", "bytes", "str"]);
    let first = json(&replies[0]);
    assert_eq!(first["header"], "header-of-j");
    assert_eq!(
        first["param_type"],
        serde_json::json!({"content-type": "application/json"})
    );
    assert_eq!(first["model_name"], "inspect");
    assert_eq!(first["manifest_handler"], "inspector:handle");
    assert_eq!(first["batch_size"], 8);
    assert_eq!(first["gpu_id"], serde_json::Value::Null);
    assert_eq!(first["model_dir_ok"], true);
    assert!(replies[..4].iter().all(|r| r.status == 200));
    assert_eq!(replies[4].status, 418);
    let rid = replies[2].headers.iter().find(|(k, _)| k == "x-request-id");
    assert_eq!(rid.map(|(_, v)| v.as_str()), Some("b"));
    // The content type travels in its own field, not twice.
    assert!(replies[0].headers.iter().all(|(k, _)| k != "content-type"));
    backend.shutdown().await;
}

const FLAKY: &str = r#"
from ts.utils.util import PredictionException

class Flaky:
    def initialize(self, context):
        self.ready = True

    def handle(self, data, context):
        bodies = [d.get("body") for d in data]
        if "fail" in bodies:
            raise ValueError("boom: the handler failed on purpose")
        if "custom" in bodies:
            raise PredictionException("not today", 429)
        if "short" in bodies:
            return bodies[:-1]
        if "notalist" in bodies:
            return "nope"
        return bodies
"#;

#[tokio::test]
async fn handler_errors_fail_the_batch_and_the_worker_keeps_serving() {
    let dir = model_dir("flaky", "flaky.py", FLAKY, "flaky.py");
    let mut backend = load(dir.path(), "flaky").await;

    let (status, message) = infer_failure(&mut backend, &[text("ok1"), text("fail")]).await;
    assert_eq!(status, 503);
    assert!(
        message.contains("boom: the handler failed on purpose"),
        "{message}"
    );
    assert!(message.contains("ValueError"), "{message}");
    let replies = backend.infer(&[text("ok2")], &NoStream).await.unwrap();
    assert_eq!(&replies[0].body[..], b"ok2");

    let (status, message) = infer_failure(&mut backend, &[text("custom")]).await;
    assert_eq!(status, 429);
    assert_eq!(message, "not today");

    let (status, message) =
        infer_failure(&mut backend, &[text("x"), text("y"), text("short")]).await;
    assert_eq!(status, 503);
    assert!(
        message.contains("returned 2 replies for a batch of 3"),
        "{message}"
    );
    let (_, message) = infer_failure(&mut backend, &[text("notalist")]).await;
    assert!(
        message.contains("returned str, expected a list"),
        "{message}"
    );
    let replies = backend.infer(&[text("ok3")], &NoStream).await.unwrap();
    assert_eq!(&replies[0].body[..], b"ok3");
    backend.shutdown().await;
}

const UNDECLARED: &str = r#"
import importlib.util, os
spec = importlib.util.spec_from_file_location("mh", os.path.join(os.path.dirname(__file__), "metrics_handler_impl.py"))
mh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mh)

class Wrapped(mh.MetricsHandler):
    def handle(self, data, context):
        context.metrics.add_counter("NotInYaml", 1)
        return super().handle(data, context)
"#;

#[tokio::test]
async fn custom_metrics_reach_the_registry() {
    let dir = model_dir("mm", "wrapped.py", UNDECLARED, "wrapped.py");
    std::fs::write(
        dir.path().join("metrics_handler_impl.py"),
        example("custom_metrics/metrics_handler.py"),
    )
    .unwrap();
    let yaml_path = PathBuf::from(EXAMPLES).join("custom_metrics/metrics.yaml");
    let spec_text = std::fs::read_to_string(&yaml_path).unwrap();
    let metric_spec = Spec::parse(&spec_text, "metrics.yaml").unwrap();
    let metrics = Arc::new(Metrics::new(&metric_spec, Settings::for_tests()));
    let cfg = config(&[("metrics_config", yaml_path.to_str().unwrap())]);
    let mut backend = PythonLoader::new()
        .load(&spec(dir.path(), "mm", metrics.clone(), cfg))
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"));
    let replies = backend
        .infer(&[text("hello"), text("sixteen chars..!")], &NoStream)
        .await
        .unwrap();
    assert_eq!(json(&replies[1])["chars"], 16);

    let labels = r#"{ModelName="mm",Level="Model",Hostname="testhost",}"#;
    let expected = [
        format!("InferenceRequestCount{labels} 2"),
        format!("InputChars_count{labels} 2"),
        format!("InputChars_sum{labels} 21"),
        format!("BatchFill{labels} 25"),
        r#"PreprocessTime{Stage="pre",ModelName="mm",Level="Model",Hostname="testhost",}"#
            .to_string(),
        format!("HandlerTime{labels}"),
        format!("PredictionTime{labels}"),
        r#"oxserve_backend_metric_lines_dropped_total{reason="undeclared",} 1"#.to_string(),
    ];
    let start = Instant::now();
    let last = loop {
        let last = metrics.render(None);
        if expected.iter().all(|e| last.contains(e.as_str())) {
            break last;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let missing: Vec<&String> = expected
                .iter()
                .filter(|e| !last.contains(e.as_str()))
                .collect();
            panic!("missing {missing:?} in:\n{last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!last.contains("NotInYaml"), "{last}");
    // InputSize is 0.0048828125 kB ("hello") then 0.015625 kB: a gauge keeps the last value.
    assert!(
        last.contains(&format!("InputSize{labels} 0.015625")),
        "{last}"
    );
    assert!(
        last.contains(r#"oxserve_backend_metric_lines_dropped_total{reason="malformed",} 0"#),
        "{last}"
    );
    backend.shutdown().await;
}

/// Records every partial part with the number of parts seen so far.
#[derive(Default)]
struct Collect(Mutex<Vec<(usize, InferResponse)>>);

impl StreamSink for Collect {
    fn send_partial(&self, index: usize, part: InferResponse) {
        self.0.lock().unwrap().push((index, part));
    }
}

#[tokio::test]
async fn streaming_parts_reach_the_sink_before_the_final_reply() {
    let dir = example_dir("stream", "streaming/stream_handler.py");
    let mut backend = load(dir.path(), "stream").await;
    let sink = Collect::default();
    let replies = backend.infer(&[text("a"), text("b")], &sink).await.unwrap();
    let parts = std::mem::take(&mut *sink.0.lock().unwrap());
    assert_eq!(parts.len(), 6, "three parts for each of two requests");
    for (n, (index, part)) in parts.iter().enumerate() {
        assert_eq!(*index, n % 2);
        let who = if n % 2 == 0 { "a" } else { "b" };
        assert_eq!(
            String::from_utf8_lossy(&part.body),
            format!("{who}: part {}\n", n / 2 + 1)
        );
        assert!(part
            .headers
            .contains(&("ts_stream_next".into(), "true".into())));
    }
    assert_eq!(&replies[0].body[..], b"a: done\n");
    assert_eq!(&replies[1].body[..], b"b: done\n");
    assert!(replies[0]
        .headers
        .contains(&("ts_stream_next".into(), "false".into())));
    // The worker stays in step for the next batch.
    let replies = backend.infer(&[text("c")], &sink).await.unwrap();
    assert_eq!(&replies[0].body[..], b"c: done\n");
    assert_eq!(sink.0.lock().unwrap().len(), 3);
    backend.shutdown().await;
}

#[tokio::test]
async fn batching_example_sees_the_whole_batch() {
    let dir = example_dir("batch", "batching/batch_handler.py");
    let mut backend = load(dir.path(), "batch").await;
    let replies = backend
        .infer(&[text("1"), text("2"), text("3")], &NoStream)
        .await
        .unwrap();
    for (i, r) in replies.iter().enumerate() {
        let v = json(r);
        assert_eq!(v["batch_size"], 3);
        assert_eq!(v["max_batch_size"], 8);
        assert_eq!(v["request_id"], format!("id-{}", i + 1));
    }
    backend.shutdown().await;
}

#[tokio::test]
async fn killed_worker_reports_died() {
    let dir = example_dir("echo", "echo/echo_handler.py");
    let mut backend = load(dir.path(), "echo").await;
    let pid = backend.pid().unwrap();
    // SAFETY: plain syscall on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let reason = infer_died(&mut backend, &[text("x")]).await;
    assert!(
        reason.contains("SIGKILL") || reason.contains("signal"),
        "{reason}"
    );
    // And it stays dead.
    assert!(matches!(
        backend.infer(&[text("x")], &NoStream).await,
        Err(BackendError::Died(_))
    ));
    assert!(!common::pid_alive(pid.into()));
    backend.shutdown().await;
}

const SLOW: &str = r#"
import time

def handle(data, context):
    if data is None:
        return None
    if data[0].get("body") == "sleep":
        time.sleep(300)
    return [d.get("body") for d in data]
"#;

#[tokio::test]
async fn response_timeout_kills_the_worker() {
    let dir = model_dir("slow", "slow.py", SLOW, "slow.py");
    let metrics = Arc::new(Metrics::for_tests());
    let mut s = spec(dir.path(), "slow", metrics, config(&[]));
    // The spec was just built: its model part is not shared yet.
    Arc::get_mut(&mut s.model).unwrap().response_timeout = Duration::from_secs(2);
    let mut backend = PythonLoader::new().load(&s).await.unwrap();
    let pid = backend.pid().unwrap();
    assert_eq!(
        &backend.infer(&[text("fast")], &NoStream).await.unwrap()[0].body[..],
        b"fast"
    );
    let reason = infer_died(&mut backend, &[text("sleep")]).await;
    assert!(reason.contains("timed out after 2s"), "{reason}");
    assert!(!common::pid_alive(pid.into()));
    backend.shutdown().await;
}

const SPAWNS: &str = r#"
import subprocess

child = None

def handle(data, context):
    global child
    if child is None:
        child = subprocess.Popen(["sleep", "300"])
    if data is None:
        return None
    return [str(child.pid) for _ in data]
"#;

#[tokio::test]
async fn shutdown_leaves_no_process_behind() {
    let dir = model_dir("spawns", "spawns.py", SPAWNS, "spawns.py");
    let mut backend = load(dir.path(), "spawns").await;
    let pid = backend.pid().unwrap();
    let replies = backend.infer(&[text("x")], &NoStream).await.unwrap();
    let grandchild: u32 = String::from_utf8_lossy(&replies[0].body).parse().unwrap();
    assert!(common::pid_alive(pid.into()) && common::pid_alive(grandchild.into()));
    backend.shutdown().await;
    assert!(
        !common::pid_alive(pid.into()),
        "worker {pid} survived shutdown"
    );
    // The handler's own subprocess shares the worker's process group and goes with it.
    wait_until("the handler's subprocess to go", || {
        !common::pid_alive(grandchild.into())
    })
    .await;
}

#[tokio::test]
async fn dropping_a_backend_kills_its_process_group() {
    let dir = model_dir("spawns", "spawns.py", SPAWNS, "spawns.py");
    let mut backend = load(dir.path(), "spawns").await;
    let pid = backend.pid().unwrap();
    let replies = backend.infer(&[text("x")], &NoStream).await.unwrap();
    let grandchild: u32 = String::from_utf8_lossy(&replies[0].body).parse().unwrap();
    drop(backend);
    wait_until("the worker to go", || !common::pid_alive(pid.into())).await;
    wait_until("the handler's subprocess to go", || {
        !common::pid_alive(grandchild.into())
    })
    .await;
}

#[tokio::test]
async fn load_errors_are_clear() {
    let metrics = Arc::new(Metrics::for_tests());
    let loader = PythonLoader::new();

    // (model, handler file, its source, manifest handler, what the error says)
    let cases = [
        ("broken", "broken.py", "import no_such_module_xyz\n", "broken.py", "no_such_module_xyz"),
        ("missing", "other.py", "", "image_classifier", "worker_runtime=torchserve"),
        (
            "init",
            "init.py",
            "def initialize(ctx):\n    raise RuntimeError('no weights here')\n\ndef handle(d, c):\n    return d\n",
            "init.py",
            "no weights here",
        ),
    ];
    for (name, file, source, handler, says) in cases {
        let dir = model_dir(name, file, source, handler);
        let m = load_error(
            &loader,
            &spec(dir.path(), name, metrics.clone(), config(&[])),
        )
        .await;
        assert!(m.contains(says), "{name}: {m}");
    }

    let dir = example_dir("echo", "echo/echo_handler.py");
    let cfg = config(&[("python_executable", "/nonexistent/python3")]);
    let m = load_error(&loader, &spec(dir.path(), "echo", metrics.clone(), cfg)).await;
    assert!(m.contains("/nonexistent/python3"), "{m}");
}

#[tokio::test]
async fn torchserve_runtime_without_torchserve_says_so() {
    // An interpreter that cannot import torchserve whatever is installed here: python3 without
    // site-packages (-S) and without PYTHONPATH (-E).
    let bin = tempfile::Builder::new()
        .prefix("oxs-test-")
        .tempdir()
        .unwrap();
    let python = bin.path().join("python-without-site");
    std::fs::write(&python, "#!/bin/sh\nexec python3 -S -E \"$@\"\n").unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dir = example_dir("echo", "echo/echo_handler.py");
    let cfg = config(&[
        ("worker_runtime", "torchserve"),
        ("python_executable", python.to_str().unwrap()),
    ]);
    let metrics = Arc::new(Metrics::for_tests());
    let m = load_error(
        &PythonLoader::new(),
        &spec(dir.path(), "echo", metrics, cfg),
    )
    .await;
    assert!(m.contains("needs the torchserve package"), "{m}");
}

/// The MANIFEST.json torch-model-archiver 0.12.0 writes for examples/echo (captured from
/// examples/make_archives.sh).
const ARCHIVER_MANIFEST: &str = r#"{
  "createdOn": "28/11/2026 12:55:52",
  "runtime": "python",
  "model": {
    "modelName": "echo",
    "handler": "echo_handler.py",
    "modelVersion": "1.0"
  },
  "archiverVersion": "0.12.0"
}"#;

#[tokio::test]
async fn serves_from_a_mar_archive() {
    use std::io::Write;
    let store = tempfile::tempdir().unwrap();
    let mar = store.path().join("echo.mar");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&mar).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("echo_handler.py", opts).unwrap();
    zip.write_all(example("echo/echo_handler.py").as_bytes())
        .unwrap();
    zip.start_file("MAR-INF/MANIFEST.json", opts).unwrap();
    zip.write_all(ARCHIVER_MANIFEST.as_bytes()).unwrap();
    zip.finish().unwrap();

    let unpacked = oxserve::model::archive::open(&mar, &Default::default()).unwrap();
    let port = PORT.fetch_add(1, Ordering::Relaxed);
    let spec = WorkerSpec {
        id: port,
        name: format!("W-{port}-echo_1.0"),
        gpu_id: -1,
        model: Arc::new(ModelSpec {
            model_name: unpacked.manifest.model.model_name.clone(),
            model_version: unpacked.manifest.model.model_version.clone(),
            model_dir: unpacked.dir.clone(),
            manifest: Arc::new(unpacked.manifest.clone()),
            batch_size: 1,
            startup_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(60),
            metrics: Arc::new(Metrics::for_tests()),
            settings: Arc::new(config(&[])),
        }),
    };
    let mut backend = PythonLoader::new().load(&spec).await.unwrap();
    let replies = backend
        .infer(
            &[request("r1", "application/json", br#"{"text": "hi"}"#)],
            &NoStream,
        )
        .await
        .unwrap();
    assert_eq!(json(&replies[0]), serde_json::json!({"text": "hi"}));
    backend.shutdown().await;
}

/// The same backend against TorchServe's own worker. Opt-in (it needs torchserve and torch, about
/// 5 GB): `OXSERVE_TEST_TORCHSERVE_PYTHON=/path/to/venv/bin/python cargo test --test python_backend
/// -- --ignored torchserve_worker`.
#[tokio::test]
#[ignore = "needs TorchServe's Python: OXSERVE_TEST_TORCHSERVE_PYTHON=/path/bin/python cargo test --test python_backend -- --ignored torchserve_worker"]
async fn torchserve_worker_when_available() {
    let python = std::env::var("OXSERVE_TEST_TORCHSERVE_PYTHON").expect(
        "OXSERVE_TEST_TORCHSERVE_PYTHON names the python of an environment with torchserve",
    );
    let cfg = || {
        config(&[
            ("worker_runtime", "torchserve"),
            ("python_executable", &python),
        ])
    };
    let loader = PythonLoader::new();
    let metrics = Arc::new(Metrics::for_tests());

    let dir = example_dir("echo", "echo/echo_handler.py");
    let mut backend = loader
        .load(&spec(dir.path(), "echo", metrics.clone(), cfg()))
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"));
    let batch = vec![
        request("a", "application/json", br#"{"x": 1}"#),
        request("b", "text/plain", b"hello"),
        request("c", "application/octet-stream", b"\x00raw"),
    ];
    let replies = backend.infer(&batch, &NoStream).await.unwrap();
    assert_eq!(json(&replies[0]), serde_json::json!({"x": 1}));
    assert_eq!(&replies[1].body[..], b"hello");
    assert_eq!(&replies[2].body[..], b"\x00raw");
    let labels = r#"{ModelName="echo",Level="Model",Hostname="testhost",}"#;
    wait_until("PredictionTime from TorchServe's worker", || {
        metrics
            .render(None)
            .contains(&format!("PredictionTime{labels}"))
    })
    .await;
    backend.shutdown().await;

    let dir = example_dir("stream", "streaming/stream_handler.py");
    let mut backend = loader
        .load(&spec(dir.path(), "stream", metrics.clone(), cfg()))
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"));
    let sink = Collect::default();
    let replies = backend.infer(&[text("a")], &sink).await.unwrap();
    assert_eq!(sink.0.lock().unwrap().len(), 3);
    assert_eq!(&replies[0].body[..], b"a: done\n");
    backend.shutdown().await;

    let dir = model_dir("flaky", "flaky.py", FLAKY, "flaky.py");
    let mut backend = loader
        .load(&spec(dir.path(), "flaky", metrics.clone(), cfg()))
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"));
    let (status, message) = infer_failure(&mut backend, &[text("fail")]).await;
    assert_eq!((status, message.as_str()), (503, "Prediction failed"));
    let replies = backend.infer(&[text("ok")], &NoStream).await.unwrap();
    assert_eq!(&replies[0].body[..], b"ok");
    let pid = backend.pid().unwrap();
    backend.shutdown().await;
    assert!(!common::pid_alive(pid.into()));
}
