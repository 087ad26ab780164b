//! Inference API over real HTTP against the real binary.

mod common;

use common::{concurrently, Server};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// A request to `path` on the inference listener.
fn to(s: &Server, method: Method, path: &str) -> reqwest::RequestBuilder {
    s.client.request(method, format!("{}{path}", s.inference))
}

/// A JSON prediction request to `path` on the inference listener, as [`Server::predict`] sends it.
fn json_post(s: &Server, path: &str, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
    to(s, Method::POST, path)
        .header("content-type", "application/json")
        .body(body)
}

/// Sends `req`; its status and JSON body (`Null` when the body is not JSON).
async fn reply(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Posts a JSON prediction with a client of its own (for spawned tasks); the status.
async fn post_json(client: reqwest::Client, url: String, body: String) -> u16 {
    client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_start_serves_the_demo_model() {
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    let (code, ping) = s.get_json(format!("{}/ping", s.inference)).await;
    assert_eq!((code, ping["status"].as_str()), (200, Some("Healthy")));

    let r = s
        .predict("demo", r#"{"text": "I love this great server"}"#)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["label"], "positive");

    let (code, v) = reply(
        to(&s, Method::POST, "/predictions/demo/1.0")
            .header("content-type", "text/plain")
            .body("terrible and slow"),
    )
    .await;
    assert_eq!((code, v["label"].as_str()), (200, Some("negative")));

    // The backend's own 400 for a bad payload reaches the client in TorchServe's shape.
    let (code, v) = reply(json_post(&s, "/predictions/demo", r#"{"nope": 1}"#)).await;
    assert_eq!(code, 400);
    assert_eq!(v["code"], 400);
    assert!(v["message"].as_str().unwrap().contains("text"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_torchserve_shape_and_codes() {
    let s = Server::start("max_request_size=100", &[]);
    s.wait_healthy().await;

    let r = s.predict("nope", "{}").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["connection"], "close");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "ModelNotFoundException");
    assert_eq!(v["message"], "Model not found: nope");

    let (code, v) = reply(to(&s, Method::POST, "/predictions/demo/9.9").body("x")).await;
    assert_eq!(code, 404);
    assert_eq!(v["type"], "ModelVersionNotFoundException");

    let big = "x".repeat(101);
    let (code, v) = reply(json_post(&s, "/predictions/demo", big)).await;
    assert_eq!((code, &v["code"]), (507, &Value::from(507)));
    assert!(v["message"].as_str().unwrap().contains("max_request_size"));

    assert_eq!(reply(to(&s, Method::GET, "/no/such/path")).await.0, 404);

    // A path that is not UTF-8 once decoded: 400 in the JSON shape, never a panic.
    let (code, v) = reply(to(&s, Method::POST, "/predictions/demo/%FF%FE")).await;
    assert_eq!(code, 400);
    assert_eq!(v["type"], "BadRequestException");

    let (code, _) = reply(to(&s, Method::DELETE, "/predictions/demo")).await;
    assert_eq!(code, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_describes_itself_with_openapi() {
    let s = Server::start("", &[]);
    for base in [&s.inference, &s.management, &s.metrics_url()] {
        let r = s
            .client
            .request(reqwest::Method::OPTIONS, format!("{base}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["openapi"], "3.0.1");
        let (code, doc) = s.get_json(format!("{base}/api-description")).await;
        assert_eq!(code, 200);
        assert!(doc["paths"].as_object().unwrap().len() >= 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_form_one_batch() {
    let s = Server::start(
        "default_workers_per_model=1\nbatch_size=4\nmax_batch_delay=3000",
        &[],
    );
    s.wait_healthy().await;
    let url = format!("{}/predictions/demo", s.inference);
    let client = s.client.clone();
    let statuses = concurrently(4, |i| {
        post_json(
            client.clone(),
            url.clone(),
            format!(r#"{{"text": "good {i}"}}"#),
        )
    })
    .await;
    assert_eq!(statuses, vec![200; 4]);
    let text = s.scrape().await;
    let p = r#"{model_name="demo",model_version="1.0"}"#;
    assert_eq!(
        common::sample(&text, &format!("oxserve_batch_size_count{p}")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        common::sample(&text, &format!("oxserve_batch_size_sum{p}")),
        Some(4.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_sent_when_max_batch_delay_passes() {
    let s = Server::start(
        "default_workers_per_model=1\nbatch_size=8\nmax_batch_delay=200",
        &[],
    );
    s.wait_healthy().await;
    let r = s.predict("demo", r#""fine""#).await;
    assert_eq!(r.status(), 200);
    let text = s.scrape().await;
    let p = r#"{model_name="demo",model_version="1.0"}"#;
    assert_eq!(
        common::sample(&text, &format!("oxserve_batch_size_sum{p}")),
        Some(1.0)
    );
    // The request waited for the batching delay: its queue wait is counted.
    let wait = common::sample(&text, &format!("oxserve_queue_wait_seconds_sum{p}")).unwrap();
    assert!(wait >= 0.19, "queue wait {wait}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_and_is_counted() {
    let s = Server::start("default_workers_per_model=1\njob_queue_size=2", &[]);
    s.wait_healthy().await;
    let url = format!("{}/predictions/demo", s.inference);
    let slow = || {
        let body = r#"{"text": "ok", "sleep_ms": 3000}"#.to_string();
        tokio::spawn(post_json(s.client.clone(), url.clone(), body))
    };
    let first = slow();
    s.wait_sample(
        r#"oxserve_workers{model_name="demo",model_version="1.0",state="busy"}"#,
        |busy| busy == 1.0,
    )
    .await;
    let queued: Vec<_> = (0..2).map(|_| slow()).collect();
    s.wait_sample(
        r#"oxserve_queue_depth{model_name="demo",model_version="1.0"}"#,
        |depth| depth == 2.0,
    )
    .await;
    let (code, v) = reply(json_post(&s, "/predictions/demo", r#""x""#)).await;
    assert_eq!(code, 503);
    assert_eq!(
        v["message"],
        "Model \"demo\" has no worker to serve inference request. Please use scale workers API to add workers."
    );
    assert_eq!(first.await.unwrap(), 200);
    for q in queued {
        assert_eq!(q.await.unwrap(), 200);
    }
    let text = s.scrape().await;
    // 3 served + 1 refused: TorchServe counts the 503 too.
    assert_eq!(
        common::sample(
            &text,
            r#"ts_inference_requests_total{model_name="demo",model_version="default","#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        common::sample(
            &text,
            r#"oxserve_model_responses_total{model_name="demo",model_version="1.0",status_class="5xx"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_answers_500_and_worker_recovers() {
    let s = Server::start(
        "default_workers_per_model=1\ndefault_response_timeout=1",
        &[],
    );
    s.wait_healthy().await;
    let (code, v) = reply(json_post(
        &s,
        "/predictions/demo",
        r#"{"text": "x", "sleep_ms": 5000}"#,
    ))
    .await;
    // TorchServe's answer (test_auto_recover): 500, the worker is killed and restarted.
    assert_eq!(code, 500);
    assert_eq!(v["code"], 500);
    assert_eq!(v["type"], "InternalServerException");
    assert!(
        v["message"].as_str().unwrap().contains("response timeout"),
        "{v}"
    );
    // The worker is restarted and serves again.
    let mut ok = false;
    for _ in 0..100 {
        if s.predict("demo", r#""good""#).await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "worker did not recover: {}", s.log());
    // The recovery is told in TorchServe's words, which its tests and operators grep. The lines
    // are written as the supervisor handles the events, which may be just after the reply: wait.
    let lines = [
        "Number or consecutive unsuccessful inference 1",
        "Backend worker error: Backend worker did not respond in given time",
        "Worker disconnected",
        "Auto recovery start timestamp: ",
        "Retry worker: W-",
        "Auto recovery succeeded, reset recoveryStartTS",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = s.log();
        if lines.iter().all(|l| log.contains(l)) || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for line in lines {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }
    assert!(!log.contains("Auto recovery failed again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_query_and_form_fields_reach_the_backend() {
    // The demo backend answers from parameter `body`, else the first parameter: a form field or a
    // query pair is a parameter of its own, as in TorchServe.
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    let form = to(&s, Method::POST, "/predictions/demo").form(&[("data", "I love it")]);
    let (code, v) = reply(form).await;
    assert_eq!((code, v["label"].as_str()), (200, Some("positive")));
    let (code, v) = reply(to(
        &s,
        Method::GET,
        "/predictions/demo?text=awful%20and%20bad",
    ))
    .await;
    assert_eq!((code, v["label"].as_str()), (200, Some("negative")));
    let (code, _) = reply(to(&s, Method::POST, "/predictions/demo?x=%zz")).await;
    assert_eq!(code, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_model_is_served_over_http() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let s = Server::start(
        "default_workers_per_model=1",
        &[
            "--model-store",
            examples,
            "--models",
            "tiny_classifier=onnx",
        ],
    );
    s.wait_healthy().await;
    let input = std::fs::read_to_string(format!("{examples}/onnx/sample_input.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{examples}/onnx/expected_output.json")).unwrap(),
    )
    .unwrap();
    let (code, v) = reply(json_post(&s, "/predictions/tiny_classifier", input)).await;
    assert_eq!(code, 200);
    let got = v["outputs"]["probabilities"]["data"].as_array().unwrap();
    let want = expected["outputs"]["probabilities"]["data"]
        .as_array()
        .or_else(|| expected["probabilities"].as_array())
        .or_else(|| expected.as_array())
        .expect("expected output layout");
    for (g, w) in got
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .zip(want.iter().flat_map(|r| r.as_array().unwrap()))
    {
        assert!(
            (g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-5,
            "{v} vs {expected}"
        );
    }
    let (_, d) = s
        .mgmt(reqwest::Method::GET, "/models/tiny_classifier")
        .await;
    assert_eq!(d[0]["runtime"], "onnx");
    // A shape error is the client's: 400 with the reason.
    let (code, e) = reply(json_post(
        &s,
        "/predictions/tiny_classifier",
        r#"{"inputs": {"input": [[1, 2, 3]]}}"#,
    ))
    .await;
    assert_eq!(code, 400);
    assert!(e["message"].as_str().unwrap().contains('4'), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explanations_reach_the_backend_with_the_explain_header() {
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    let (code, v) = reply(json_post(
        &s,
        "/explanations/demo",
        r#"{"text": "great but slow"}"#,
    ))
    .await;
    assert_eq!(code, 200);
    assert_eq!(v["explanation"]["great"], 1);
    assert_eq!(v["explanation"]["slow"], -1);
    let (_, v) = reply(json_post(&s, "/predictions/demo", r#"{"text": "great"}"#)).await;
    assert!(v.get("explanation").is_none(), "{v}");
}
