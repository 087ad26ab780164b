//! Hostile metric state against the real binary and a real Python worker: a re-registration that
//! must not touch the live version's gauges, and a handler that prints a new label value per
//! request and every kind of invalid `[METRICS]` line. The registry must stay bounded and valid
//! (promtool parses it), every drop must be counted, each problem logged once per metric name, and
//! the other models keep exact metrics.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{demo_manifest, write_mar, Server};
use reqwest::Method;

/// Per request: one series with a fresh label value, five invalid lines whose bad part changes
/// with every request, and one valid auto-detected histogram.
const NOISY: &str = r#"
n = 0

def handle(data, context):
    global n
    if data is None:
        return None
    for _ in data:
        n += 1
        lines = [
            f"Uniq.Count:1|#ModelName:noisy,Req:r{n}|#type:COUNTER|#hostname:x,1",
            f"Dup.Count:1|#a:{n},a:2|#type:COUNTER|#hostname:x,1",
            f"Le.ms:{n}|#le:{n}|#type:HISTOGRAM|#hostname:x,1",
            f"Nm.Count:1|#__name__:v{n}|#type:GAUGE|#hostname:x,1",
            f"Help.Co\\un{n}t:1|#|#type:GAUGE|#hostname:x,1",
            f"Lat.ms:{n}|#ModelName:noisy|#type:HISTOGRAM|#hostname:x,1",
            f"Lat_count.ms:{n}|#ModelName:noisy|#type:GAUGE|#hostname:x,1",
        ]
        for line in lines:
            print("[METRICS]" + line, flush=True)
    return ["ok" for _ in data]
"#;

fn model_folder(store: &Path, name: &str, code: &str) {
    let handler = format!("{name}.py");
    common::model_folder(store, name, &handler, None, &[(&handler, code)]);
}

/// Waits until the sample `prefix` has value `want` (metric lines are read from the worker's
/// stdout after its reply), then returns the scrape.
async fn wait_for(s: &Server, prefix: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = s.scrape().await;
        if common::sample(&text, prefix) == Some(want) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_metrics_stay_bounded_valid_and_counted() {
    let store = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model_folder(store.path(), "noisy", NOISY);
    write_mar(store.path(), "demo.mar", &demo_manifest("demo", "1.0"), &[]);
    let s = Server::start_store_with_env(
        "default_workers_per_model=1\nmodel_metrics_auto_detect=true\nmodel_metrics_max_series=5",
        store.path(),
        "noisy,demo.mar",
        &[],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    const N: usize = 8;
    for _ in 0..N {
        assert_eq!(s.predict("noisy", "x").await.status(), 200);
        assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    }
    let malformed = "oxserve_backend_metric_lines_dropped_total{reason=\"malformed\"}";
    let cardinality = "oxserve_backend_metric_lines_dropped_total{reason=\"cardinality\"}";
    wait_for(&s, malformed, (5 * N) as f64).await;
    let text = wait_for(&s, cardinality, (N - 5) as f64).await;
    assert_eq!(
        common::sample(&text, malformed),
        Some((5 * N) as f64),
        "{text}"
    );
    assert_eq!(
        common::sample(&text, cardinality),
        Some((N - 5) as f64),
        "{text}"
    );
    // Five series of Uniq, the first five label values, and nothing of the refused lines.
    let uniq: Vec<&str> = text.lines().filter(|l| l.starts_with("Uniq{")).collect();
    assert_eq!(uniq.len(), 5, "{text}");
    for i in 1..=5 {
        assert!(
            uniq.iter().any(|l| l.contains(&format!("Req=\"r{i}\""))),
            "{text}"
        );
    }
    for refused in ["Dup", "Le", "Nm", "Help"] {
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with(&format!("{refused}{{"))
                    || l.starts_with(&format!("{refused} "))),
            "{refused}: {text}"
        );
    }
    // Lat is a histogram; the gauge Lat_count that would clash with its samples was refused.
    assert!(text.contains("# TYPE Lat histogram\n"), "{text}");
    assert!(!text.contains("# TYPE Lat_count"), "{text}");
    assert!(
        text.contains("Lat_count{ModelName=\"noisy\",Hostname=\""),
        "{text}"
    );
    common::promtool_parses(&text);
    // Each problem is logged once per metric name, however many bad values it came with.
    let log = s.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("dropped a malformed backend metric line"))
        .collect();
    assert_eq!(warnings.len(), 5, "{}", warnings.join("\n"));
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("dropped backend metric Uniq"))
            .count(),
        1,
        "{log}"
    );
    // The demo model's numbers are exact.
    assert_eq!(
        common::sample(&text, "oxserve_model_responses_total{model_name=\"demo\",model_version=\"1.0\",status_class=\"2xx\"}"),
        Some(N as f64)
    );
    assert_eq!(
        common::sample(&text, "oxserve_model_responses_total{model_name=\"noisy\",model_version=\"1.0\",status_class=\"2xx\"}"),
        Some(N as f64)
    );
    // The Python runtime, the worker's socket folder and the unpacked demo archive are private.
    for prefix in ["oxserve-python-", "oxs-", "oxserve-model-"] {
        let found: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .collect();
        assert!(
            !found.is_empty(),
            "no {prefix} folder in {}",
            tmp.path().display()
        );
        for e in found {
            assert_eq!(mode_of(&e.path()), 0o700, "{}", e.path().display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_registration_leaves_the_live_version_alone() {
    let store = tempfile::tempdir().unwrap();
    write_mar(store.path(), "demo.mar", &demo_manifest("demo", "1.0"), &[]);
    write_mar(
        store.path(),
        "again.mar",
        &demo_manifest("demo", "1.0"),
        &[],
    );
    let s = Server::start_store(
        "default_workers_per_model=2",
        store.path(),
        "demo.mar",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    let ready = "oxserve_workers{model_name=\"demo\",model_version=\"1.0\",state=\"ready\"}";
    let busy = "oxserve_workers{model_name=\"demo\",model_version=\"1.0\",state=\"busy\"}";
    assert_eq!(s.sample(ready).await, Some(2.0));
    for url in ["again.mar", "demo.mar"] {
        let (code, e) = s
            .mgmt(
                Method::POST,
                &format!("/models?url={url}&initial_workers=3"),
            )
            .await;
        assert_eq!(code, 409, "{e}");
        assert_eq!(e["type"], "ConflictStatusException", "{e}");
        assert_eq!(s.sample(ready).await, Some(2.0), "{}", s.scrape().await);
    }
    // Load after the conflict: the gauges move with the workers and settle where they were.
    let client = s.client.clone();
    let url = format!("{}/predictions/demo", s.inference);
    let codes = common::concurrently(12, move |_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(r#"{"text": "good", "sleep_ms": 20}"#)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    })
    .await;
    assert!(codes.iter().all(|&c| c == 200), "{codes:?}");
    let text = wait_for(&s, ready, 2.0).await;
    assert_eq!(common::sample(&text, ready), Some(2.0), "{text}");
    assert_eq!(common::sample(&text, busy), Some(0.0), "{text}");
    assert_eq!(
        common::sample(&text, "oxserve_model_responses_total{model_name=\"demo\",model_version=\"1.0\",status_class=\"2xx\"}"),
        Some(12.0),
        "{text}"
    );
    let (_, d) = s.mgmt(Method::GET, "/models/demo").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 2, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_countless_headers_fails_its_batch_only() {
    let store = tempfile::tempdir().unwrap();
    model_folder(
        store.path(),
        "headers",
        "def handle(data, context):\n    if data is None:\n        return None\n    for i in range(2000):\n        context.set_response_header(0, f'h{i}', 'v')\n    return ['ok' for _ in data]\n",
    );
    write_mar(store.path(), "demo.mar", &demo_manifest("demo", "1.0"), &[]);
    let s = Server::start_store(
        "default_workers_per_model=1",
        store.path(),
        "headers,demo.mar",
        &[],
    );
    s.wait_healthy().await;
    let r = s.predict("headers", "x").await;
    let code = r.status().as_u16();
    let e: serde_json::Value = r.json().await.unwrap();
    assert!((500..600).contains(&code), "{code}: {e}");
    assert_eq!(e["code"], code, "{e}");
    assert!(e["type"].as_str().unwrap().ends_with("Exception"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.log().contains("header count 2000") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(s.log().contains("header count 2000"), "{}", s.log());
    for _ in 0..3 {
        assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    }
    assert_eq!(
        s.sample("oxserve_model_responses_total{model_name=\"demo\",model_version=\"1.0\",status_class=\"2xx\"}")
            .await,
        Some(3.0)
    );
    assert_eq!(
        s.sample("oxserve_model_responses_total{model_name=\"headers\",model_version=\"1.0\",status_class=\"5xx\"}")
            .await,
        Some(1.0)
    );
}
