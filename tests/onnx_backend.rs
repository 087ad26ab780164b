//! The ONNX backend against the real example model (examples/onnx/model.onnx) run by tract.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oxserve::backend::onnx::{is_onnx, OnnxLoader};
use oxserve::backend::{
    Backend, BackendLoader, InferRequest, InferResponse, ModelSpec, NoStream, Param, WorkerSpec,
};
use oxserve::model::archive;
use serde_json::{json, Value};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/onnx")
}

fn spec(dir: &Path, manifest: archive::Manifest) -> WorkerSpec {
    let (config, _warnings) =
        oxserve::config::Config::from_sources(Default::default(), &[], &Default::default())
            .expect("default config");
    WorkerSpec {
        id: 9000,
        name: "W-9000-tiny_classifier_1.0".into(),
        gpu_id: -1,
        model: Arc::new(ModelSpec {
            model_name: "tiny_classifier".into(),
            model_version: "1.0".into(),
            model_dir: dir.to_path_buf(),
            manifest: Arc::new(manifest),
            batch_size: 4,
            startup_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(10),
            metrics: Arc::new(oxserve::metrics::Metrics::for_tests()),
            settings: Arc::new(config),
        }),
    }
}

async fn backend_for(dir: &Path) -> Box<dyn Backend> {
    let unpacked = archive::open(dir, &Default::default()).expect("example folder opens");
    assert!(is_onnx(&unpacked.manifest));
    let loader = OnnxLoader::new(&unpacked.dir, &unpacked.manifest).expect("model loads");
    assert_eq!(loader.runtime(), "onnx");
    loader
        .load(&spec(&unpacked.dir, unpacked.manifest.clone()))
        .await
        .expect("backend")
}

fn request(id: usize, body: &str) -> InferRequest {
    InferRequest {
        id: format!("req-{id}"),
        headers: vec![("content-type".into(), "application/json".into())],
        params: vec![Param {
            name: "body".into(),
            content_type: "application/json".into(),
            value: body.to_string().into_bytes().into(),
        }],
    }
}

async fn infer(backend: &mut Box<dyn Backend>, bodies: &[&str]) -> Vec<InferResponse> {
    let batch: Vec<InferRequest> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| request(i, b))
        .collect();
    let replies = backend.infer(&batch, &NoStream).await.expect("batch runs");
    assert_eq!(replies.len(), bodies.len());
    replies
}

fn json_of(reply: &InferResponse) -> Value {
    assert_eq!(reply.content_type, "application/json");
    serde_json::from_slice(&reply.body).expect("reply is JSON")
}

/// The error message of a 400 reply.
fn bad_request(reply: &InferResponse) -> String {
    let body = json_of(reply);
    assert_eq!(reply.status, 400, "{body}");
    assert_eq!(body["code"], 400);
    assert_eq!(body["type"], "BadRequestException");
    body["message"].as_str().expect("message").to_string()
}

fn assert_close(got: &Value, want: &Value) {
    match (got, want) {
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{got} vs {want}");
            g.iter().zip(w).for_each(|(g, w)| assert_close(g, w));
        }
        _ => {
            let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }
}

fn read_json(name: &str) -> String {
    std::fs::read_to_string(example_dir().join(name)).expect(name)
}

#[tokio::test]
async fn known_input_gives_known_output() {
    let mut backend = backend_for(&example_dir()).await;
    let replies = infer(&mut backend, &[&read_json("sample_input.json")]).await;
    assert_eq!(replies[0].status, 200);
    let got = json_of(&replies[0]);
    let want: Value = serde_json::from_str(&read_json("expected_output.json")).unwrap();
    let out = &got["outputs"]["probabilities"];
    assert_eq!(out["dtype"], "float32");
    assert_eq!(out["shape"], json!([2, 3]));
    assert_eq!(want["outputs"]["probabilities"]["shape"], json!([2, 3]));
    assert_close(&out["data"], &want["outputs"]["probabilities"]["data"]);
    // The numbers recorded in make_model.py, independently of the generated JSON file.
    assert_close(
        &out["data"],
        &json!([
            [0.0595785, 0.0539089, 0.8865126],
            [0.3402977, 0.0396393, 0.6200630]
        ]),
    );
    assert_eq!(got.as_object().unwrap().len(), 1, "{got}");
}

#[tokio::test]
async fn single_input_shorthands_and_integral_numbers() {
    let mut backend = backend_for(&example_dir()).await;
    let replies = infer(
        &mut backend,
        &[
            "[[1, 2, 3, 4]]",
            r#"{"data": [[1.0, 2.0, 3.0, 4.0]]}"#,
            r#"{"inputs": {"input": [[1, 2, 3, 4]]}}"#,
        ],
    )
    .await;
    let want = json!([[0.0595785, 0.0539089, 0.8865126]]);
    for reply in &replies {
        assert_eq!(reply.status, 200);
        let out = &json_of(reply)["outputs"]["probabilities"];
        assert_eq!(out["shape"], json!([1, 3]));
        assert_close(&out["data"], &want);
    }
}

#[tokio::test]
async fn a_malformed_request_fails_alone() {
    let mut backend = backend_for(&example_dir()).await;
    let replies = infer(
        &mut backend,
        &[
            "[[1, 2, 3, 4]]",
            "{not json",
            r#"{"data": [[0.5, -1, 0, 2], [1, 2, 3, 4], [0, 0, 0, 0]]}"#,
            "[[1, 2, 3, 4], [1, 2]]",
        ],
    )
    .await;
    assert_eq!(replies[0].status, 200);
    let message = bad_request(&replies[1]);
    assert!(message.contains("not valid JSON"), "{message}");
    assert_eq!(replies[2].status, 200);
    let out = &json_of(&replies[2])["outputs"]["probabilities"];
    assert_eq!(out["shape"], json!([3, 3]));
    assert_close(&out["data"][0], &json!([0.3402977, 0.0396393, 0.6200630]));
    // All-zero input: softmax of the bias alone.
    let bias = [0.1f64, 0.0, -0.1].map(f64::exp);
    let sum: f64 = bias.iter().sum();
    assert_close(&out["data"][2], &json!(bias.map(|b| b / sum)));
    let message = bad_request(&replies[3]);
    assert!(message.contains("ragged"), "{message}");
}

#[tokio::test]
async fn wrong_shapes_name_expected_and_given() {
    let mut backend = backend_for(&example_dir()).await;
    let replies = infer(
        &mut backend,
        &["[[1, 2, 3]]", "[1, 2, 3, 4]", r#"{"data": 5}"#],
    )
    .await;
    let message = bad_request(&replies[0]);
    assert!(
        message.contains("expected shape [N, 4], got shape [1, 3]"),
        "{message}"
    );
    let message = bad_request(&replies[1]);
    assert!(
        message.contains("expected shape [N, 4] (rank 2), got shape [4] (rank 1)"),
        "{message}"
    );
    let message = bad_request(&replies[2]);
    assert!(message.contains("got shape [] (rank 0)"), "{message}");
}

#[tokio::test]
async fn non_numbers_are_refused() {
    let mut backend = backend_for(&example_dir()).await;
    let replies = infer(
        &mut backend,
        &[
            r#"[[1, 2, "three", 4]]"#,
            r#"[[1, 2, null, 4]]"#,
            r#""hello""#,
        ],
    )
    .await;
    let message = bad_request(&replies[0]);
    assert!(
        message.contains(
            r#"input "input" (float32): element at [0, 2] is "three", expected a number"#
        ),
        "{message}"
    );
    let message = bad_request(&replies[1]);
    assert!(message.contains("is null, expected a number"), "{message}");
    let message = bad_request(&replies[2]);
    assert!(message.contains("rank 0"), "{message}");
}

#[tokio::test]
async fn input_names_are_checked() {
    let mut backend = backend_for(&example_dir()).await;
    let replies = infer(
        &mut backend,
        &[
            r#"{"inputs": {}}"#,
            r#"{"inputs": {"x": [[1, 2, 3, 4]]}}"#,
            r#"{"inputs": [[1, 2, 3, 4]]}"#,
            r#"{"text": "hi"}"#,
            "",
        ],
    )
    .await;
    let message = bad_request(&replies[0]);
    assert!(
        message.contains(r#"missing input "input"; the model's inputs are "input""#),
        "{message}"
    );
    let message = bad_request(&replies[1]);
    assert!(message.contains(r#"unknown input "x""#), "{message}");
    let message = bad_request(&replies[2]);
    assert!(
        message.contains("\"inputs\" must be an object"),
        "{message}"
    );
    let message = bad_request(&replies[3]);
    assert!(message.contains(r#"needs an "inputs" field"#), "{message}");
    let message = bad_request(&replies[4]);
    assert!(message.contains("empty request"), "{message}");
}

#[tokio::test]
async fn a_mar_archive_serves_the_same_model() {
    let temp = tempfile::tempdir().unwrap();
    let mar = temp.path().join("tiny_classifier.mar");
    {
        let file = std::fs::File::create(&mar).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        for name in ["MAR-INF/MANIFEST.json", "model.onnx"] {
            zip.start_file(name, zip::write::SimpleFileOptions::default())
                .unwrap();
            let bytes = std::fs::read(example_dir().join(name)).unwrap();
            std::io::Write::write_all(&mut zip, &bytes).unwrap();
        }
        zip.finish().unwrap();
    }
    let unpacked = archive::open(&mar, &Default::default()).expect("archive opens");
    assert_eq!(unpacked.manifest.model.model_name, "tiny_classifier");
    let mut backend = backend_for(&unpacked.dir).await;
    let replies = infer(&mut backend, &["[[1, 2, 3, 4]]"]).await;
    assert_eq!(replies[0].status, 200);
    assert_close(
        &json_of(&replies[0])["outputs"]["probabilities"]["data"],
        &json!([[0.0595785, 0.0539089, 0.8865126]]),
    );
}

#[test]
fn bad_model_files_are_refused_at_load() {
    let temp = tempfile::tempdir().unwrap();
    let mut manifest = archive::Manifest::default();
    manifest.model.serialized_file = Some("model.onnx".into());
    let err = OnnxLoader::new(temp.path(), &manifest)
        .err()
        .expect("no file")
        .to_string();
    assert!(err.contains("not found"), "{err}");
    std::fs::write(temp.path().join("model.onnx"), b"not a protobuf").unwrap();
    let err = OnnxLoader::new(temp.path(), &manifest)
        .err()
        .expect("garbage")
        .to_string();
    assert!(err.contains("cannot load ONNX model"), "{err}");
    manifest.model.serialized_file = Some("../model.onnx".into());
    let err = OnnxLoader::new(temp.path(), &manifest)
        .err()
        .expect("escape")
        .to_string();
    assert!(err.contains("inside the model folder"), "{err}");
}

#[test]
fn the_signature_shows_names_types_and_dims() {
    let dir = example_dir();
    let unpacked = archive::open(&dir, &Default::default()).unwrap();
    let loader = OnnxLoader::new(&unpacked.dir, &unpacked.manifest).unwrap();
    assert_eq!(
        loader.signature(),
        "input: float32 [N,4] -> probabilities: float32 [N,3]"
    );
    assert_eq!(loader.file(), dir.join("model.onnx"));
}
