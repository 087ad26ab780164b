//! Python handler workers behind the real server: archives made by the real torch-model-archiver,
//! real Python processes, real HTTP.

mod common;

use common::Server;
use reqwest::Method;
use std::path::Path;
use std::time::{Duration, Instant};

fn start(props: &str, models: &str) -> Server {
    let store = common::example_archives().to_str().unwrap().to_string();
    Server::start(
        props,
        &[
            "--model-store",
            &store,
            "--models",
            models,
            "--enable-model-api",
        ],
    )
}

async fn worker_pids(s: &Server, model: &str) -> Vec<u64> {
    let (_, d) = s.mgmt(Method::GET, &format!("/models/{model}")).await;
    d[0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_archive_answers_through_a_python_worker() {
    let s = start("default_workers_per_model=1", "echo.mar");
    s.wait_healthy().await;
    let r = s.predict("echo", r#"{"hello": "world"}"#).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"hello": "world"})
    );
    let r = s
        .client
        .post(format!("{}/predictions/echo", s.inference))
        .header("content-type", "text/plain")
        .body("plain text")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "plain text");
    let (_, d) = s.mgmt(Method::GET, "/models/echo").await;
    assert_eq!(d[0]["runtime"], "python");
    let pid = d[0]["workers"][0]["pid"].as_u64().unwrap();
    assert_ne!(pid, u64::from(std::process::id()));
    assert!(common::pid_alive(pid));
    // HandlerTime and PredictionTime come from the worker runtime with TorchServe's labels.
    let text = s.scrape().await;
    assert!(
        common::sample(&text, "HandlerTime{ModelName=\"echo\",Level=\"Model\",").is_some(),
        "{text}"
    );
    assert!(common::sample(&text, "PredictionTime{ModelName=\"echo\",Level=\"Model\",").is_some());
    // Worker output reaches the log under the worker's name.
    assert!(s.log().contains("W-9000-echo_1.0"), "{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_reach_one_handler_call() {
    let s = start("default_workers_per_model=1", "echo.mar");
    s.wait_healthy().await;
    let (code, v) = s
        .mgmt(Method::POST, "/models?url=batching.mar&batch_size=4&max_batch_delay=5000&initial_workers=1&synchronous=true")
        .await;
    assert_eq!(code, 200, "{v}");
    let url = format!("{}/predictions/batching", s.inference);
    let replies = common::concurrently(4, |i| {
        let (c, u) = (s.client.clone(), url.clone());
        async move {
            let r = c
                .post(u)
                .header("content-type", "application/json")
                .body(format!("{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    })
    .await;
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r["batch_size"], 4, "{r}");
        assert_eq!(r["batch_number"], 1);
        assert_eq!(r["input"], i as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_metrics_reach_the_registry_with_their_labels() {
    let root = env!("CARGO_MANIFEST_DIR");
    let s = start(
        &format!("default_workers_per_model=1\nmetrics_config={root}/examples/custom_metrics/metrics.yaml"),
        "custom_metrics.mar",
    );
    s.wait_healthy().await;
    for text in ["abc", "hello world"] {
        let r = s
            .client
            .post(format!("{}/predictions/custom_metrics", s.inference))
            .header("content-type", "text/plain")
            .body(text)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut text = String::new();
    for _ in 0..100 {
        text = s.scrape().await;
        if common::sample(&text, "InputChars_count{").is_some_and(|v| v >= 2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        common::sample(
            &text,
            "InferenceRequestCount{ModelName=\"custom_metrics\",Level=\"Model\","
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        common::sample(
            &text,
            "InputChars_count{ModelName=\"custom_metrics\",Level=\"Model\","
        ),
        Some(2.0)
    );
    assert_eq!(
        common::sample(
            &text,
            "InputChars_sum{ModelName=\"custom_metrics\",Level=\"Model\","
        ),
        Some(14.0)
    );
    // Declared buckets from metrics.yaml.
    assert!(
        text.contains("InputChars_bucket{ModelName=\"custom_metrics\",Level=\"Model\",Hostname=")
    );
    assert!(text.contains(",le=\"8.0\",} 1.0\n"), "{text}");
    assert!(common::sample(
        &text,
        "PreprocessTime{Stage=\"pre\",ModelName=\"custom_metrics\",Level=\"Model\","
    )
    .is_some());
    assert!(text.contains("# HELP InputSize Torchserve prometheus gauge metric with unit: kB"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streaming_example_answers_in_chunks() {
    let s = start("default_workers_per_model=1", "streaming.mar");
    s.wait_healthy().await;
    let mut r = s.predict("streaming", r#"{"text": "hi"}"#).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ts_stream_next"], "true");
    let mut chunks = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        chunks.push(String::from_utf8_lossy(&chunk).into_owned());
    }
    assert_eq!(
        chunks.concat(),
        "hi: part 1\nhi: part 2\nhi: part 3\nhi: done\n"
    );
    let p = r#"{model_name="streaming",model_version="1.0"}"#;
    s.wait_sample(
        &format!("oxserve_time_to_first_chunk_seconds_count{p}"),
        |v| v == 1.0,
    )
    .await;
}

/// A streamed part reaches the client while its handler still runs: this handler sends one part,
/// then returns only once the file named in the request exists, which the test creates only after
/// it has read that part. A server that held parts back until the handler returned would never
/// deliver it (the handler gives up after 100 s and answers "gate never opened"). No timing.
const GATED: &str = r#"
import os, time
from ts.handler_utils.utils import send_intermediate_predict_response

def handle(data, context):
    if data is None:
        return None
    gate = data[0]["body"]
    gate = gate.decode() if isinstance(gate, (bytes, bytearray)) else str(gate)
    send_intermediate_predict_response(
        ["first\n"], context.request_ids, "Intermediate Prediction success", 200, context)
    deadline = time.time() + 100
    while not os.path.exists(gate):
        if time.time() > deadline:
            return ["gate never opened\n"]
        time.sleep(0.01)
    return ["last\n"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_part_reaches_the_client_before_the_handler_returns() {
    let store = tempfile::tempdir().unwrap();
    model_folder(store.path(), "gated", GATED);
    let s = Server::start_store("default_workers_per_model=1", store.path(), "gated", &[]);
    s.wait_healthy().await;
    let gate = store.path().join("gate");
    let mut r = s
        .client
        .post(format!("{}/predictions/gated", s.inference))
        .header("content-type", "text/plain")
        .body(gate.to_str().unwrap().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("the first part");
    assert_eq!(&first[..], b"first\n");
    std::fs::write(&gate, b"").unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(String::from_utf8_lossy(&rest), "last\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_restarted_and_the_server_keeps_answering() {
    let s = start("default_workers_per_model=1", "echo.mar");
    s.wait_healthy().await;
    let old = worker_pids(&s, "echo").await;
    assert_eq!(old.len(), 1);
    unsafe {
        libc::kill(old[0] as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = false;
    while Instant::now() < deadline {
        let r = s.predict("echo", r#""again""#).await;
        if r.status() == 200 {
            answered = true;
            break;
        }
        // While the worker is down a request fails with a 5xx that says so.
        assert!(r.status().is_server_error(), "{}", r.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "{}", s.log());
    let new = worker_pids(&s, "echo").await;
    assert_eq!(new.len(), 1);
    assert_ne!(new[0], old[0]);
    assert!(s.log().contains("restarting"), "{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_outlives_the_server() {
    // Stopped with SIGTERM: workers are stopped and reaped.
    let mut s = start("default_workers_per_model=2", "echo.mar");
    s.wait_healthy().await;
    let pids = worker_pids(&s, "echo").await;
    assert_eq!(pids.len(), 2);
    assert!(s.stop().success());
    for pid in &pids {
        assert!(
            !common::pid_alive(*pid),
            "worker {pid} survived SIGTERM of the server"
        );
    }
    // Killed with SIGKILL: the parent-death signal takes the workers down too.
    let mut s = start("default_workers_per_model=2", "echo.mar");
    s.wait_healthy().await;
    let pids = worker_pids(&s, "echo").await;
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| common::pid_alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in &pids {
        assert!(
            !common::pid_alive(*pid),
            "worker {pid} survived SIGKILL of the server"
        );
    }
}

/// Writes an unpacked model folder (the layout of a .mar) named `name` with handler `code`.
fn model_folder(store: &Path, name: &str, code: &str) {
    let handler = format!("{name}.py");
    common::model_folder(store, name, &handler, None, &[(&handler, code)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_batch_fails_it_with_a_5xx_and_is_replaced() {
    let store = tempfile::tempdir().unwrap();
    model_folder(
        store.path(),
        "sleepy",
        "import time\n\ndef handle(data, context):\n    if data is None:\n        return None\n    time.sleep(float(data[0].get('body', 0)))\n    return ['awake' for _ in data]\n",
    );
    let s = Server::start_store("default_workers_per_model=1", store.path(), "sleepy", &[]);
    s.wait_healthy().await;
    let pid = worker_pids(&s, "sleepy").await[0];
    let slow = {
        let (c, u) = (
            s.client.clone(),
            format!("{}/predictions/sleepy", s.inference),
        );
        tokio::spawn(async move {
            c.post(u)
                .header("content-type", "application/json")
                .body("30")
                .send()
                .await
                .unwrap()
        })
    };
    let busy = r#"oxserve_workers{model_name="sleepy",model_version="1.0",state="busy"}"#;
    for _ in 0..200 {
        if s.sample(busy).await == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("Worker died"),
        "{v}"
    );
    // The replacement serves, and the load time of the new worker is recorded.
    let mut ok = false;
    for _ in 0..100 {
        let r = s
            .client
            .post(format!("{}/predictions/sleepy", s.inference))
            .header("content-type", "application/json")
            .body("0")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "{}", s.log());
    assert_ne!(worker_pids(&s, "sleepy").await, vec![pid]);
    assert!(s
        .sample("WorkerLoadTime{WorkerName=\"W-9000-sleepy_1.0\"")
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_writes_handler_metrics_to_model_metrics_log() {
    let root = env!("CARGO_MANIFEST_DIR");
    let logs = tempfile::tempdir().unwrap();
    let store = common::example_archives().to_str().unwrap().to_string();
    let s = Server::start_with_env(
        &format!("default_workers_per_model=1\nmetrics_mode=log\nmetrics_config={root}/examples/custom_metrics/metrics.yaml"),
        &["--model-store", &store, "--models", "custom_metrics.mar"],
        &[("METRICS_LOCATION", logs.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    let r = s
        .client
        .post(format!("{}/predictions/custom_metrics", s.inference))
        .header("content-type", "text/plain")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(logs.path().join("model_metrics.log")).unwrap_or_default();
        if log.contains("InferenceRequestCount.") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 2024-05-30T21:46:03,626 - HandlerTime.ms:82.93|#ModelName:m,Level:Model|#hostname:h,requestID:<id>,timestamp:1717105563
    let line = log
        .lines()
        .find(|l| l.contains(" - InferenceRequestCount."))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(":1.0|#ModelName:custom_metrics,Level:Model|#hostname:"),
        "{line}"
    );
    assert!(
        line.contains(",requestID:") && line.contains(",timestamp:"),
        "{line}"
    );
    assert!(log.contains(" - HandlerTime.ms:"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_extra_path_reach_the_handler() {
    // An unpacked model folder (same layout as a .mar) whose handler reports what it was given.
    let store = tempfile::tempdir().unwrap();
    model_folder(
        store.path(),
        "peek",
        "def handle(data, context):\n    if data is None:\n        return None\n    return [{\n        'url_path': context.get_request_header(i, 'url_path'),\n        'explain': context.get_request_header(i, 'explain'),\n        'x_custom': context.get_request_header(i, 'x-custom'),\n        'params': sorted(r.keys()),\n    } for i, r in enumerate(data)]\n",
    );
    let s = Server::start_store("default_workers_per_model=1", store.path(), "peek", &[]);
    s.wait_healthy().await;
    let r = s
        .client
        .post(format!(
            "{}/predictions/peek/1.0/some/extra/path?k=v",
            s.inference
        ))
        .header("x-custom", "yes")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["url_path"], "some/extra/path");
    assert_eq!(v["x_custom"], "yes");
    assert_eq!(v["params"], serde_json::json!(["body", "k"]));
    let r = s
        .client
        .post(format!("{}/explanations/peek", s.inference))
        .body("x")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["explain"], "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_registration_that_cannot_load_fails_and_is_undone() {
    let store = tempfile::tempdir().unwrap();
    model_folder(
        store.path(),
        "broken",
        "import no_such_module_here\n\ndef handle(data, context):\n    return data\n",
    );
    let s = Server::start_store(
        "default_workers_per_model=1",
        store.path(),
        "",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    let (code, e) = s
        .mgmt(Method::POST, "/models?url=broken&synchronous=true")
        .await;
    assert_eq!(code, 500, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("no_such_module_here"),
        "{e}"
    );
    assert_eq!(s.mgmt(Method::GET, "/models/broken").await.0, 404);
    // Asynchronously it registers, keeps retrying with backoff, and /ping says Unhealthy.
    let (code, _) = s
        .mgmt(Method::POST, "/models?url=broken&synchronous=false")
        .await;
    assert_eq!(code, 202);
    let r = s
        .client
        .get(format!("{}/ping", s.inference))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_config_yaml_sets_workers_and_reaches_the_handler() {
    let store = tempfile::tempdir().unwrap();
    let handler = "def handle(data, context):\n    if data is None:\n        return None\n    return [context.model_yaml_config['handler'] for _ in data]\n";
    common::model_folder(
        store.path(),
        "cfg",
        "cfg.py",
        Some("minWorkers: 2\nmaxWorkers: 3\nbatchSize: 2\nmaxBatchDelay: 77\nresponseTimeout: 30\nhandler:\n  threshold: 0.5\n  labels: [cat, dog]\n"),
        &[("cfg.py", handler)],
    );
    // The same layout with a model-config.yaml that is not valid for its worker settings.
    common::model_folder(
        store.path(),
        "bad",
        "cfg.py",
        Some("minWorkers: 3\nmaxWorkers: 1\n"),
        &[("cfg.py", handler)],
    );

    let s = Server::start_store("", store.path(), "cfg", &["--enable-model-api"]);
    s.wait_healthy().await;
    let (_, d) = s.mgmt(Method::GET, "/models/cfg").await;
    let d = &d[0];
    assert_eq!(
        (d["minWorkers"].as_u64(), d["maxWorkers"].as_u64()),
        (Some(2), Some(3)),
        "{d}"
    );
    assert_eq!(
        (d["batchSize"].as_u64(), d["maxBatchDelay"].as_u64()),
        (Some(2), Some(77))
    );
    assert_eq!(d["responseTimeout"], 30);
    assert_eq!(d["workers"].as_array().unwrap().len(), 2);
    let r = s.predict("cfg", "1").await;
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"threshold": 0.5, "labels": ["cat", "dog"]})
    );

    let (code, e) = s.mgmt(Method::POST, "/models?url=bad").await;
    assert_eq!(code, 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("minWorkers 3 is greater than maxWorkers 1"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_archive_serves_in_async_mode_as_documented() {
    // docs/llm.md's command: `--models llm=llm.mar` from the archives make_archives.sh builds.
    let s = start("", "llm=llm.mar");
    s.wait_healthy().await;
    let r = s
        .client
        .post(format!(
            "{}/predictions/llm/1.0/v1/completions",
            s.inference
        ))
        .header("content-type", "application/json")
        .body(r#"{"prompt": "one two", "max_tokens": 3}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["total_tokens"], 5, "{v}");
}

/// A server killed with SIGKILL cannot remove its temporary folders (the unpacked model, the
/// Python runtime); the next server to start in the same temporary folder removes them, and
/// leaves those of servers still running alone. Socket folders keep a short name without an owner
/// (a socket path has at most 107 bytes) and are not swept: they hold nothing but the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folders_left_by_a_killed_server_are_removed_by_the_next_one() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().to_str().unwrap().to_string();
    let store = common::example_archives().to_str().unwrap().to_string();
    let args = [
        "--model-store",
        store.as_str(),
        "--models",
        "echo.mar",
        "--enable-model-api",
    ];
    let env = [("TMPDIR", tmp_path.as_str())];
    let folders = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("oxserve-"))
            .collect();
        v.sort();
        v
    };

    let mut killed = Server::start_with_env("", &args, &env);
    killed.wait_healthy().await;
    let left = folders();
    for kind in ["oxserve-model-", "oxserve-python-"] {
        assert!(left.iter().any(|n| n.starts_with(kind)), "{kind}: {left:?}");
    }
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(random) = name.strip_prefix("oxs-") {
            assert_eq!(
                random.len(),
                6,
                "a socket folder's name stays short: {name}"
            );
        }
    }
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    assert_eq!(folders(), left, "SIGKILL leaves them behind");

    // A server that is running while the next one starts keeps its folders.
    let running = Server::start_with_env("", &args, &env);
    running.wait_healthy().await;
    let mut next = Server::start_with_env("", &args, &env);
    next.wait_healthy().await;
    let now = folders();
    for name in &left {
        assert!(
            !now.contains(name),
            "{name} of the killed server is still there: {now:?}"
        );
    }
    assert!(
        now.len() >= 2 * left.len(),
        "the two running servers' folders are kept: {now:?}"
    );
    assert!(
        running
            .log()
            .contains("left by oxserve processes no longer running")
            || next
                .log()
                .contains("left by oxserve processes no longer running"),
        "the sweep is logged"
    );
    assert!(next.stop().success());
}
