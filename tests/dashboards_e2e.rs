//! Every PromQL expression of every shipped dashboard panel and alert rule, run through a real
//! Prometheus that scrapes a real oxserve with the shipped prometheus.yml.
//!
//! deploy/tools/promql_check.py runs every panel, variable and recording rule (they must return
//! data) and every alert (it must run). This test adds what needs a PromQL parser: that each
//! alert can fire at all. It takes the threshold off each alert expression (`promql-parser`'s
//! AST) and requires the rest to return data, so that a typo in a metric or label name cannot
//! leave an alert that never fires.

mod common;

use common::prometheus::{value, Prometheus};
use common::Server;
use promql_parser::parser::{self, Expr};
use std::time::Duration;

/// The expressions whose non-emptiness shows that an alert expression can fire: outer
/// parentheses dropped; for `A and B` / `A unless B` only A (the condition; B is a guard); for a
/// comparison (`A > 0.8`, any of == != > < >= <=, with `bool` or on/ignoring/group_* modifiers)
/// the side that is not a number, or both sides when both are expressions (`A < B`). A top-level
/// `or`, or an expression without a comparison at the top, is checked as it is.
fn data_expressions(expr: &Expr) -> Vec<Expr> {
    match expr {
        Expr::Paren(p) => data_expressions(&p.expr),
        Expr::Binary(b) if b.op.to_string() == "or" => vec![expr.clone()],
        Expr::Binary(b) if b.op.is_set_operator() => data_expressions(&b.lhs),
        Expr::Binary(b) if b.op.is_comparison_operator() => {
            let sides: Vec<Expr> = [&b.lhs, &b.rhs]
                .into_iter()
                .map(|side| unparen(side))
                .filter(|side| !matches!(side, Expr::NumberLiteral(_)))
                .collect();
            if sides.is_empty() {
                vec![expr.clone()]
            } else {
                sides
            }
        }
        _ => vec![expr.clone()],
    }
}

fn unparen(expr: &Expr) -> Expr {
    match expr {
        Expr::Paren(p) => unparen(&p.expr),
        other => other.clone(),
    }
}

/// (alert name, data expression) for every alert of a rule file.
fn alert_data_checks(rules_yaml: &str) -> Vec<(String, String)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(rules_yaml).unwrap();
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            let expr = rule["expr"].as_str().expect("expr");
            let parsed =
                parser::parse(expr).unwrap_or_else(|e| panic!("alert {alert}: {e}\n{expr}"));
            for data in data_expressions(&parsed) {
                out.push((alert.to_string(), data.to_string()));
            }
        }
    }
    out
}

#[test]
fn thresholds_come_off_alert_expressions() {
    let rules = r#"
groups:
  - name: g
    rules:
      - record: r
        expr: sum(x)
      - alert: Ratio
        expr: |
          (sum(rate(a[5m])) / sum(rate(b[5m]))) > 0.05 and sum(rate(b[5m])) > 1
      - alert: Both
        expr: sum by (m) (q) > bool on (m) group_left sum by (m) (c)
      - alert: Either
        expr: up == 0 or absent(up)
      - alert: Plain
        expr: absent(up)
      - alert: Flipped
        expr: 2 < (histogram_quantile(0.99, rate(h_bucket[5m])))
"#;
    let got = alert_data_checks(rules);
    let want = [
        ("Ratio", "sum(rate(a[5m])) / sum(rate(b[5m]))"),
        ("Both", "sum by (m) (q)"),
        ("Both", "sum by (m) (c)"),
        ("Either", "up == 0 or absent(up)"),
        ("Plain", "absent(up)"),
        ("Flipped", "histogram_quantile(0.99, rate(h_bucket[5m]))"),
    ];
    let got: Vec<(&str, &str)> = got.iter().map(|(a, e)| (a.as_str(), e.as_str())).collect();
    assert_eq!(got, want);
}

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
    let s = Server::start_store(
        "metric_time_interval=1\ndefault_workers_per_model=1\njob_queue_size=1",
        store.path(),
        "",
        &["--enable-model-api"],
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
    let prom = Prometheus::start(&config, &[("rules/oxserve-alerts.yml", rules.clone())]);
    let c = reqwest::Client::new();
    prom.wait_for(&c, "up{job=\"oxserve\"}", Duration::from_secs(60), |r| {
        r.first().map(value) == Some(1.0)
    })
    .await;

    // Known traffic with errors, kept flowing while the queries run (bounded: at most 180 s).
    let (client, inference) = (s.client.clone(), s.inference.clone());
    let traffic = tokio::spawn(async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
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
            // A stream whose client goes away after its first chunk: a cancelled request.
            if let Ok(mut r) = client
                .post(format!("{inference}/v1/completions"))
                .header("content-type", "application/json")
                .body(
                    r#"{"model": "llm", "prompt": "a b c d e f", "stream": true, "delay_ms": 100}"#,
                )
                .send()
                .await
            {
                let _ = r.chunk().await;
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

    // Each alert can fire: its expression without the threshold returns data (GPU families have
    // none on a machine without an NVIDIA GPU).
    let mut data_checks = 0;
    for (alert, expr) in alert_data_checks(&rules) {
        if expr.contains("GPU") {
            continue;
        }
        prom.wait_for(&c, &expr, Duration::from_secs(75), |r| !r.is_empty())
            .await;
        data_checks += 1;
        println!("alert {alert}: data OK: {expr}");
    }
    assert!(data_checks >= 5, "only {data_checks} alert data checks");

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
