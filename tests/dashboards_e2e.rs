//! Every PromQL expression of every shipped dashboard panel and alert rule, run through a real
//! Prometheus that scrapes a real oxserve with the shipped prometheus.yml.

mod common;

use common::prometheus::{value, Prometheus};
use common::Server;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data() {
    let root = env!("CARGO_MANIFEST_DIR");
    // One worker and a one-slot queue, so a burst of slow requests produces real 503s.
    // The model store holds the OpenAI fixture, registered next to the demo model so that the LLM
    // dashboard's token and stream families have data.
    let store = tempfile::tempdir().unwrap();
    common::write_mar(
        store.path(),
        "llm.mar",
        &serde_json::json!({
            "createdOn": "28/11/2026 12:00:00",
            "runtime": "python",
            "model": {"modelName": "llm", "modelVersion": "1.0", "handler": "openai_handler.py"},
            "archiverVersion": "0.12.0"
        }),
        &[(
            "openai_handler.py",
            include_bytes!("fixtures/openai_handler.py"),
        )],
    );
    let s = Server::start(
        "metric_time_interval=1\ndefault_workers_per_model=1\njob_queue_size=1",
        &[
            "--model-store",
            store.path().to_str().unwrap(),
            "--enable-model-api",
        ],
    );
    s.wait_healthy().await;
    let (code, body) = s
        .mgmt(
            reqwest::Method::POST,
            "/models?url=llm.mar&initial_workers=1&synchronous=true",
        )
        .await;
    assert_eq!(code, 200, "{body}");

    // The shipped configuration, pointed at this test's ports and scraping every second.
    let shipped =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/prometheus.yml")).unwrap();
    let target = s.metrics_url().trim_start_matches("http://").to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = shipped
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s")
        .replace("127.0.0.1:8082", &target)
        .replace("127.0.0.1:9090", &format!("127.0.0.1:{port}"));
    assert_ne!(config, shipped);
    let rules =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/rules/oxserve-alerts.yml"))
            .unwrap();
    let prom = Prometheus::start(&config, &[("rules/oxserve-alerts.yml", rules)]);
    let c = reqwest::Client::new();
    prom.wait_for(&c, "up{job=\"oxserve\"}", Duration::from_secs(60), |r| {
        r.first().map(value) == Some(1.0)
    })
    .await;

    // Known traffic with errors, kept flowing while the queries run (bounded: at most 90 s).
    let (client, inference) = (s.client.clone(), s.inference.clone());
    let traffic = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while std::time::Instant::now() < deadline {
            let post = |body: &'static str, model: &'static str| {
                client
                    .post(format!("{inference}/predictions/{model}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
            };
            let _ = post(r#"{"text": "good"}"#, "demo").await;
            // A token stream with usage: TTFT, inter-token gaps, chunks and tokens.
            if let Ok(r) = client
                .post(format!("{inference}/v1/completions"))
                .header("content-type", "application/json")
                .body(r#"{"model": "llm", "prompt": "a b c d", "stream": true, "stream_options": {"include_usage": true}}"#)
                .send()
                .await
            {
                let _ = r.bytes().await;
            }
            let _ = post("{}", "nope").await; // 404
            let _ = post(r#"{"nope": 1}"#, "demo").await; // 400 from the model
                                                          // Three slow requests at once against one worker and a one-slot queue: one 503.
            let burst: Vec<_> = (0..3)
                .map(|_| post(r#"{"text": "ok", "sleep_ms": 150}"#, "demo"))
                .collect();
            for b in burst {
                let _ = b.await;
            }
        }
    });

    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(format!("{root}/deploy/tools/promql_check.py"))
            .args([
                "--url",
                &prom.url,
                "--retry-for",
                "75",
                "--allow-empty",
                "GPU",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    traffic.abort();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // The report lists checks; there are many and none failed.
    let ok = report.lines().filter(|l| l.contains("OK")).count();
    assert!(ok >= 30, "{report}");
    println!("{report}");
}
