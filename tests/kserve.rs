//! KServe v1 and v2 on the inference listener (`service_envelope=kserve|kservev2`), through the
//! real binary and a real Python worker (oxserve's stdlib runtime) running an echo handler.

mod common;

use common::Server;
use serde_json::{json, Value};

/// Echoes what the envelope hands it: v1 instances as they are, v2 tensors' (reshaped) data.
const ECHO: &str = r#"
def handle(data, context):
    if data is None:
        return None
    return [x["data"] if isinstance(x, dict) and "datatype" in x else x for x in data]
"#;

fn start(envelope: &str) -> (Server, tempfile::TempDir) {
    start_with(envelope, ECHO, "")
}

/// The echo model with this handler, and these extra config.properties lines.
fn start_with(envelope: &str, handler: &str, props: &str) -> (Server, tempfile::TempDir) {
    let store = tempfile::tempdir().unwrap();
    let manifest = json!({
        "createdOn": "28/11/2026 12:00:00",
        "runtime": "python",
        "model": {"modelName": "echo", "modelVersion": "2.0", "handler": "echo.py"},
        "archiverVersion": "0.12.0"
    });
    common::write_mar(
        store.path(),
        "echo.mar",
        &manifest,
        &[("echo.py", handler.as_bytes())],
    );
    let props = format!(
        "service_envelope={envelope}\nmodel_store={}\nload_models=echo.mar\n{props}",
        store.path().display()
    );
    (Server::start(&props, &[]), store)
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = server
        .client
        .post(format!("{}{path}", server.inference))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

/// A v1 predict of mixed instances comes back as they were.
async fn v1_predict_echoes(server: &Server) {
    let (code, body) = post(
        server,
        "/v1/models/echo:predict",
        json!({"instances": [[1, 2], {"a": "b"}]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, json!({"predictions": [[1, 2], {"a": "b"}]}));
}

/// KServe v1's model-ready route.
async fn v1_ready(server: &Server) {
    let (code, body) = server
        .get_json(format!("{}/v1/models/echo", server.inference))
        .await;
    assert_eq!((code, body), (200, json!({"name": "echo", "ready": true})));
}

#[tokio::test]
async fn kserve_v1_predict_explain_and_ready() {
    let (server, _store) = start("kserve");
    server.wait_healthy().await;
    v1_predict_echoes(&server).await;
    let (code, body) = post(
        &server,
        "/v1/models/echo:explain",
        json!({"instances": [7]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, json!({"explanations": [7]}));
    v1_ready(&server).await;
    // Bad input: a clear 400 in TorchServe's error shape, and the worker keeps serving.
    let (code, body) = post(&server, "/v1/models/echo:predict", json!({"rows": [1]})).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("instances"),
        "{body}"
    );
    let r = server
        .client
        .post(format!("{}/v1/models/echo:predict", server.inference))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (code, _) = post(&server, "/v1/models/echo:frobnicate", json!({})).await;
    assert_eq!(code, 404);
    let (code, _) = post(
        &server,
        "/v1/models/nobody:predict",
        json!({"instances": []}),
    )
    .await;
    assert_eq!(code, 404);
    let (code, body) = post(
        &server,
        "/v1/models/echo:predict",
        json!({"instances": [1]}),
    )
    .await;
    assert_eq!((code, body), (200, json!({"predictions": [1]})));
}

#[tokio::test]
async fn kserve_v2_infer_explain_metadata_and_ready() {
    let (server, _store) = start("kservev2");
    server.wait_healthy().await;
    let request = json!({
        "id": "req-1",
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]},
            {"name": "y", "shape": [2], "datatype": "FP32", "data": [0.5, 1.5]}
        ]
    });
    let (code, body) = post(&server, "/v2/models/echo/infer", request.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        json!({
            "id": "req-1",
            "model_name": "echo",
            "model_version": "2.0",
            "outputs": [
                {"name": "x", "shape": [4], "datatype": "INT64", "data": [1, 2, 3, 4]},
                {"name": "y", "shape": [2], "datatype": "FP64", "data": [0.5, 1.5]}
            ]
        })
    );
    let (code, body) = post(&server, "/v2/models/echo/versions/2.0/explain", request).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([1, 2, 3, 4]));
    // Without an id the reply carries the request's own id.
    let (code, body) = post(
        &server,
        "/v2/models/echo/infer",
        json!({"inputs": [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(!body["id"].as_str().unwrap().is_empty(), "{body}");
    assert_eq!(body["outputs"][0]["datatype"], "BYTES");
    let (code, body) = server
        .get_json(format!("{}/v2/models/echo", server.inference))
        .await;
    assert_eq!(code, 200);
    assert_eq!(body["name"], "echo");
    assert_eq!(body["versions"], json!(["2.0"]));
    let (code, body) = server
        .get_json(format!("{}/v2/models/echo/ready", server.inference))
        .await;
    assert_eq!((code, body), (200, json!({"name": "echo", "ready": true})));
    let (code, _) = server
        .get_json(format!("{}/v2/health/ready", server.inference))
        .await;
    assert_eq!(code, 200);
    // Bad tensors: 400 with a message, never a crash.
    let (code, body) = post(
        &server,
        "/v2/models/echo/infer",
        json!({"inputs": [{"name": "x", "shape": [3], "datatype": "INT64", "data": [1, 2]}]}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("reshape"),
        "{body}"
    );
    let (code, _) = post(
        &server,
        "/v2/models/echo/infer",
        json!({"inputs": [{"name": "x", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}),
    )
    .await;
    assert_eq!(code, 400);
    let (code, _) = post(&server, "/v2/models/echo/infer", json!({"inputs": []})).await;
    assert_eq!(code, 400);
    let (code, _) = server
        .get_json(format!("{}/v2/models/nobody/ready", server.inference))
        .await;
    assert_eq!(code, 404);
}

/// The echo handler as an `async def handle`.
const ECHO_ASYNC: &str = r#"
import asyncio

async def handle(data, context):
    if data is None:
        return None
    await asyncio.sleep(0)
    return [x["data"] if isinstance(x, dict) and "datatype" in x else x for x in data]
"#;

/// An `async def handle` behind the KServe envelope is awaited before the envelope wraps its
/// output, in classic mode and in async mode (`asyncCommunication`).
#[tokio::test]
async fn kserve_envelope_awaits_an_async_def_handle() {
    for props in [
        "",
        "models={\"echo\": {\"2.0\": {\"asyncCommunication\": true}}}\n",
    ] {
        let (server, _store) = start_with("kserve", ECHO_ASYNC, props);
        server.wait_healthy().await;
        let (code, body) = post(
            &server,
            "/v1/models/echo:predict",
            json!({"instances": [[1, 2], 3]}),
        )
        .await;
        assert_eq!(code, 200, "{props}: {body}");
        assert_eq!(body, json!({"predictions": [[1, 2], 3]}), "{props}");
    }
}

/// The same envelopes with TorchServe's own worker (`worker_runtime=torchserve`): the worker
/// unwraps and wraps KServe's shapes itself (ts/torch_handler/request_envelope), oxserve routes
/// and passes the envelope in the load message, as TorchServe's frontend does.
#[tokio::test]
#[ignore = "needs torchserve 0.12 + torch: OXSERVE_TEST_TORCHSERVE_PYTHON=/path/to/venv/bin/python cargo test --test kserve -- --ignored"]
async fn kserve_v1_and_v2_with_torchserves_worker() {
    let python = std::env::var("OXSERVE_TEST_TORCHSERVE_PYTHON")
        .expect("set OXSERVE_TEST_TORCHSERVE_PYTHON to a python with torchserve 0.12 installed");
    let props = format!("worker_runtime=torchserve\npython_executable={python}\n");

    let (server, _store) = start_with("kserve", ECHO, &props);
    server.wait_healthy().await;
    v1_predict_echoes(&server).await;
    v1_ready(&server).await;
    drop(server);

    let (server, _store) = start_with("kservev2", ECHO, &props);
    server.wait_healthy().await;
    let (code, body) = post(
        &server,
        "/v2/models/echo/infer",
        json!({
            "id": "req-1",
            "inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}]
        }),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["id"], "req-1", "{body}");
    assert_eq!(body["model_name"], "echo", "{body}");
    let outputs = body["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 1, "{body}");
    assert_eq!(outputs[0]["data"], json!([1, 2, 3, 4]), "{body}");
}
