//! Hostile requests against the real binary: bodies and query strings built to exhaust memory or
//! slip past the parsers. Each must get a clear error in TorchServe's JSON shape, and the server
//! must go on serving every model with exact metrics.

mod common;

use common::{demo_manifest, write_mar, Server};
use serde_json::Value;

/// A model store holding the example ONNX model (as folder `onnx`) and a demo archive `dm.mar`.
fn store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/onnx");
    std::os::unix::fs::symlink(examples, store.path().join("onnx")).unwrap();
    write_mar(store.path(), "dm.mar", &demo_manifest("dm", "1.0"), &[]);
    store
}

/// `[[[[[0, 0, ...], 0, ...], ...]]]`: every first element is an array of `width` elements, the
/// others are numbers. The first elements claim a `width^depth` tensor in a few KB of JSON.
fn claimed_huge_tensor(depth: usize, width: usize) -> String {
    let mut inner = format!("[{}]", vec!["0"; width].join(","));
    for _ in 1..depth {
        inner = format!("[{inner},{}]", vec!["0"; width - 1].join(","));
    }
    inner
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tensor_claiming_a_petabyte_is_a_400_and_the_server_lives_on() {
    let store = store();
    let s = Server::start_store(
        "default_workers_per_model=1",
        store.path(),
        "tiny_classifier=onnx,dm.mar",
        &[],
    );
    s.wait_healthy().await;
    let body = claimed_huge_tensor(5, 1000);
    assert!(body.len() < 12_000, "{} bytes", body.len());
    for wrapped in [
        body.clone(),
        format!("{{\"data\": {body}}}"),
        format!("{{\"inputs\": {{\"input\": {body}}}}}"),
    ] {
        let (code, e) = error_of(s.predict("tiny_classifier", &wrapped).await).await;
        assert_eq!(code, 400, "{e}");
        assert_eq!(e["code"], 400, "{e}");
        assert_eq!(e["type"], "BadRequestException", "{e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("ragged array"), "{message}");
    }
    // A regular but wrongly shaped tensor is refused by its shape, not by the allocator.
    let (code, e) = error_of(
        s.predict("tiny_classifier", &claimed_huge_tensor(1, 1000))
            .await,
    )
    .await;
    assert_eq!(code, 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("rank"), "{e}");

    // The server is alive, and both models answer and are counted exactly.
    let input = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/onnx/sample_input.json"
    ))
    .unwrap();
    for _ in 0..3 {
        assert_eq!(s.predict("tiny_classifier", &input).await.status(), 200);
        assert_eq!(s.predict("dm", r#"{"text": "good"}"#).await.status(), 200);
    }
    let text = s.scrape().await;
    let responses = |model: &str, class: &str| {
        common::sample(
            &text,
            &format!("oxserve_model_responses_total{{model_name=\"{model}\",model_version=\"1.0\",status_class=\"{class}\"}}"),
        )
    };
    assert_eq!(responses("tiny_classifier", "2xx"), Some(3.0), "{text}");
    assert_eq!(responses("tiny_classifier", "4xx"), Some(4.0), "{text}");
    assert_eq!(responses("dm", "2xx"), Some(3.0), "{text}");
    assert_eq!(responses("dm", "4xx"), Some(0.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_query_strings_are_400s() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    // `%+1` once passed as a byte because from_str_radix accepts a sign.
    for url in [
        format!("{}/metrics?name[]=%+1", s.metrics_url()),
        format!("{}/metrics?name[]=%-1", s.metrics_url()),
        format!("{}/models?limit=%+5", s.management),
        format!("{}/models?limit=99999999999", s.management),
    ] {
        let (code, e) = s.get_json(url.clone()).await;
        assert_eq!(code, 400, "{url}: {e}");
        assert_eq!(e["type"], "BadRequestException", "{url}: {e}");
    }
    assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    assert_eq!(
        s.sample("oxserve_model_responses_total{model_name=\"demo\",model_version=\"1.0\",status_class=\"2xx\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_countless_tiny_fields_is_a_400() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    let url = format!("{}/predictions/demo", s.inference);
    // 2 MB of "a&a&...": a million fields in memory once parsed, were they not refused.
    let form = "a&".repeat(1_000_000);
    let mut multipart = String::new();
    for i in 0..1100 {
        multipart.push_str(&format!(
            "--XX\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n"
        ));
    }
    multipart.push_str("--XX--\r\n");
    let query = format!("{url}?{}", "q=1&".repeat(1100));
    for (target, content_type, body) in [
        (url.clone(), "application/x-www-form-urlencoded", form),
        (url.clone(), "multipart/form-data; boundary=XX", multipart),
        (query, "application/json", r#"{"text": "good"}"#.to_string()),
    ] {
        let r = s
            .client
            .post(&target)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let (code, e) = error_of(r).await;
        assert_eq!(code, 400, "{content_type}: {e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("too many parameters"),
            "{content_type}: {e}"
        );
    }
    // 1024 fields are fine.
    let r = s
        .client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("text=good{}", "&a=1".repeat(1023)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    let text = s.scrape().await;
    let demo = |class: &str| {
        common::sample(
            &text,
            &format!("oxserve_model_responses_total{{model_name=\"demo\",model_version=\"1.0\",status_class=\"{class}\"}}"),
        )
    };
    assert_eq!(demo("2xx"), Some(2.0), "{text}");
    assert_eq!(
        common::sample(&text, "Requests4XX{Level=\"Host\",Hostname=\""),
        Some(3.0),
        "{text}"
    );
}
