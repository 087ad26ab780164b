//! The OpenAI front door (`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`)
//! and the token metrics, driven by the real `openai` Python package against the real server and
//! a real Python worker running tests/fixtures/openai_handler.py.
//!
//! The `openai` package is installed from PyPI into target/openai-venv the first time (pinned
//! version below), as make_archives.sh does for torch-model-archiver.

mod common;

use common::Server;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const OPENAI_VERSION: &str = "3.57.0";
const HANDLER: &str = include_str!("fixtures/openai_handler.py");

/// The venv's python with `openai` installed.
fn openai_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/openai-venv"));
        let py = venv.join("bin/python");
        let has = |py: &Path| {
            std::process::Command::new(py)
                .args([
                    "-c",
                    "import openai, sys; sys.exit(openai.__version__ != sys.argv[1])",
                ])
                .arg(OPENAI_VERSION)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !has(&py) {
            let run = |cmd: &mut std::process::Command| {
                let out = cmd.output().expect("run python3");
                assert!(
                    out.status.success(),
                    "{cmd:?} failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(std::process::Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv));
            run(std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("openai=={OPENAI_VERSION}")));
            assert!(
                has(&py),
                "openai {OPENAI_VERSION} not importable after install"
            );
        }
        py
    })
}

/// TorchServe's default metric set plus the fixture's engine gauge.
fn metrics_yaml() -> String {
    let builtin = include_str!("../src/metrics/default_metrics.yaml");
    format!(
        "{builtin}    - name: KVCacheUsage\n      unit: Percent\n      dimensions: [*model_name, *level]\n"
    )
}

/// A server with the fixture registered as `llm` (one worker, batch size 1).
async fn start(extra: &str) -> Server {
    let store = tempfile::tempdir().unwrap();
    let manifest = serde_json::json!({
        "createdOn": "28/11/2026 12:00:00",
        "runtime": "python",
        "model": {"modelName": "llm", "modelVersion": "1.0", "handler": "openai_handler.py"},
        "archiverVersion": "0.12.0"
    });
    common::write_mar(
        store.path(),
        "llm.mar",
        &manifest,
        &[("openai_handler.py", HANDLER.as_bytes())],
    );
    let yaml = store.path().join("metrics.yaml");
    std::fs::write(&yaml, metrics_yaml()).unwrap();
    let props = format!(
        "default_workers_per_model=1\nmetrics_config={}\n{extra}",
        yaml.display()
    );
    let s = Server::start_store(&props, store.path(), "llm=llm.mar", &[]);
    s.wait_healthy().await;
    // The archive is unpacked at registration; the store folder may go.
    drop(store);
    s
}

/// Runs a Python script with the `openai` package; its stdout is one JSON document.
fn run_client(script: &str, base_url: &str) -> serde_json::Value {
    let py = openai_python();
    let out = std::process::Command::new(py)
        .args(["-c", script, base_url])
        .env("OPENAI_API_KEY", "unused")
        .output()
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client output is JSON")
}

const CLIENT: &str = r#"
import json, sys
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", max_retries=0, timeout=120)
out = {}
out["models"] = [m.id for m in client.models.list()]
c = client.completions.create(model="llm", prompt="one two three four", max_tokens=3)
out["completion"] = c.choices[0].text
out["completion_usage"] = [c.usage.prompt_tokens, c.usage.completion_tokens]
chat = client.chat.completions.create(
    model="llm", messages=[{"role": "user", "content": "alpha beta gamma"}])
out["chat"] = chat.choices[0].message.content
out["chat_usage"] = [chat.usage.prompt_tokens, chat.usage.completion_tokens]
parts, usage = [], None
for chunk in client.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "red green blue white"}],
        stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
out["chat_stream"] = parts
out["chat_stream_usage"] = usage
texts = [c.choices[0].text for c in client.completions.create(
    model="llm", prompt="x y", stream=True)]
out["completion_stream"] = texts
try:
    client.completions.create(model="nope", prompt="x")
    out["unknown_model"] = None
except Exception as e:
    out["unknown_model"] = getattr(e, "status_code", None)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_lists_completes_chats_and_streams() {
    let s = start("").await;
    let got = run_client(CLIENT, &s.inference);
    assert_eq!(got["models"], serde_json::json!(["llm"]));
    assert_eq!(got["completion"], "one two three");
    assert_eq!(got["completion_usage"], serde_json::json!([4, 3]));
    assert_eq!(got["chat"], "alpha beta gamma");
    assert_eq!(got["chat_usage"], serde_json::json!([3, 3]));
    // One SSE event per token reached the client as its own delta.
    assert_eq!(
        got["chat_stream"],
        serde_json::json!(["red", " green", " blue", " white"])
    );
    assert_eq!(got["chat_stream_usage"], serde_json::json!([4, 4]));
    assert_eq!(got["completion_stream"], serde_json::json!(["x", " y", ""]));
    assert_eq!(got["unknown_model"], 404);

    // Token metrics: usage of the two JSON replies and of the stream that asked for it; the
    // completion stream without usage adds no tokens.
    let text = s.scrape().await;
    let mv = r#"{model_name="llm",model_version="1.0"}"#;
    let v = |name: &str| common::sample(&text, &format!("{name}{mv}"));
    assert_eq!(v("oxserve_prompt_tokens_total"), Some((4 + 3 + 4) as f64));
    assert_eq!(
        v("oxserve_generated_tokens_total"),
        Some((3 + 3 + 4) as f64)
    );
    // Chunks: 4 token events + the final frame, 2 + the final frame.
    assert_eq!(v("oxserve_stream_chunks_total"), Some(8.0));
    // A gap per chunk but each stream's first.
    assert_eq!(v("oxserve_inter_token_latency_seconds_count"), Some(6.0));
    assert_eq!(v("oxserve_time_to_first_chunk_seconds_count"), Some(2.0));
    assert_eq!(v("oxserve_requests_running"), Some(0.0));
    assert_eq!(v("oxserve_queue_depth"), Some(0.0));
    // The engine gauge the handler reported through context.metrics, declared in metrics.yaml.
    assert_eq!(
        common::sample(&text, r#"KVCacheUsage{ModelName="llm",Level="Model""#),
        Some(0.25),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_urls_reach_the_same_handler() {
    let s = start("").await;
    let body = r#"{"model":"llm","prompt":"a b c"}"#;
    for url in [
        format!("{}/predictions/llm/1.0/v1/completions", s.inference),
        format!("{}/v1/completions", s.inference),
    ] {
        let r = s
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let j: serde_json::Value = r.json().await.unwrap();
        assert_eq!(j["object"], "text_completion", "{url}");
        assert_eq!(j["choices"][0]["text"], "a b c", "{url}");
    }
    // Both were OpenAI requests: both usages counted.
    let tokens = s
        .sample(r#"oxserve_generated_tokens_total{model_name="llm",model_version="1.0"}"#)
        .await;
    assert_eq!(tokens, Some(6.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_openai_requests_get_torchserve_errors() {
    let s = start("max_request_size=4096").await;
    let post = |path: &'static str, body: String| {
        let c = s.client.clone();
        let url = format!("{}{path}", s.inference);
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let j: serde_json::Value = r.json().await.unwrap_or(serde_json::Value::Null);
            (status, j)
        }
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/v1/completions",
            r#"{"prompt":"x"}"#.into(),
            400,
            "no \"model\"",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":7}"#.into(),
            400,
            "non-empty string",
        ),
        (
            "/v1/completions",
            "not json".into(),
            400,
            "not a JSON object",
        ),
        ("/v1/completions", String::new(), 400, "not a JSON object"),
        ("/v1/completions", r#"{"model":"nope"}"#.into(), 404, "nope"),
        (
            "/v1/completions",
            format!(r#"{{"model":"{}"}}"#, "m".repeat(600)),
            400,
            "longer than",
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"llm","prompt":"{}"}}"#, "x ".repeat(4000)),
            507,
            "max_request_size",
        ),
    ];
    for (path, body, status, words) in cases {
        let (got, j) = post(path, body).await;
        assert_eq!(got, status, "{path}: {j}");
        assert_eq!(j["code"], status, "{j}");
        assert!(j["message"].as_str().unwrap().contains(words), "{j}");
        assert!(j["type"].as_str().unwrap().ends_with("Exception"), "{j}");
    }
    // Other methods are refused; the list route takes GET only.
    let r = s
        .client
        .get(format!("{}/v1/completions", s.inference))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = s
        .client
        .post(format!("{}/v1/models", s.inference))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // A handler error (no prompt) is the handler's answer, and the server goes on serving.
    let (status, _) = post("/v1/completions", r#"{"model":"llm"}"#.into()).await;
    assert!(status >= 500, "{status}");
    let (status, j) = post("/v1/completions", r#"{"model":"llm","prompt":"ok"}"#.into()).await;
    assert_eq!(
        (status, j["choices"][0]["text"].as_str()),
        (200, Some("ok"))
    );
    // The gauge is the supervisor's state: it learns that a request left the worker just after
    // the reply went out, so it is read until it settles.
    common::wait_until(
        "oxserve_requests_running back to 0",
        std::time::Duration::from_secs(10),
        || async {
            match s
                .sample(r#"oxserve_requests_running{model_name="llm",model_version="1.0"}"#)
                .await
            {
                Some(0.0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Running vs waiting: while a slow stream holds the only worker, the stream is running and a
/// second request waits in the queue; both gauges return to 0 when they are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_and_waiting_requests_are_gauged() {
    let s = start("").await;
    let mv = r#"{model_name="llm",model_version="1.0"}"#;
    let slow = r#"{"model":"llm","prompt":"a b c d e f g h i j k l m n o p","max_tokens":16,"stream":true,"delay_ms":500}"#;
    let url = format!("{}/v1/completions", s.inference);
    let mut stream = s
        .client
        .post(&url)
        .header("content-type", "application/json")
        .body(slow)
        .send()
        .await
        .unwrap();
    // The first chunk proves the request is inside the worker.
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    let waiting = {
        let c = s.client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            c.post(url)
                .header("content-type", "application/json")
                .body(r#"{"model":"llm","prompt":"q"}"#)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let until = |want: [f64; 2]| {
        let s = &s;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let text = s.scrape().await;
                let got = [
                    common::sample(&text, &format!("oxserve_requests_running{mv}")),
                    common::sample(&text, &format!("oxserve_queue_depth{mv}")),
                ];
                if got == want.map(Some) {
                    return;
                }
                assert!(Instant::now() < deadline, "gauges {got:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    until([1.0, 1.0]).await;
    while stream.chunk().await.unwrap().is_some() {}
    assert_eq!(waiting.await.unwrap(), 200);
    until([0.0, 0.0]).await;
}
