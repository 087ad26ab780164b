//! LLM serving modes over the real binary with real Python workers (oxserve's own runtime):
//! async mode (`asyncCommunication: true`) with many requests in flight on one worker, replies
//! matched by request id, failures answering only their own request, and examples/llm (the
//! OpenAI-shaped toy engine) end to end. No test here depends on timing: concurrency is proven
//! by handlers that cannot finish unless the other requests are in flight at the same time.

mod common;

use common::Server;
use reqwest::Method;
use std::path::Path;

/// A Python model `name` in `store` whose handler is `{name}.py`, with this model-config.yaml and
/// files.
fn model_folder(store: &Path, name: &str, yaml: &str, files: &[(&str, &str)]) {
    common::model_folder(store, name, &format!("{name}.py"), Some(yaml), files);
}

fn start(store: &Path, models: &str) -> Server {
    Server::start_store("", store, models, &["--enable-model-api"])
}

const ASYNC_YAML: &str =
    "minWorkers: 1\nmaxWorkers: 1\nasyncCommunication: true\nresponseTimeout: 120\n";

/// A server with one async-mode model `name` whose handler is `handler`, healthy.
async fn serve_async_model(name: &str, handler: &str) -> (tempfile::TempDir, Server) {
    let store = tempfile::tempdir().unwrap();
    let file = format!("{name}.py");
    model_folder(store.path(), name, ASYNC_YAML, &[(&file, handler)]);
    let s = start(store.path(), name);
    s.wait_healthy().await;
    (store, s)
}

/// A handler that answers only once `n` requests are inside it at the same time: with one
/// worker, every request succeeds only if the worker holds all of them at once. "fail" raises at
/// once (after counting itself in); "slow" waits until a later request has finished.
const GATHER: &str = r#"
import asyncio, os

N = int(os.environ.get("GATHER_N", "8"))
state = {"arrived": 0, "done": 0}
events = {}

def ev(name):
    if name not in events:
        events[name] = asyncio.Event()
    return events[name]

async def handle(data, context):
    if data is None:
        return None
    body = data[0].get("body")
    text = body.decode() if isinstance(body, (bytes, bytearray)) else str(body)
    state["arrived"] += 1
    if state["arrived"] >= N:
        ev("all").set()
    await asyncio.wait_for(ev("all").wait(), 100)
    if text == "fail":
        raise ValueError("asked to fail")
    if text == "slow":
        await asyncio.wait_for(ev("one-done").wait(), 100)
    else:
        ev("one-done").set()
    return ["%s pid=%d" % (text, os.getpid())]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_holds_many_requests_in_one_worker_and_matches_replies_by_id() {
    let (_store, s) = serve_async_model("gather", GATHER).await;
    // 8 requests, one worker, a handler that returns only when all 8 are inside it: they all
    // succeed, each with its own answer (replies come back in completion order, "slow" last).
    let bodies: Vec<String> = (0..8)
        .map(|i| {
            if i == 3 {
                "slow".into()
            } else {
                format!("r{i}")
            }
        })
        .collect();
    let got = s.post_all("gather", None, bodies.clone()).await;
    let pids: std::collections::HashSet<String> = bodies
        .iter()
        .zip(&got)
        .map(|(body, (status, text))| {
            assert_eq!(*status, 200, "{body}: {text}");
            let (echo, pid) = text.split_once(" pid=").unwrap();
            assert_eq!(echo, body);
            pid.to_string()
        })
        .collect();
    assert_eq!(pids.len(), 1, "one worker process served them all");
    let (_, d) = s.mgmt(Method::GET, "/models/gather").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_in_async_mode_fails_only_itself() {
    let store = tempfile::tempdir().unwrap();
    model_folder(store.path(), "gather", ASYNC_YAML, &[("gather.py", GATHER)]);
    let s = Server::start_store_with_env("", store.path(), "gather", &[], &[("GATHER_N", "4")]);
    s.wait_healthy().await;
    let bodies: Vec<String> = (0..4)
        .map(|i| {
            if i == 0 {
                "fail".into()
            } else {
                format!("ok{i}")
            }
        })
        .collect();
    let got = s.post_all("gather", None, bodies.clone()).await;
    for (body, (status, text)) in bodies.iter().zip(&got) {
        if body == "fail" {
            assert_eq!(*status, 503, "{text}");
            let e: serde_json::Value = serde_json::from_str(text).unwrap();
            assert!(
                e["message"].as_str().unwrap().contains("asked to fail"),
                "{e}"
            );
            assert_eq!(e["code"], 503);
        } else {
            // TorchServe's frontend would answer these with the failing request's error.
            assert_eq!(*status, 200, "{body}: {text}");
            assert!(text.starts_with(body.as_str()), "{text}");
        }
    }
    // The worker is still the same one and still serves.
    let r = s.predict("gather", "again").await;
    assert_eq!(r.status(), 200);
}

/// A plain `def handle` in async mode runs on threads (it may block), and an `async def handle`
/// in classic mode is awaited: both answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_handlers_in_async_mode_and_async_handlers_in_classic_mode_both_answer() {
    let store = tempfile::tempdir().unwrap();
    let barrier = "import threading\nb = threading.Barrier(3, timeout=100)\ndef handle(data, context):\n    if data is None:\n        return None\n    b.wait()\n    return ['sync ok']\n";
    model_folder(store.path(), "syncy", ASYNC_YAML, &[("syncy.py", barrier)]);
    let coro = "import asyncio\nasync def handle(data, context):\n    if data is None:\n        return None\n    await asyncio.sleep(0)\n    return ['async ok' for _ in data]\n";
    model_folder(
        store.path(),
        "classic",
        "minWorkers: 1\nmaxWorkers: 1\n",
        &[("classic.py", coro)],
    );
    let s = start(store.path(), "syncy,classic");
    s.wait_healthy().await;
    // Three blocking handler calls meet at a barrier: only possible if they run at once.
    let got = s.post_all("syncy", None, vec!["x".into(); 3]).await;
    for (status, text) in got {
        assert_eq!((status, text.as_str()), (200, "sync ok"));
    }
    let r = s.predict("classic", "x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "async ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_keys_are_checked_at_registration() {
    let store = tempfile::tempdir().unwrap();
    let h = "def handle(data, context):\n    return data\n";
    model_folder(
        store.path(),
        "badmode",
        "asyncCommunication: yes please\n",
        &[("badmode.py", h)],
    );
    let s = Server::start_store("", store.path(), "", &["--enable-model-api"]);
    let (code, e) = s.mgmt(Method::POST, "/models?url=badmode").await;
    assert_eq!(code, 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("asyncCommunication"),
        "{e}"
    );
}

/// examples/llm, packaged as its folder: the OpenAI-shaped toy engine in async mode.
fn llm_store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/llm");
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let handler = read("llm_handler.py");
    let engine = read("engine.py");
    let yaml = read("model-config.yaml");
    model_folder(
        store.path(),
        "llm",
        &yaml,
        &[("llm.py", &handler), ("engine.py", &engine)],
    );
    store
}

async fn post_json(s: &Server, path: &str, body: serde_json::Value) -> reqwest::Response {
    s.client
        .post(format!("{}/predictions/llm/1.0/{path}", s.inference))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The `data:` events of an SSE body.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect(e).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_example_answers_completions_and_chat_whole_and_streamed() {
    let store = llm_store();
    let s = start(store.path(), "llm");
    s.wait_healthy().await;

    let r = post_json(
        &s,
        "v1/completions",
        serde_json::json!({"prompt": "hello there world", "max_tokens": 5}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        5
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        serde_json::json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );

    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let r = post_json(
        &s,
        "v1/chat/completions",
        serde_json::json!({"messages": msgs, "max_tokens": 3}),
    )
    .await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // Streamed: one SSE event per token, each its own HTTP chunk, then [DONE].
    let mut r = post_json(
        &s,
        "v1/chat/completions",
        serde_json::json!({"messages": msgs, "max_tokens": 4, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut chunks = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        chunks.push(String::from_utf8(c.to_vec()).unwrap());
    }
    let all = chunks.concat();
    let ev = events(&all);
    assert_eq!(ev.len(), 5, "{all}");
    assert_eq!(ev[4], "[DONE]");
    let mut text = String::new();
    for e in &ev[..4] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    let last: serde_json::Value = serde_json::from_str(&ev[3]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    // The same prompt generates the same words whole or streamed (3 of them, then a 4th).
    let whole = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with(&format!("{whole} ")), "{text} / {whole}");
    assert_eq!(text.split(' ').count(), 4);

    // Bad input answers a clear error and does not disturb the worker.
    let r = post_json(&s, "v1/completions", serde_json::json!({"prompt": 7})).await;
    assert_eq!(r.status(), 400);
    let r = post_json(&s, "v1/unknown", serde_json::json!({})).await;
    assert_eq!(r.status(), 404);
    let r = post_json(
        &s,
        "v1/completions",
        serde_json::json!({"prompt": "x", "max_tokens": 100000}),
    )
    .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_llm_example_streams_many_requests_at_once_on_one_worker() {
    let store = llm_store();
    let s = start(store.path(), "llm");
    s.wait_healthy().await;
    let bodies = (0..32)
        .map(|i| serde_json::json!({"prompt": format!("prompt number {i}"), "max_tokens": 6 + i % 5, "stream": true}).to_string())
        .collect();
    let got = s
        .post_all("llm/1.0/v1/completions", Some("application/json"), bodies)
        .await;
    for (i, (status, all)) in got.into_iter().enumerate() {
        assert_eq!(status, 200, "{all}");
        let ev = events(&all);
        assert_eq!(ev.len(), 6 + i % 5 + 1, "{all}");
        assert_eq!(ev.last().unwrap(), "[DONE]");
    }
    let (_, d) = s.mgmt(Method::GET, "/models/llm").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1);
}

/// TorchServe's continuous batching: the handler keeps per-request state across steps and says
/// with `context.stopping_criteria` which requests are done; the others stay in the batch.
const STEPPER: &str = r#"
import json
count = {}
def handle(data, context):
    if data is None:
        return None
    out = []
    for idx, request in enumerate(data):
        rid = context.get_request_id(idx)
        if rid not in count:
            count[rid] = [0, int(request["body"] if not isinstance(request.get("body"), (bytes, bytearray)) else request["body"].decode())]
        count[rid][0] += 1
        out.append("tok%d " % count[rid][0])
    steps = {context.get_request_id(i): count[context.get_request_id(i)] for i in range(len(data))}
    context.stopping_criteria = [
        (lambda rid: (lambda _ret: steps[rid][0] >= steps[rid][1]))(context.get_request_id(i))
        for i in range(len(data))
    ]
    return out
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_batching_streams_each_request_until_its_stopping_criterion() {
    let store = tempfile::tempdir().unwrap();
    model_folder(
        store.path(),
        "stepper",
        "minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\ncontinuousBatching: true\n",
        &[("stepper.py", STEPPER)],
    );
    let s = start(store.path(), "stepper");
    s.wait_healthy().await;
    // Six requests, four slots: each streams as many tokens as it asked for.
    let bodies = (1..=6).map(|n| n.to_string()).collect();
    let got = s.post_all("stepper", None, bodies).await;
    for (n, (status, text)) in (1..=6).zip(got) {
        assert_eq!(status, 200, "{text}");
        let want: String = (1..=n).map(|k| format!("tok{k} ")).collect();
        assert_eq!(text, want);
    }
}

/// `asyncCommunication: true` given only in the `models` config key (not in the archive's
/// model-config.yaml) starts the worker with `--async`: four requests meet inside one worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_communication_from_the_models_key_alone_starts_async_workers() {
    let store = tempfile::tempdir().unwrap();
    model_folder(
        store.path(),
        "gather",
        "responseTimeout: 120\n",
        &[("gather.py", GATHER)],
    );
    let props = r#"models={"gather": {"1.0": {"asyncCommunication": true, "minWorkers": 1, "maxWorkers": 1}}}"#;
    let s = Server::start_store_with_env(props, store.path(), "gather", &[], &[("GATHER_N", "4")]);
    s.wait_healthy().await;
    let got = s
        .post_all("gather", None, (0..4).map(|i| format!("r{i}")).collect())
        .await;
    for (status, text) in got {
        assert_eq!(status, 200, "{text}");
    }
}

/// One reply frame may carry a streamed part for each of several requests in flight (oxserve's
/// runtime: `send_intermediate_parts`, one engine step's chunks for every stream): once all four
/// requests are inside the worker, the last one to arrive sends one frame with a part for each,
/// then every request answers on its own. Each client gets its own part, then its own answer.
const STEP_FRAME: &str = r#"
import asyncio
from oxserve_runtime.service import send_intermediate_parts

inside = []
sent = asyncio.Event()

async def handle(data, context):
    if data is None:
        return None
    body = data[0].get("body")
    text = body.decode() if isinstance(body, (bytes, bytearray)) else str(body)
    inside.append((context, text))
    if len(inside) == 4:
        send_intermediate_parts([(ctx, 0, "part:%s|" % t) for ctx, t in inside], urgent=True)
        sent.set()
    await asyncio.wait_for(sent.wait(), 100)
    return ["end:%s" % text]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_frame_carries_streamed_parts_of_many_requests_in_flight() {
    let (_store, s) = serve_async_model("stepframe", STEP_FRAME).await;
    let bodies: Vec<String> = (0..4).map(|i| format!("r{i}")).collect();
    let got = s.post_all("stepframe", None, bodies.clone()).await;
    for (body, (status, text)) in bodies.iter().zip(got) {
        assert_eq!(status, 200, "{text}");
        assert_eq!(text, format!("part:{body}|end:{body}"));
    }
}

/// A frame with more parts than the worker has requests in flight is a broken worker, not
/// something to decode without bound: the request in flight answers 503, the worker is replaced,
/// and the server keeps serving.
const OVERFULL: &str = r#"
from oxserve_runtime import protocol

def handle(data, context):
    if data is None:
        return None
    body = data[0].get("body")
    text = body.decode() if isinstance(body, (bytes, bytearray)) else str(body)
    if text == "flood":
        items = [(context.request_ids[0] if i == 0 else "ghost-%d" % i, "", 200, "",
                  {"ts_stream_next": "true"}, b"x") for i in range(3)]
        context.cl_socket.sendall(protocol.encode_predict_reply(200, "flood", items))
    return ["ok"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_more_parts_than_requests_in_flight_is_refused() {
    let (_store, s) = serve_async_model("overfull", OVERFULL).await;
    let r = s.predict("overfull", "flood").await;
    assert_eq!(r.status(), 503);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("more than 1 responses in one frame"),
        "{e}"
    );
    // A new worker takes over and answers.
    let mut answered = false;
    for _ in 0..600 {
        let r = s.predict("overfull", "fine").await;
        if r.status() == 200 {
            assert_eq!(r.text().await.unwrap(), "ok");
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(answered, "the replaced worker never answered");
}

/// Large requests in while large replies stream out, many at once: the worker's event loop reads
/// requests and writes replies, and the frontend does not read replies while it waits to write a
/// request. A loop that waited in `sendall` with both socket buffers full would wait forever; the
/// runtime's writer never waits (it keeps what the socket did not take and sends it when it can).
const BIG_BOTH_WAYS: &str = r#"
import asyncio
from ts.handler_utils.utils import send_intermediate_predict_response

async def handle(data, context):
    if data is None:
        return None
    body = data[0].get("body")
    for i in range(3):
        send_intermediate_predict_response({0: b"%d" % i * (1 << 20)}, context.request_ids,
                                           "part", 200, context)
        await asyncio.sleep(0)
    return ["len=%d" % len(body)]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_and_large_streamed_replies_at_once_do_not_stall_the_async_worker() {
    let (_store, s) = serve_async_model("bigboth", BIG_BOTH_WAYS).await;
    let bodies: Vec<String> = (0..16).map(|i| "b".repeat(2_000_000 + i)).collect();
    let got = s
        .post_all("bigboth", Some("application/octet-stream"), bodies.clone())
        .await;
    let parts: String = (0..3).map(|i| i.to_string().repeat(1 << 20)).collect();
    for (body, (status, text)) in bodies.iter().zip(got) {
        assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
        assert_eq!(
            text.len(),
            parts.len() + format!("len={}", body.len()).len()
        );
        assert!(text.starts_with(&parts), "parts out of order or missing");
        assert!(text.ends_with(&format!("len={}", body.len())));
    }
}

/// A client that goes away stops its generation: with room for one sequence in the engine and
/// 50 ms steps, a request of 4096 tokens holds the engine for over 200 s unless its cancellation
/// reaches the engine, and the next request waits behind it. Both ways a client leaves are
/// tried: in the middle of a stream (noticed at its next chunk), and while waiting for a whole
/// reply (noticed by the worker pool's sweep). The requests are counted as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_engine_slot() {
    let store = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/llm");
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let yaml = read("model-config.yaml")
        .replace("max_num_seqs: 64", "max_num_seqs: 1")
        .replace("step_ms: 10", "step_ms: 50");
    assert!(yaml.contains("max_num_seqs: 1") && yaml.contains("step_ms: 50"));
    model_folder(
        store.path(),
        "llm",
        &yaml,
        &[
            ("llm.py", &read("llm_handler.py")),
            ("engine.py", &read("engine.py")),
        ],
    );
    let s = start(store.path(), "llm");
    s.wait_healthy().await;
    let long = |stream: bool| serde_json::json!({"prompt": "tell me everything", "max_tokens": 4096, "stream": stream});
    let short = || serde_json::json!({"prompt": "hi", "max_tokens": 3});
    // Generous: the whole test takes about a second when cancellation works, and 200 s per
    // request when it does not.
    let limit = std::time::Duration::from_secs(60);
    let running = "oxserve_requests_running{model_name=\"llm\",model_version=\"1.0\"}";

    // 1. In the middle of a stream.
    let mut r = post_json(&s, "v1/completions", long(true)).await;
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(r);
    let r = tokio::time::timeout(limit, post_json(&s, "v1/completions", short()))
        .await
        .expect("the next request still waits: the abandoned stream kept its engine slot");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");

    // 2. While waiting for a whole reply.
    let waiting = {
        let client = s.client.clone();
        let url = format!("{}/predictions/llm/1.0/v1/completions", s.inference);
        let body = long(false).to_string();
        tokio::spawn(async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
        })
    };
    s.wait_sample(running, |v| v == 1.0).await;
    waiting.abort();
    assert!(waiting.await.unwrap_err().is_cancelled());
    let r = tokio::time::timeout(limit, post_json(&s, "v1/completions", short()))
        .await
        .expect("the next request still waits: the abandoned request kept its engine slot");
    assert_eq!(r.status(), 200);

    let cancelled = "oxserve_requests_cancelled_total{model_name=\"llm\",model_version=\"1.0\"}";
    s.wait_sample(cancelled, |v| v == 2.0).await;
    s.wait_sample(running, |v| v == 0.0).await;
    let log = s.log();
    assert_eq!(log.matches("client gone: cancelling").count(), 2, "{log}");
}
