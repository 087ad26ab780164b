//! TorchServe's own `vllm_handler` (torchserve 0.12.0, `ts/torch_handler/vllm_handler.py`,
//! unchanged) on oxserve with TorchServe's own worker (`worker_runtime=torchserve`, started with
//! `--async` because model-config.yaml says `asyncCommunication: true`), as TorchServe's vLLM
//! recipe deploys it. There is no GPU here, so `vllm` is the stand-in package of
//! examples/llm/vllm_standin (a continuous-batching engine with vLLM's API surface, words as
//! tokens, a deterministic "model"), put on the worker's PYTHONPATH.
//!
//! Opt-in (torchserve and torch are about 5 GB, which CI does not install):
//!
//! ```sh
//! OXSERVE_TEST_TORCHSERVE_PYTHON=/path/to/venv/bin/python cargo test --test vllm_handler -- --ignored
//! ```
//!
//! Nothing here depends on timing: that many requests are inside the one worker at once is proven
//! by the stand-in engine's `standin_first_step_after_seqs`, which takes no generation step before
//! that many sequences have arrived, so the requests can only finish if the worker holds all of
//! them at the same time.

mod common;

use common::Server;
use reqwest::Method;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The Python of a torchserve 0.12 environment. The tests are `#[ignore]`d; one run with
/// `--ignored` but without the variable fails here instead of passing without testing anything.
fn ts_python() -> String {
    std::env::var("OXSERVE_TEST_TORCHSERVE_PYTHON")
        .expect("set OXSERVE_TEST_TORCHSERVE_PYTHON to the python of a torchserve 0.12 venv")
}

fn standin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/llm/vllm_standin")
}

/// TorchServe's vLLM deployment as an unpacked archive (torch-model-archiver's `no-archive`
/// layout): only a manifest naming the built-in `vllm_handler` and the model-config.yaml.
fn vllm_store(name: &str, yaml: &str) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().join(name);
    std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
    std::fs::write(
        dir.join("MAR-INF/MANIFEST.json"),
        format!(r#"{{"runtime": "python", "model": {{"modelName": "{name}", "modelVersion": "1.0", "handler": "vllm_handler", "configFile": "model-config.yaml"}}}}"#),
    )
    .unwrap();
    std::fs::write(dir.join("model-config.yaml"), yaml).unwrap();
    store
}

fn shipped_yaml() -> String {
    std::fs::read_to_string(standin_dir().join("model-config.yaml")).unwrap()
}

/// Starts oxserve with TorchServe's worker and waits until the model's worker is READY (importing
/// torch takes a while on a loaded machine, hence the generous deadline).
async fn start(store: &Path, name: &str) -> Server {
    let props = format!(
        "worker_runtime=torchserve\npython_executable={}\n",
        ts_python()
    );
    let standin = standin_dir();
    let s = Server::start_with_env(
        &props,
        &["--model-store", store.to_str().unwrap(), "--models", name],
        &[("PYTHONPATH", standin.to_str().unwrap())],
    );
    let what = format!("the {name} worker READY");
    let path = format!("/models/{name}");
    common::wait_until(&what, Duration::from_secs(600), || async {
        let (code, d) = s.mgmt(Method::GET, &path).await;
        if code == 200 && d[0]["workers"][0]["status"] == "READY" {
            Ok(())
        } else {
            Err(format!("{code} {d}; log:\n{}", s.log()))
        }
    })
    .await;
    s
}

/// The stand-in's "model": the n-th generated word is `VOCAB[(crc32(prompt) + 7n) % 20]`
/// (examples/llm/vllm_standin/vllm/__init__.py), so every answer is known in advance.
const VOCAB: [&str; 20] = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "wizards", "quietly", "judge", "boxing", "matches", "under", "bright", "summer", "skies",
];

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn expected(prompt: &str, n: usize) -> String {
    let c = crc32(prompt.as_bytes()) as usize;
    (0..n)
        .map(|i| VOCAB[(c + 7 * i) % VOCAB.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

async fn post_to(s: &Server, url: String, body: serde_json::Value) -> reqwest::Response {
    s.client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// POST to `/predictions/{model}/1.0/{path}`: the extra path reaches the handler as `url_path`.
async fn post(s: &Server, model: &str, path: &str, body: serde_json::Value) -> reqwest::Response {
    post_to(
        s,
        format!("{}/predictions/{model}/1.0/{path}", s.inference),
        body,
    )
    .await
}

/// A streamed reply: its HTTP chunks and the JSON of its `data:` events (without `[DONE]`, which
/// must be the last event).
async fn read_stream(mut r: reqwest::Response) -> (Vec<String>, Vec<serde_json::Value>) {
    assert_eq!(r.status(), 200);
    let mut chunks = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        chunks.push(String::from_utf8(c.to_vec()).unwrap());
    }
    let all = chunks.concat();
    let events: Vec<&str> = all
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect(e))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{all}");
    let json = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    (chunks, json)
}

/// The text of a stream's events (completion `text` or chat `delta.content`).
fn stream_text(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .map(|c| {
            c["text"]
                .as_str()
                .or(c["delta"]["content"].as_str())
                .unwrap_or("")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs torchserve 0.12 + torch: set OXSERVE_TEST_TORCHSERVE_PYTHON=<venv>/bin/python and run with --ignored"]
async fn vllm_handler_serves_completions_and_chat_whole_and_streamed() {
    // Registered under one of vLLM's served model names, as TorchServe's recipe does, so that
    // oxserve's own OpenAI routes (`/v1/completions`, routed by the body's `model`) reach it too.
    const M: &str = "llama3-8b";
    let store = vllm_store(M, &shipped_yaml());
    let s = start(store.path(), M).await;

    // Completions, whole: vLLM's shape and usage, served under either served_model_name.
    let prompt = "hello there world";
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": prompt, "max_tokens": 5}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "standin");
    assert_eq!(v["choices"][0]["text"], expected(prompt, 5).as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        serde_json::json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );

    // Chat, whole.
    let r = post(
        &s,
        M,
        "v1/chat/completions",
        serde_json::json!({"model": "llama3-8b", "max_tokens": 4,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected("be brief hi", 4).as_str()
    );
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 4);

    // Chat, streamed with usage: the role event, one event per token, the usage event, [DONE];
    // every event is its own HTTP chunk, as the worker sent it.
    let r = post(
        &s,
        M,
        "v1/chat/completions",
        serde_json::json!({"model": "llama3-8b", "max_tokens": 3, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "tell me"}]}),
    )
    .await;
    let (chunks, ev) = read_stream(r).await;
    assert_eq!(chunks.len(), 6, "{chunks:?}");
    assert_eq!(ev.len(), 5);
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(ev.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(stream_text(&ev), expected("tell me", 3));
    assert_eq!(ev[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(
        ev[4]["usage"],
        serde_json::json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );

    // Completions, streamed without usage; a stop word ends it early (vLLM leaves it out).
    let words: Vec<String> = expected("stop here", 6)
        .split(' ')
        .map(String::from)
        .collect();
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": "stop here", "max_tokens": 6,
            "stream": true, "stop": [words[3]]}),
    )
    .await;
    let (chunks, ev) = read_stream(r).await;
    let upto: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .take_while(|w| *w != words[3])
        .collect();
    assert_eq!(stream_text(&ev), upto.join(" "));
    assert_eq!(ev.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks.len(), ev.len() + 1);
    let completion_stream_chunks = chunks.len();

    // The handler's own routes and errors, passed through as TorchServe passes them.
    let r = post(&s, M, "v1/models", serde_json::json!({})).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["standin", "llama3-8b"]);
    // vLLM's ErrorResponse is the handler's return value: 200 with vLLM's error object.
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["object"], "error");
    assert_eq!(v["code"], 404);
    // The engine's limit: prompt + max_tokens over max_model_len (4096).
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": "x", "max_tokens": 5000}),
    )
    .await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length"),
        "{v}"
    );
    // A body vLLM's request model rejects raises in the handler: 503 "Prediction failed".
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": 5}),
    )
    .await;
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Prediction failed");
    // An unknown route: the handler's PredictionException(404).
    let r = post(&s, M, "v1/embeddings", serde_json::json!({})).await;
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Unknown API endpoint: v1/embeddings");

    // Still serving after the errors.
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": "again", "max_tokens": 2}),
    )
    .await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], expected("again", 2).as_str());

    // oxserve's own OpenAI route: the body's `model` names the registered model, and the handler
    // sees the same `url_path` as through /predictions.
    let r = post_to(
        &s,
        format!("{}/v1/completions", s.inference),
        serde_json::json!({"model": M, "prompt": "direct route", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["model"], M);
    assert_eq!(
        v["choices"][0]["text"],
        expected("direct route", 3).as_str()
    );

    // Token metrics for this deployment: usage of the four whole replies that carry one (5 + 4 +
    // 2 + 3 generated) and of the chat stream that asked for it (3); chunks, TTFT and gaps of both
    // streams.
    let text = s.scrape().await;
    let mv = r#"{model_name="llama3-8b",model_version="1.0"}"#;
    let v = |name: &str| common::sample(&text, &format!("{name}{mv}"));
    assert_eq!(
        v("oxserve_prompt_tokens_total"),
        Some((3 + 3 + 1 + 2 + 2) as f64),
        "{text}"
    );
    assert_eq!(
        v("oxserve_generated_tokens_total"),
        Some((5 + 4 + 2 + 3 + 3) as f64)
    );
    let chunks = 6 + completion_stream_chunks;
    assert_eq!(v("oxserve_stream_chunks_total"), Some(chunks as f64));
    assert_eq!(v("oxserve_time_to_first_chunk_seconds_count"), Some(2.0));
    assert_eq!(
        v("oxserve_inter_token_latency_seconds_count"),
        Some((chunks - 2) as f64)
    );
    assert_eq!(v("oxserve_requests_running"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs torchserve 0.12 + torch: set OXSERVE_TEST_TORCHSERVE_PYTHON=<venv>/bin/python and run with --ignored"]
async fn many_streams_run_at_once_in_one_worker_and_a_failure_answers_only_itself() {
    const N: usize = 24;
    // The engine takes its first step only once N sequences have arrived.
    let yaml = shipped_yaml().replace(
        "standin_step_ms: 10",
        &format!("standin_step_ms: 10\n        standin_first_step_after_seqs: {N}"),
    );
    assert!(yaml.contains("standin_first_step_after_seqs"));
    let store = vllm_store("vllm", &yaml);
    let s = start(store.path(), "vllm").await;
    let url = format!("{}/predictions/vllm/1.0", s.inference);

    // N - 1 streams, completions and chat, of different lengths: none can get a token yet.
    let client = s.client.clone();
    let streams: Vec<_> = (0..N - 1)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let prompt = format!("prompt number {i}");
                let max_tokens = 3 + i % 7;
                let (path, body) = if i % 2 == 0 {
                    (
                        "v1/completions",
                        serde_json::json!({"model": "standin", "prompt": prompt,
                        "max_tokens": max_tokens, "stream": true,
                        "stream_options": {"include_usage": true}}),
                    )
                } else {
                    (
                        "v1/chat/completions",
                        serde_json::json!({"model": "standin",
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "stream": true,
                        "stream_options": {"include_usage": true}}),
                    )
                };
                let r = client
                    .post(format!("{url}/{path}"))
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                let (_, ev) = read_stream(r).await;
                (prompt, max_tokens, ev)
            })
        })
        .collect();

    // Wait until the worker holds all of them.
    let running = r#"oxserve_requests_running{model_name="vllm",model_version="1.0"}"#;
    let deadline = Instant::now() + Duration::from_secs(300);
    while s.sample(running).await != Some((N - 1) as f64) {
        assert!(
            Instant::now() < deadline,
            "never {} running: {:?}\n{}",
            N - 1,
            s.sample(running).await,
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Failures while they are in flight answer only themselves (TorchServe's frontend would send
    // each error to every request in flight on the worker).
    let r = post(
        &s,
        "vllm",
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": ["a", 1]}),
    )
    .await;
    assert_eq!(r.status(), 503);
    let r = post(&s, "vllm", "v1/nothing", serde_json::json!({})).await;
    assert_eq!(r.status(), 404);

    // The N-th request lets the engine start; every stream gets its own tokens.
    let r = post(
        &s,
        "vllm",
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": "the last one", "max_tokens": 4}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["text"],
        expected("the last one", 4).as_str()
    );
    let mut generated = 4;
    for h in streams {
        let (prompt, max_tokens, ev) = h.await.unwrap();
        assert_eq!(stream_text(&ev), expected(&prompt, max_tokens), "{prompt}");
        let usage = &ev.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], max_tokens);
        assert_eq!(usage["prompt_tokens"], 3);
        generated += max_tokens;
    }
    let (_, d) = s.mgmt(Method::GET, "/models/vllm").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1);
    let text = s.scrape().await;
    let mv = r#"{model_name="vllm",model_version="1.0"}"#;
    let v = |name: &str| common::sample(&text, &format!("{name}{mv}"));
    assert_eq!(v("oxserve_generated_tokens_total"), Some(generated as f64));
    assert_eq!(
        v("oxserve_time_to_first_chunk_seconds_count"),
        Some((N - 1) as f64)
    );
    assert_eq!(v("oxserve_requests_running"), Some(0.0));
}

/// A client that goes away in the middle of a stream, on TorchServe's worker: that worker knows
/// no cancel message, so none is sent (it would stop reading its socket), the request runs to its
/// end as in TorchServe, and the worker keeps serving; the request is still counted as cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs torchserve 0.12 + torch: set OXSERVE_TEST_TORCHSERVE_PYTHON=<venv>/bin/python and run with --ignored"]
async fn a_client_that_goes_away_on_torchserves_worker_is_not_sent_a_cancel() {
    const M: &str = "llama3-8b";
    let store = vllm_store(M, &shipped_yaml());
    let s = start(store.path(), M).await;
    let (_, before) = s.mgmt(Method::GET, &format!("/models/{M}")).await;
    let pid = before[0]["workers"][0]["pid"].clone();

    // 100 tokens at 10 ms a step: about a second of generation after the client has gone.
    let mut r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": "a long story", "max_tokens": 100, "stream": true}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);

    let mv = r#"{model_name="llama3-8b",model_version="1.0"}"#;
    s.wait_sample(&format!("oxserve_requests_cancelled_total{mv}"), |v| {
        v == 1.0
    })
    .await;
    // The abandoned request is answered by the worker in its own time, and the next one too.
    s.wait_sample(&format!("oxserve_requests_running{mv}"), |v| v == 0.0)
        .await;
    let r = post(
        &s,
        M,
        "v1/completions",
        serde_json::json!({"model": "standin", "prompt": "after", "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (_, after) = s.mgmt(Method::GET, &format!("/models/{M}")).await;
    assert_eq!(
        after[0]["workers"][0]["pid"], pid,
        "the worker was not replaced"
    );
    assert!(!s.log().contains("client gone: cancelling"), "{}", s.log());
}
