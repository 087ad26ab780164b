//! Sequence batching (`sequenceBatching: true`) over the real binary with real Python workers
//! (oxserve's own runtime) running examples/stateful: TorchServe's two stateful pytest files
//! (test_example_stateful_sequence_batching_http.py and
//! test_example_stateful_sequence_continuous_batching_http.py) ported, plus the limits. The
//! handlers keep each session's running sum in the worker's memory, so a right sum proves that
//! every request of a session reached the same worker in order; nothing here depends on timing
//! except the idle-expiry test, which waits past the idle limit and asserts only that the
//! session is closed afterwards.

mod common;

use common::Server;
use std::path::Path;

const SEQ_ID: &str = "ts_request_sequence_id";

/// A server over a fresh model store holding these examples/stateful models, each `(name,
/// example folder, model-config.yaml)`, once it is healthy. The store goes with the server.
async fn serve(models: &[(&str, &str, &str)]) -> (Server, tempfile::TempDir) {
    let store = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/stateful");
    for (name, example, yaml) in models {
        let handler =
            std::fs::read_to_string(examples.join(example).join("stateful_handler.py")).unwrap();
        common::model_folder(
            store.path(),
            name,
            "stateful_handler.py",
            Some(yaml),
            &[("stateful_handler.py", &handler)],
        );
    }
    let names: Vec<&str> = models.iter().map(|m| m.0).collect();
    let s = Server::start_store("", store.path(), &names.join(","), &[]);
    s.wait_healthy().await;
    (s, store)
}

/// TorchServe's test YAML for sequence batching.
const SEQ_YAML: &str = "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 4\nmaxNumSequence: 4\n\
sequenceMaxIdleMSec: 5000\nmaxSequenceJobQueueSize: 10\nsequenceBatching: true\n\
handler:\n  cache:\n    capacity: 4\n";

/// TorchServe's test YAML for sequence + continuous batching, with short stream steps (oxserve's
/// example reads them; TorchServe's sleeps 1 s per step).
fn continuous_yaml(idle_ms: u64, steps: u32) -> String {
    format!(
        "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 1\nmaxNumSequence: 2\n\
sequenceMaxIdleMSec: {idle_ms}\nmaxSequenceJobQueueSize: 10\nsequenceBatching: true\n\
continuousBatching: true\nhandler:\n  cache:\n    capacity: 4\n  stream_steps: {steps}\n\
  stream_step_seconds: 0.05\n"
    )
}

async fn post(
    s: &Server,
    model: &str,
    seq: Option<&str>,
    body: &str,
) -> (u16, Option<String>, String) {
    let mut r = s
        .client
        .post(format!("{}/predictions/{model}", s.inference))
        .body(body.to_string());
    if let Some(id) = seq {
        r = r.header(SEQ_ID, id);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let id = r
        .headers()
        .get(SEQ_ID)
        .map(|v| v.to_str().unwrap().to_string());
    (status, id, r.text().await.unwrap())
}

/// test_stateful_mar's client: five requests of session `seq` (1, 3, 5, 7, 9, or with `even` 2, 4,
/// 6, 8, 10), each sent once the previous one answered 200. Each reply's text and the sequence id
/// header it carried.
async fn five_requests(s: &Server, seq: &str, even: bool) -> Vec<(String, Option<String>)> {
    let mut got = Vec::new();
    for idx in 0..5 {
        let n = if even { 2 * idx + 2 } else { 2 * idx + 1 };
        let (status, id, text) = post(s, "stateful", Some(seq), &n.to_string()).await;
        assert_eq!(status, 200, "{text}");
        got.push((text, id));
    }
    got
}

/// The replies' texts, space-separated.
fn sums(replies: &[(String, Option<String>)]) -> String {
    let texts: Vec<&str> = replies.iter().map(|r| r.0.as_str()).collect();
    texts.join(" ")
}

/// test_infer_stateful_cancel, once: a new session streams an odd input; once its first chunk
/// arrived, a second request of the session (-1) cancels it; the stream is read to its end and
/// the session closed with 0. Returns how many chunks the stream sent.
async fn cancel_a_stream(s: &Server) -> usize {
    let (status, id, _) = post(s, "stateful", None, "2").await;
    assert_eq!(status, 200);
    let id = id.expect("the session's id comes back in a reply header");
    let mut stream = s
        .client
        .post(format!("{}/predictions/stateful", s.inference))
        .header(SEQ_ID, &id)
        .json(&serde_json::json!({"input": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // The stream is running once its first chunk arrived: now cancel it.
    let mut chunks = vec![stream.chunk().await.unwrap().expect("a first chunk")];
    let (status, _, text) = post(s, "stateful", Some(&id), "-1").await;
    assert_eq!((status, text.as_str()), (200, "-1"));
    while let Some(c) = stream.chunk().await.unwrap() {
        chunks.push(c);
    }
    assert_eq!(&chunks[0][..], b"5");
    let (status, _, text) = post(s, "stateful", Some(&id), "0").await;
    assert_eq!(status, 200, "{text}");
    chunks.len()
}

/// test_example_stateful_sequence_batching_http.py::test_stateful_mar: two clients, each with
/// its own sequence id, interleaved over two workers with batchSize 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_batching_example_keeps_two_sessions_apart_over_two_workers() {
    let (s, _store) = serve(&[("stateful", "sequence_batching", SEQ_YAML)]).await;
    let (a, b) = tokio::join!(
        five_requests(&s, "seq_0", false),
        five_requests(&s, "seq_1", true)
    );
    for (replies, seq) in [(&a, "seq_0"), (&b, "seq_1")] {
        for (_, id) in replies {
            assert_eq!(id.as_deref(), Some(seq), "the reply names the session");
        }
    }
    assert_eq!(sums(&a), "1 4 9 16 25");
    assert_eq!(sums(&b), "2 6 12 20 30");
    // Describe reports the sequence keys as TorchServe does.
    let (code, d) = s
        .get_json(format!("{}/models/stateful", s.management))
        .await;
    assert_eq!(code, 200, "{d}");
    let d = &d[0];
    assert_eq!(d["stateful"], true, "{d}");
    assert_eq!(d["continuousBatching"], false, "{d}");
    assert_eq!(d["sequenceMaxIdleMSec"], 5000, "{d}");
    assert_eq!(d["sequenceTimeoutMSec"], 0, "{d}");
    assert_eq!(d["maxNumSequence"], 4, "{d}");
    assert_eq!(d["maxSequenceJobQueueSize"], 10, "{d}");
}

/// maxNumSequence, a hostile sequence id, and the session table after the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_limits_answer_in_torchserve_shape() {
    let yaml = SEQ_YAML
        .replace("maxNumSequence: 4", "maxNumSequence: 2")
        .replace(
            "minWorkers: 2\nmaxWorkers: 2",
            "minWorkers: 1\nmaxWorkers: 1",
        );
    let (s, _store) = serve(&[("stateful", "sequence_batching", &yaml)]).await;
    for seq in ["a", "b"] {
        assert_eq!(post(&s, "stateful", Some(seq), "1").await.0, 200);
    }
    // A third session is over maxNumSequence: TorchServe's 503.
    let (status, _, text) = post(&s, "stateful", Some("c"), "1").await;
    assert_eq!(status, 503, "{text}");
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["type"], "ServiceUnavailableException");
    // An id too long to keep: 400, and nothing is opened for it.
    let long = "x".repeat(257);
    let (status, _, text) = post(&s, "stateful", Some(&long), "1").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("BadRequestException"), "{text}");
    // The open sessions still serve, with their sums intact.
    assert_eq!(post(&s, "stateful", Some("a"), "5").await.2, "6");
}

/// Runs a session of the continuous example from its start (no id) and returns the replies.
async fn continuous_session(s: &Server, step: u32, end: bool) -> String {
    let (status, id, first) = post(s, "stateful", None, &step.to_string()).await;
    assert_eq!(status, 200, "{first}");
    let id = id.expect("a new session's id comes back in the reply header");
    assert!(id.starts_with("ts-seq-"), "{id}");
    let mut got = vec![first];
    for k in 2..=5 {
        let n = if end && k == 5 { 0 } else { step * k };
        let (status, rid, text) = post(s, "stateful", Some(&id), &n.to_string()).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(rid.as_deref(), Some(id.as_str()));
        got.push(text);
    }
    got.join(" ")
}

/// test_infer_stateful and test_infer_stateful_end: sessions started without an id, one of
/// them ended with 0 (the handler's sequence-end header closes it in the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequence_continuous_batching_example_starts_and_ends_sessions() {
    let (s, _store) = serve(&[(
        "stateful",
        "sequence_continuous_batching",
        &continuous_yaml(30000, 10),
    )])
    .await;
    let (a, b) = tokio::join!(
        continuous_session(&s, 2, false),
        continuous_session(&s, 4, false)
    );
    assert_eq!(a, "2 6 12 20 30");
    assert_eq!(b, "4 12 24 40 60");
    // maxNumSequence is 2 and both sessions are still open: a third is refused until one ends.
    let (status, _, text) = post(&s, "stateful", None, "2").await;
    assert_eq!(status, 503, "{text}");
    let (_, d) = s
        .get_json(format!("{}/models/stateful", s.management))
        .await;
    assert_eq!(
        (&d[0]["stateful"], &d[0]["continuousBatching"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{d}"
    );
}

/// test_infer_stateful_end, with the session table full: ending sessions frees their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_free_their_slot() {
    let (s, _store) = serve(&[(
        "stateful",
        "sequence_continuous_batching",
        &continuous_yaml(30000, 10),
    )])
    .await;
    // Three rounds of two sessions (maxNumSequence 2): each round ends its sessions.
    for _ in 0..3 {
        let (a, b) = tokio::join!(
            continuous_session(&s, 2, true),
            continuous_session(&s, 4, true)
        );
        assert_eq!(a, "2 6 12 20 20");
        assert_eq!(b, "4 12 24 40 40");
    }
}

/// test_infer_stateful_cancel: a streamed request (odd input) is cancelled by a second request
/// of its session (-1) sent while it streams, on the same worker; then the session is closed
/// with 0. Four rounds, more than maxNumSequence, so closed sessions must free their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_cancelled_by_a_request_of_its_own_session() {
    // So many steps that the stream can only end early because it was cancelled.
    let (s, _store) = serve(&[(
        "stateful",
        "sequence_continuous_batching",
        &continuous_yaml(30000, 100_000),
    )])
    .await;
    for _ in 0..4 {
        let n = cancel_a_stream(&s).await;
        assert!(n < 100_000, "the stream ended by the cancel");
    }
}

/// test_infer_stateful_idle_timeout: a session idle longer than sequenceMaxIdleMSec is closed,
/// and its id is refused (TorchServe: "does not process the new inference request").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_and_its_id_refused() {
    let (s, _store) = serve(&[(
        "stateful",
        "sequence_continuous_batching",
        &continuous_yaml(300, 10),
    )])
    .await;
    let (status, id, _) = post(&s, "stateful", None, "2").await;
    assert_eq!(status, 200);
    let id = id.unwrap();
    // Idle from the reply on: wait past the limit (the only wait here is the thing tested).
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let (status, _, text) = post(&s, "stateful", Some(&id), "2").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("sequenceMaxIdleMSec"), "{text}");
    // A new session is served.
    assert_eq!(post(&s, "stateful", None, "2").await.0, 200);
}

/// A `StreamPredictions2` reply that is an in-band error, as TorchServe sends one on the stream:
/// a google.rpc.Status with INVALID_ARGUMENT (its code for a 400) whose message names `why`, and
/// no prediction.
fn refused(r: oxserve::grpc::pb::inference::PredictionResponse, why: &str) {
    let status = r.status.expect("an in-band error");
    assert_eq!(
        status.code,
        tonic::Code::InvalidArgument as i32,
        "{status:?}"
    );
    assert!(status.message.contains(why), "{status:?}");
    assert!(r.prediction.is_empty());
}

/// A session over gRPC's `StreamPredictions2`, TorchServe's bidirectional stream, as its
/// client (ts_scripts/torchserve_grpc_client.py `infer_stream2`) runs one: the first message
/// carries no sequence id and its reply names the session; every later message carries that id.
/// Two such streams run at once on the two-worker example: each sum must be its own session's,
/// and the HTTP API continues a session the stream started (one session table, whatever the
/// transport). Then the breaks: a sequence id too long to keep, and the id of a session closed
/// for idling, each get an in-band error naming why, and the stream keeps serving; the id of a
/// session the handler ended may open one again, as under TorchServe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_predictions2_runs_sessions_over_grpc() {
    use common::grpc::{inference, predict, Stream2};
    // Idle sessions of stateful_end close after 1.5 s (the test waits past that once, below).
    let one_worker = continuous_yaml(1500, 10).replace(
        "minWorkers: 2\nmaxWorkers: 2",
        "minWorkers: 1\nmaxWorkers: 1",
    );
    let (s, _store) = serve(&[
        ("stateful", "sequence_batching", SEQ_YAML),
        ("stateful_end", "sequence_continuous_batching", &one_worker),
    ])
    .await;
    let message = |model: &str, seq: Option<&str>, n: i64| {
        let mut m = predict(model, n.to_string().as_bytes());
        m.sequence_id = seq.map(str::to_string);
        m
    };
    let session = |start: i64| {
        let s = &s;
        async move {
            let mut stream = Stream2::open(&mut inference(s).await).await;
            let first = stream.ask(message("stateful", None, start)).await;
            assert!(first.status.is_none(), "{first:?}");
            let id = first.sequence_id.clone().expect("the session's id");
            assert!(id.starts_with("ts-seq-"), "{id}");
            let mut sums = vec![String::from_utf8(first.prediction).unwrap()];
            for k in 2..=5 {
                let r = stream.ask(message("stateful", Some(&id), start * k)).await;
                assert!(r.status.is_none(), "{r:?}");
                assert_eq!(r.sequence_id.as_deref(), Some(id.as_str()));
                sums.push(String::from_utf8(r.prediction).unwrap());
            }
            (id, sums.join(" "), stream)
        }
    };
    let ((a_id, a, mut a_stream), (b_id, b, _)) = tokio::join!(session(1), session(2));
    assert_ne!(a_id, b_id);
    assert_eq!(a, "1 3 6 10 15");
    assert_eq!(b, "2 6 12 20 30");
    // The HTTP API finds the session the stream opened, with its sum.
    let (status, id, text) = post(&s, "stateful", Some(&b_id), "100").await;
    assert_eq!(
        (status, id.as_deref(), text.as_str()),
        (200, Some(b_id.as_str()), "130")
    );

    // An id over the server's 256-byte limit: refused in-band, as TorchServe sends an error on
    // this stream (a google.rpc.Status: INVALID_ARGUMENT for its 400), nothing opened for it.
    let long = "x".repeat(257);
    refused(
        a_stream.ask(message("stateful", Some(&long), 1)).await,
        "sequence",
    );
    // The stream and its session go on.
    let r = a_stream.ask(message("stateful", Some(&a_id), 5)).await;
    assert_eq!((r.status, r.prediction), (None, b"20".to_vec()));

    // A session the handler ends (the continuous example ends one on 0) is forgotten by the
    // server, and its id may open a session again (docs/llm.md, "Closing").
    let mut stream = Stream2::open(&mut inference(&s).await).await;
    let first = stream.ask(message("stateful_end", None, 2)).await;
    let id = first.sequence_id.expect("the session's id");
    let r = stream.ask(message("stateful_end", Some(&id), 4)).await;
    assert_eq!((r.status, r.prediction), (None, b"6".to_vec()));
    let r = stream.ask(message("stateful_end", Some(&id), 0)).await;
    assert_eq!((r.status, r.prediction), (None, b"6".to_vec()));
    // As under TorchServe, only a message without an id is marked as a session's start
    // (`ts_request_sequence_start`), so the handler, which keeps sums in an LRU of its own, goes
    // on from the old sum: 6 + 2.
    let r = stream.ask(message("stateful_end", Some(&id), 2)).await;
    assert_eq!((r.status, r.prediction), (None, b"8".to_vec()));
    assert_eq!(r.sequence_id.as_deref(), Some(id.as_str()));
    // A session closed for idling past sequenceMaxIdleMSec: its id is refused from then on, over
    // gRPC as over HTTP, in-band with the reason (the only wait here is the thing tested).
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
    let r = stream.ask(message("stateful_end", Some(&id), 2)).await;
    assert_eq!(r.sequence_id.as_deref(), Some(id.as_str()));
    refused(r, "sequenceMaxIdleMSec");
    // A new session on the same stream is served.
    let r = stream.ask(message("stateful_end", None, 2)).await;
    assert_eq!((r.status, r.prediction), (None, b"2".to_vec()));
}

/// TorchServe's own example handlers (BaseHandler, torch, lru-dict) on TorchServe's worker
/// (`worker_runtime=torchserve`), with TorchServe's test YAMLs: the same expectations as its
/// pytest files. Needs a Python with torchserve, torch and lru-dict, and the pytorch/serve tree:
/// `OXSERVE_TEST_TORCHSERVE_PYTHON=/venv/bin/python OXSERVE_TEST_TORCHSERVE_SERVE=/path/to/serve
/// cargo test --test sequence_batching -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs torchserve, torch and lru-dict: set OXSERVE_TEST_TORCHSERVE_PYTHON and OXSERVE_TEST_TORCHSERVE_SERVE"]
async fn torchserve_worker_runs_torchserves_stateful_examples() {
    let python = std::env::var("OXSERVE_TEST_TORCHSERVE_PYTHON")
        .expect("OXSERVE_TEST_TORCHSERVE_PYTHON: a Python with torchserve, torch and lru-dict");
    let serve = std::env::var("OXSERVE_TEST_TORCHSERVE_SERVE")
        .expect("OXSERVE_TEST_TORCHSERVE_SERVE: the pytorch/serve source tree");
    let examples = Path::new(&serve).join("examples/stateful");
    let folder = |store: &Path, example: &str, yaml: &str| {
        let dir = store.join("stateful");
        std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
        std::fs::write(
            dir.join("MAR-INF/MANIFEST.json"),
            r#"{"runtime": "python", "model": {"modelName": "stateful", "modelVersion": "1.0", "handler": "stateful_handler.py", "serializedFile": "model_cnn.pt", "modelFile": "model.py", "configFile": "model-config.yaml"}}"#,
        )
        .unwrap();
        for (from, to) in [
            (
                examples.join(example).join("stateful_handler.py"),
                "stateful_handler.py",
            ),
            (examples.join("model.py"), "model.py"),
            (examples.join("model_cnn.pt"), "model_cnn.pt"),
        ] {
            std::fs::copy(&from, dir.join(to)).unwrap_or_else(|e| panic!("{from:?}: {e}"));
        }
        std::fs::write(dir.join("model-config.yaml"), yaml).unwrap();
    };
    let props = format!("worker_runtime=torchserve\npython_executable={python}\n");
    let start_ts = |store: &Path| Server::start_store(&props, store, "stateful", &[]);

    // test_example_stateful_sequence_batching_http.py
    let store = tempfile::tempdir().unwrap();
    folder(store.path(), "sequence_batching", SEQ_YAML);
    let s = start_ts(store.path());
    s.wait_healthy().await;
    let (a, b) = tokio::join!(
        five_requests(&s, "seq_0", false),
        five_requests(&s, "seq_1", true)
    );
    assert_eq!(
        (sums(&a).as_str(), sums(&b).as_str()),
        ("1 4 9 16 25", "2 6 12 20 30")
    );
    drop(s);

    // test_example_stateful_sequence_continuous_batching_http.py (its YAML: 1 s stream steps).
    let store = tempfile::tempdir().unwrap();
    let yaml = "minWorkers: 2\nmaxWorkers: 2\nbatchSize: 1\nmaxNumSequence: 2\n\
sequenceMaxIdleMSec: 30000\nsequenceTimeoutMSec: 60000\nmaxSequenceJobQueueSize: 10\n\
sequenceBatching: true\ncontinuousBatching: true\nhandler:\n  cache:\n    capacity: 4\n";
    folder(store.path(), "sequence_continuous_batching", yaml);
    let s = start_ts(store.path());
    s.wait_healthy().await;
    let (a, b) = tokio::join!(
        continuous_session(&s, 2, true),
        continuous_session(&s, 4, false)
    );
    assert_eq!((a.as_str(), b.as_str()), ("2 6 12 20 20", "4 12 24 40 60"));
    // test_infer_stateful_cancel, once per free slot and then some.
    for _ in 0..3 {
        let n = cancel_a_stream(&s).await;
        assert!(n < 11, "{n} chunks");
    }
}
