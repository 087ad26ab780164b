//! Hostile ONNX models against the real binary: models whose loading makes tract allocate far more
//! than any real model of their size (a constant-folded ConstantOfShape or Expand of 64 GiB, an
//! initializer whose declared dims do not match its 4 bytes of data). Before the load check
//! (src/backend/onnx/check.rs) such a registration aborted the server, or sent the host into the OOM
//! killer; now each is refused with a clear 500 (TorchServe's answer for a model whose workers
//! cannot load it) that leaves nothing behind, and the server goes on
//! serving the ONNX model it already has, with exact metrics.
//!
//! The files are written here with tract's own protobuf types, so the test needs no Python.

mod common;

use std::path::{Path, PathBuf};

use common::{write_mar, Server};
use prost011::Message;
use reqwest::Method;
use serde_json::json;
use tract_onnx::pb;

const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// 2^17 x 2^17 float32: 64 GiB, more than this host (or the check's cap) can give.
const HUGE: [i64; 2] = [1 << 17, 1 << 17];

fn value_info(name: &str, dims: Option<&[i64]>) -> pb::ValueInfoProto {
    let shape = dims.map(|dims| pb::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| pb::tensor_shape_proto::Dimension {
                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*d)),
                ..Default::default()
            })
            .collect(),
    });
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: FLOAT,
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn shape_initializer(name: &str, dims: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: INT64,
        dims: vec![dims.len() as i64],
        int64_data: dims.to_vec(),
        ..Default::default()
    }
}

/// A model `y = x + <nodes' output "big">` with input `x: float32 [1]`.
fn model(nodes: Vec<pb::NodeProto>, initializer: Vec<pb::TensorProto>) -> Vec<u8> {
    let mut nodes = nodes;
    nodes.push(node("Add", &["x", "big"], "y"));
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "oxserve hostile_onnx test".into(),
        graph: Some(pb::GraphProto {
            name: "hostile".into(),
            node: nodes,
            initializer,
            input: vec![value_info("x", Some(&[1]))],
            output: vec![value_info("y", None)],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// ConstantOfShape of a constant shape: tract folds it into a 64 GiB tensor while optimizing.
fn constant_of_shape() -> Vec<u8> {
    model(
        vec![node("ConstantOfShape", &["shape"], "big")],
        vec![shape_initializer("shape", &HUGE)],
    )
}

/// Expand of a one-element constant to a constant shape: the same, through another operator.
fn expand() -> Vec<u8> {
    model(
        vec![node("Expand", &["one", "shape"], "big")],
        vec![
            pb::TensorProto {
                name: "one".into(),
                data_type: FLOAT,
                dims: vec![1],
                float_data: vec![1.0],
                ..Default::default()
            },
            shape_initializer("shape", &HUGE),
        ],
    )
}

/// An initializer declaring 64 GiB of floats and carrying 4 bytes: tract sizes its buffer by the
/// dims before it looks at the data.
fn lying_initializer() -> Vec<u8> {
    model(
        vec![],
        vec![pb::TensorProto {
            name: "big".into(),
            data_type: FLOAT,
            dims: HUGE.to_vec(),
            raw_data: 1.0f32.to_le_bytes().to_vec(),
            ..Default::default()
        }],
    )
}

fn onnx_manifest(name: &str) -> serde_json::Value {
    json!({
        "createdOn": "29/11/2026 01:00:00",
        "runtime": "python",
        "model": {"modelName": name, "modelVersion": "1.0", "serializedFile": "model.onnx", "handler": "onnx"},
        "archiverVersion": "0.12.0"
    })
}

fn write_onnx_mar(store: &Path, name: &str, onnx: &[u8]) -> PathBuf {
    write_mar(
        store,
        &format!("{name}.mar"),
        &onnx_manifest(name),
        &[("model.onnx", onnx)],
    )
}

fn example(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/onnx")
            .join(file),
    )
    .expect(file)
}

/// Folders under `tmp` whose name starts with `prefix`.
fn folders(tmp: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

async fn register(s: &Server, query: &str) -> (u16, serde_json::Value) {
    s.mgmt(Method::POST, &format!("/models?{query}")).await
}

/// The tiny example classifier answers `n` more times, and its 2xx count is then exactly `total`.
async fn still_serving(s: &mut Server, n: usize, total: usize) {
    let body = String::from_utf8(example("sample_input.json")).unwrap();
    for _ in 0..n {
        let reply = s.predict("tiny", &body).await;
        assert_eq!(reply.status(), 200);
        let v: serde_json::Value = reply.json().await.unwrap();
        assert_eq!(v["outputs"]["probabilities"]["shape"], json!([2, 3]), "{v}");
    }
    assert_eq!(
        s.sample(
            "oxserve_model_responses_total{model_name=\"tiny\",model_version=\"1.0\",status_class=\"2xx\"}"
        )
        .await,
        Some(total as f64),
        "{}",
        s.scrape().await
    );
    assert!(
        s.child.try_wait().unwrap().is_none(),
        "the server exited:\n{}",
        s.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_that_would_exhaust_memory_while_loading_are_refused() {
    let store = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    write_onnx_mar(store.path(), "tiny", &example("model.onnx"));
    let hostile = [
        ("constant_of_shape", constant_of_shape()),
        ("expand", expand()),
        ("lying_initializer", lying_initializer()),
    ];
    for (name, bytes) in &hostile {
        write_onnx_mar(store.path(), name, bytes);
    }
    // The default cap (4 GiB for files this small) applies. The server itself runs under a 16 GiB
    // address-space cap, so that if the check ever regresses the allocation fails and the server
    // aborts (this test fails) instead of filling the shared host's memory.
    let mut s = Server::start_capped(
        "default_workers_per_model=1",
        &[
            "--model-store",
            store.path().to_str().unwrap(),
            "--enable-model-api",
            "--models",
            "tiny.mar",
        ],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
        Some(16 << 30),
    );
    s.wait_healthy().await;
    still_serving(&mut s, 1, 1).await;
    let before = folders(tmp.path(), "oxserve-model-");
    assert_eq!(before.len(), 1, "{before:?}");
    for (name, _) in &hostile {
        let (code, e) = register(
            &s,
            &format!("url={name}.mar&initial_workers=1&synchronous=true"),
        )
        .await;
        // A model that does not load is TorchServe's 500 (its workers fail to start).
        assert_eq!(code, 500, "{name}: {e}");
        assert_eq!(e["code"], 500, "{name}: {e}");
        assert_eq!(e["type"], "InternalServerException", "{name}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains("ONNX model model.onnx refused")
                && message.contains("capped at 4 GiB (onnx_load_memory_limit)"),
            "{name}: {message}"
        );
        // The refused archive's unpacked folder is gone already.
        assert_eq!(folders(tmp.path(), "oxserve-model-"), before, "{name}");
        let (code, _) = s.mgmt(Method::GET, &format!("/models/{name}")).await;
        assert_eq!(code, 404, "{name}");
    }
    still_serving(&mut s, 4, 5).await;
    let (code, models) = s.mgmt(Method::GET, "/models").await;
    assert_eq!(code, 200);
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models["models"][0]["modelName"], "tiny", "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_cap_is_the_configured_one() {
    let store = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    write_onnx_mar(store.path(), "tiny", &example("model.onnx"));
    // 1 MiB: not even the tiny model loads under it, which shows the key reaches the check.
    let s = Server::start_store_with_env(
        "default_workers_per_model=1\nonnx_load_memory_limit=1048576",
        store.path(),
        "",
        &["--enable-model-api"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    let (code, e) = register(&s, "url=tiny.mar&synchronous=true").await;
    assert_eq!(code, 500, "{e}");
    assert_eq!(e["type"], "InternalServerException", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("capped at 1 MiB (onnx_load_memory_limit)"),
        "{message}"
    );
    assert_eq!(folders(tmp.path(), "oxserve-model-"), Vec::<PathBuf>::new());
    assert_eq!(s.predict("tiny", "[[1, 2, 3, 4]]").await.status(), 404);
}

/// `y = x + w` where `w: float32 [1]` is read from the external file `location`.
fn external_weight(location: &str) -> Vec<u8> {
    model(
        vec![node("Identity", &["w"], "big")],
        vec![pb::TensorProto {
            name: "w".into(),
            data_type: FLOAT,
            dims: vec![1],
            data_location: Some(pb::tensor_proto::DataLocation::External as i32),
            external_data: vec![pb::StringStringEntryProto {
                key: "location".into(),
                value: location.into(),
            }],
            ..Default::default()
        }],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_data_must_stay_inside_the_model_folder() {
    let store = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A real external weight next to the model: accepted, and its value is used.
    write_mar(
        store.path(),
        "inside.mar",
        &onnx_manifest("inside"),
        &[
            ("model.onnx", &external_weight("weights.bin")),
            ("weights.bin", &2.5f32.to_le_bytes()),
        ],
    );
    // Anything else the server can read (its config, keys, /etc) must not become a weight that
    // the model then hands to every client.
    let secret = tmp.path().join("secret.bin");
    std::fs::write(&secret, 7.0f32.to_le_bytes()).unwrap();
    let escapes = [
        secret.to_str().unwrap().to_string(),
        format!("../../../../../../..{}", secret.display()),
        "./../weights.bin".to_string(),
    ];
    for (i, location) in escapes.iter().enumerate() {
        write_onnx_mar(
            store.path(),
            &format!("escape{i}"),
            &external_weight(location),
        );
    }
    let s = Server::start_store_with_env(
        "default_workers_per_model=1",
        store.path(),
        "",
        &["--enable-model-api"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    for (i, location) in escapes.iter().enumerate() {
        let (code, e) = register(&s, &format!("url=escape{i}.mar&synchronous=true")).await;
        assert_eq!(code, 500, "{location}: {e}");
        assert_eq!(e["type"], "InternalServerException", "{location}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("external data at {location:?}"))
                && message.contains("must be a relative path inside the model folder"),
            "{message}"
        );
        assert_eq!(folders(tmp.path(), "oxserve-model-"), Vec::<PathBuf>::new());
    }
    let (code, e) = register(&s, "url=inside.mar&synchronous=true").await;
    assert_eq!(code, 200, "{e}");
    let reply = s.predict("inside", "[1.0]").await;
    assert_eq!(reply.status(), 200);
    let v: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(v["outputs"]["y"]["data"], json!([3.5]), "{v}");
}

/// TorchServe answers a model that does not load with 500 InternalServerException (its workers
/// fail to start), and an archive that names no usable model file with 400: oxserve gives the
/// same statuses, with the reason, for an `.onnx` file that does not parse and for one missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_and_missing_models_get_torchserves_statuses() {
    let store = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    write_onnx_mar(store.path(), "garbage", b"this is not an ONNX protobuf");
    let mut manifest = onnx_manifest("missing");
    manifest["model"]["serializedFile"] = json!("absent.onnx");
    write_mar(
        store.path(),
        "missing.mar",
        &manifest,
        &[("model.onnx", &example("model.onnx"))],
    );
    let s = Server::start_store_with_env(
        "default_workers_per_model=1",
        store.path(),
        "",
        &["--enable-model-api"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    let (code, e) = register(&s, "url=garbage.mar&synchronous=true").await;
    assert_eq!(code, 500, "{e}");
    assert_eq!(e["code"], 500, "{e}");
    assert_eq!(e["type"], "InternalServerException", "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("cannot load model from garbage.mar")
            && message.contains("ONNX model model.onnx refused"),
        "{message}"
    );
    let (code, e) = register(&s, "url=missing.mar&synchronous=true").await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(e["type"], "BadRequestException", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("absent.onnx"),
        "{e}"
    );
    for name in ["garbage", "missing"] {
        assert_eq!(s.mgmt(Method::GET, &format!("/models/{name}")).await.0, 404);
    }
    assert_eq!(folders(tmp.path(), "oxserve-model-"), Vec::<PathBuf>::new());
}
