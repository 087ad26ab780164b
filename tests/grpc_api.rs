//! TorchServe's gRPC APIs against the real binary, with tonic clients built from the same vendored
//! protos: inference (Ping, Predictions, StreamPredictions, StreamPredictions2), management (every
//! call), token authorization, limits, and that gRPC requests count in the same metrics as HTTP.

mod common;

use std::time::Duration;

use common::grpc::{grpcio_python, inference, management, predict};
use common::{demo_manifest, write_mar, Server};
use oxserve::grpc::pb::management::{
    DescribeModelRequest, ListModelsRequest, ManagementResponse, RegisterModelRequest,
    ScaleWorkerRequest, SetDefaultRequest, UnregisterModelRequest,
};
use tonic::{Code, Response, Status};

/// A request carrying `authorization: Bearer <key>`, as TorchServe's clients send a token.
fn with_key<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// The message of a management call that succeeded.
fn msg(r: Result<Response<ManagementResponse>, Status>) -> String {
    r.expect("the management call succeeds").into_inner().msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_predictions_answer_like_http_and_count_in_the_same_metrics() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    let mut c = inference(&s).await;
    let health = c.ping(()).await.unwrap().into_inner().health;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "Healthy");

    let reply = c
        .predictions(predict("demo", b"I love this"))
        .await
        .unwrap()
        .into_inner();
    let over_http = s
        .client
        .post(format!("{}/predictions/demo", s.inference))
        .body("I love this")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(reply.prediction, over_http.to_vec());

    // One gRPC and one HTTP prediction: both in the model's request counter.
    let total = r#"ts_inference_requests_total{model_name="demo",model_version="default""#;
    s.wait_sample(total, |v| v == 2.0).await;

    // A model error (the demo refuses a request without input) is the mapped gRPC code with its message,
    // and counts as a 4XX.
    let before = s.sample("Requests4XX{").await.unwrap_or(0.0);
    let mut empty = predict("demo", b"");
    empty.input.clear();
    let e = c.predictions(empty).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("empty request"), "{e:?}");
    let after = s.sample("Requests4XX{").await.unwrap_or(0.0);
    assert_eq!(after, before + 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_predictions_get_torchserve_codes_and_messages() {
    let s = Server::start("default_workers_per_model=1\nmax_request_size=65536", &[]);
    s.wait_healthy().await;
    let mut c = inference(&s).await;

    let e = c.predictions(predict("", b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("Parameter model_name is required."),
        "{e:?}"
    );

    let e = c.predictions(predict("nope", b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("Model not found: nope"), "{e:?}");

    let mut req = predict("demo", b"x");
    req.model_version = "9.9".into();
    let e = c.predictions(req).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("9.9"), "{e:?}");

    // Over max_request_size: refused by the decoder, before anything is queued.
    let e = c
        .predictions(predict("demo", &vec![b'a'; 100_000]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // More input entries than a request may carry parameters.
    let mut req = predict("demo", b"x");
    for i in 0..1100 {
        req.input.insert(format!("k{i}"), Vec::new());
    }
    let e = c.predictions(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("too many parameters"), "{e:?}");

    // Headers (metadata) past the limit: refused, and the server keeps serving.
    let mut req = tonic::Request::new(predict("demo", b"fine"));
    req.metadata_mut()
        .insert("x-big", "v".repeat(64 * 1024).parse().unwrap());
    assert!(c.predictions(req).await.is_err());
    let mut c = inference(&s).await;
    assert!(c.predictions(predict("demo", b"fine")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_predictions2_answers_each_message_with_its_sequence_id() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    let mut c = inference(&s).await;
    let mut first = predict("demo", b"great");
    first.sequence_id = Some("seq-1".into());
    let messages = vec![first, predict("missing", b"x"), predict("demo", b"awful")];
    let mut replies = c
        .stream_predictions2(futures_util::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = replies.message().await.unwrap() {
        got.push(r);
    }
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].sequence_id.as_deref(), Some("seq-1"));
    assert!(String::from_utf8_lossy(&got[0].prediction).contains("positive"));
    // An error is in-band, as TorchServe sends it: a google.rpc.Status with the code.
    let status = got[1].status.as_ref().expect("in-band status");
    assert_eq!(status.code, Code::NotFound as i32);
    assert!(status.message.contains("Model not found"), "{status:?}");
    // A message without a sequence id starts a new sequence with a generated one.
    assert!(got[2]
        .sequence_id
        .as_deref()
        .unwrap()
        .starts_with("ts-seq-"));
    assert!(String::from_utf8_lossy(&got[2].prediction).contains("negative"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_calls_match_the_http_api() {
    let s = Server::start("default_workers_per_model=1", &["--enable-model-api"]);
    s.wait_healthy().await;
    let mut m = management(&s).await;

    let list = msg(m.list_models(ListModelsRequest::default()).await);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["models"][0]["modelName"], "demo");

    let d = msg(m
        .describe_model(DescribeModelRequest {
            model_name: "demo".into(),
            ..Default::default()
        })
        .await);
    let d: serde_json::Value = serde_json::from_str(&d).unwrap();
    assert_eq!(d[0]["modelName"], "demo");
    assert_eq!(d[0]["minWorkers"], 1);

    let e = m
        .describe_model(DescribeModelRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let r = msg(m
        .scale_worker(ScaleWorkerRequest {
            model_name: "demo".into(),
            min_worker: 2,
            max_worker: 2,
            synchronous: true,
            ..Default::default()
        })
        .await);
    assert!(r.contains("Workers scaled to 2"), "{r}");
    let (_, d) = s.mgmt(reqwest::Method::GET, "/models/demo").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 2);

    let e = m
        .scale_worker(ScaleWorkerRequest {
            model_name: "demo".into(),
            min_worker: 3,
            max_worker: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Register two versions of an archive, switch the default, unregister.
    for v in ["1.0", "2.0"] {
        let mar = write_mar(s.path(), &format!("g{v}.mar"), &demo_manifest("g", v), &[]);
        let r = msg(m
            .register_model(RegisterModelRequest {
                url: mar.to_str().unwrap().into(),
                initial_workers: 1,
                synchronous: true,
                ..Default::default()
            })
            .await);
        assert!(
            r.contains(&format!("Model \"g\" Version: {v} registered")),
            "{r}"
        );
    }
    let r = msg(m
        .set_default(SetDefaultRequest {
            model_name: "g".into(),
            model_version: "2.0".into(),
        })
        .await);
    assert!(r.contains("Default version successfully updated"), "{r}");
    let (_, d) = s.mgmt(reqwest::Method::GET, "/models/g").await;
    assert_eq!(d[0]["modelVersion"], "2.0");
    let e = m
        .set_default(SetDefaultRequest {
            model_name: "g".into(),
            model_version: "7.0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let r = msg(m
        .unregister_model(UnregisterModelRequest {
            model_name: "g".into(),
            model_version: "1.0".into(),
        })
        .await);
    assert_eq!(r, "Model \"g\" unregistered");

    // TorchServe's refusals, with its messages.
    let e = m
        .register_model(RegisterModelRequest {
            url: "https://torchserve.s3.amazonaws.com/mar_files/../mar_files/densenet161.mar"
                .into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("Relative path is not allowed in url"),
        "{e:?}"
    );
    let e = m
        .register_model(RegisterModelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Parameter url is required."), "{e:?}");
    let e = m
        .register_model(RegisterModelRequest {
            url: "g1.0.mar".into(),
            handler: "my_handler.py".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_api_disabled_is_permission_denied() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    let mut m = management(&s).await;
    let e = m
        .register_model(RegisterModelRequest {
            url: "x.mar".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("Model API disabled"), "{e:?}");
    let e = m
        .unregister_model(UnregisterModelRequest {
            model_name: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The demo model is still there.
    assert_eq!(s.predict("demo", r#""fine""#).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_authorization_guards_both_services() {
    let s = Server::start(
        "default_workers_per_model=1\ndisable_token_authorization=false",
        &[],
    );
    s.wait_healthy().await;
    let (inference_key, management_key) = (s.key("inference"), s.key("management"));
    let mut c = inference(&s).await;
    // Ping needs no key, as /ping over HTTP.
    let health = c.ping(()).await.unwrap().into_inner().health;
    assert!(health.contains("Healthy"), "{health}");
    let e = c.predictions(predict("demo", b"x")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("Token Authorization failed"), "{e:?}");
    let e = c
        .predictions(with_key(&management_key, predict("demo", b"x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let ok = c
        .predictions(with_key(&inference_key, predict("demo", b"I love it")))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&ok.into_inner().prediction).contains("positive"));

    let mut m = management(&s).await;
    let e = m
        .list_models(ListModelsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        m.list_models(with_key(&inference_key, ListModelsRequest::default()))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert!(msg(m
        .list_models(with_key(&management_key, ListModelsRequest::default()))
        .await)
    .contains("demo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_predictions_sends_each_part_of_a_python_handler_as_a_message() {
    let store = common::example_archives();
    let s = Server::start_store("default_workers_per_model=1", store, "streaming.mar", &[]);
    s.wait_healthy().await;
    let mut c = inference(&s).await;
    let mut parts = c
        .stream_predictions(predict("streaming", b"hi"))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(p) = parts.message().await.unwrap() {
        got.push(String::from_utf8(p.prediction).unwrap());
    }
    assert_eq!(
        got,
        ["hi: part 1\n", "hi: part 2\n", "hi: part 3\n", "hi: done\n"]
    );
    // Unary Predictions of a streaming handler: the parts joined, as HTTP joins its chunks.
    let whole = c
        .predictions(predict("streaming", b"yo"))
        .await
        .unwrap()
        .into_inner()
        .prediction;
    assert_eq!(
        String::from_utf8(whole).unwrap(),
        "yo: part 1\nyo: part 2\nyo: part 3\nyo: done\n"
    );
    // Both counted in the model's metrics, the stream with its time to first chunk.
    let p = r#"{model_name="streaming",model_version="1.0"}"#;
    s.wait_sample(
        &format!("oxserve_time_to_first_chunk_seconds_count{p}"),
        |v| v == 2.0,
    )
    .await;
}

/// Runs TorchServe's own gRPC client (tests/grpc_client/torchserve_grpc_client.py, with grpcio from
/// PyPI) against the server: (exit code, stdout + stderr).
fn torchserve_client(s: &Server, args: &[&str]) -> (i32, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = grpcio_python();
    let host_port = |url: &Option<String>| {
        url.as_deref()
            .unwrap()
            .trim_start_matches("http://")
            .to_string()
    };
    let out = std::process::Command::new(python)
        .arg(format!("{root}/tests/grpc_client/run_client.py"))
        .args(args)
        .current_dir(s.path())
        .env("OXSERVE_GRPC_STUBS", format!("{root}/target/grpc-stubs"))
        .env("OXSERVE_GRPC_INFERENCE", host_port(&s.grpc_inference))
        .env("OXSERVE_GRPC_MANAGEMENT", host_port(&s.grpc_management))
        .output()
        .expect("run the TorchServe gRPC client");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchserve_grpc_client_works_against_oxserve() {
    let store = tempfile::tempdir().unwrap();
    write_mar(
        store.path(),
        "sentiment.mar",
        &demo_manifest("sentiment", "1.0"),
        &[],
    );
    let s = Server::start_store(
        "default_workers_per_model=1\ndisable_token_authorization=false",
        store.path(),
        "",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    let (inference_key, management_key) = (s.key("inference"), s.key("management"));
    std::fs::write(s.path().join("input.txt"), "I love this").unwrap();

    // Register from the model store, as the client does when the archive is in its mar_set.
    let (rc, out) = torchserve_client(
        &s,
        &[
            "register",
            "sentiment",
            "sentiment.mar",
            "--auth-token",
            &management_key,
        ],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("Model sentiment registered successfully"),
        "{out}"
    );

    let (rc, out) = torchserve_client(
        &s,
        &[
            "infer",
            "sentiment",
            "input.txt",
            "--auth-token",
            &inference_key,
        ],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains(r#"{"label":"positive","score":0.667}"#),
        "{out}"
    );

    let (rc, out) = torchserve_client(
        &s,
        &[
            "infer_stream",
            "sentiment",
            "input.txt",
            "--auth-token",
            &inference_key,
        ],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(r#""label":"positive""#), "{out}");

    // Without the key: refused with TorchServe's code and message.
    let (rc, out) = torchserve_client(&s, &["infer", "sentiment", "input.txt"]);
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains("PERMISSION_DENIED"), "{out}");
    assert!(out.contains("Token Authorization failed"), "{out}");

    let (rc, out) = torchserve_client(
        &s,
        &["unregister", "sentiment", "--auth-token", &management_key],
    );
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("Model sentiment unregistered successfully"),
        "{out}"
    );
    let (rc, out) = torchserve_client(
        &s,
        &["unregister", "sentiment", "--auth-token", &management_key],
    );
    assert_ne!(rc, 0, "{out}");
    assert!(out.contains("Model not found: sentiment"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_grpc_port_is_dropped_and_the_server_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    let addr = s
        .grpc_inference
        .as_deref()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    // Not HTTP/2 at all, then an HTTP/2 preface followed by junk frames.
    for junk in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
            &[0xff; 4096],
        ]
        .concat(),
    ] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = conn.write_all(&junk).await;
        let mut sink = Vec::new();
        // The server ends the connection (a read of 0 bytes or a reset), rather than waiting.
        let _ = tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut sink))
            .await
            .expect("the server closes a connection that sends garbage");
    }
    let mut c = inference(&s).await;
    let reply = c.predictions(predict("demo", b"fine")).await.unwrap();
    assert!(!reply.into_inner().prediction.is_empty());
}
