//! A real Prometheus scrapes a real oxserve: counts and histograms survive the trip exactly.

mod common;

use common::prometheus::{value, Prometheus};
use common::Server;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_exact_counts_and_usable_histograms() {
    let s = Server::start("metric_time_interval=1", &[]);
    s.wait_healthy().await;
    let target = s.metrics_url().trim_start_matches("http://").to_string();
    let prom = Prometheus::start(
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: oxserve\n    static_configs:\n      - targets: ['{target}']\n"
        ),
        &[],
    );
    let c = reqwest::Client::new();
    // First scrape happens before any traffic, so rate() has a baseline.
    prom.wait_for(&c, "up{job=\"oxserve\"}", Duration::from_secs(60), |r| {
        r.first().map(value) == Some(1.0)
    })
    .await;
    let sent = 25;
    for i in 0..sent {
        let r = s
            .predict("demo", &format!(r#"{{"text": "good {i}"}}"#))
            .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(s.predict("nope", "x").await.status(), 404);

    let r = prom
        .wait_for(
            &c,
            "sum(ts_inference_requests_total{model_name=\"demo\"})",
            Duration::from_secs(60),
            |r| r.first().map(value) == Some(sent as f64),
        )
        .await;
    assert_eq!(value(&r[0]), 25.0);
    let r = prom
        .wait_for(
            &c,
            "histogram_quantile(0.99, sum by (le, model_name) (rate(oxserve_request_duration_seconds_bucket[1m])))",
            Duration::from_secs(60),
            |r| r.first().map(|s| value(s).is_finite()).unwrap_or(false),
        )
        .await;
    assert_eq!(r[0]["metric"]["model_name"], "demo");
    assert!(value(&r[0]) > 0.0);
    // Counters keep their names through Prometheus (no _total suffix added).
    let r = prom.query(&c, "Requests4XX").await.unwrap();
    assert_eq!(value(&r["result"][0]), 1.0);
    let r = prom.query(&c, "CPUUtilization").await.unwrap();
    assert!(!r["result"].as_array().unwrap().is_empty());
}
