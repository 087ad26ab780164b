//! Metrics API: exposition, filtering, modes and host metrics, against the real binary.

mod common;

use common::{sample, Server};
use std::io::Read;
use std::time::Duration;

async fn traffic(s: &Server, ok: usize) {
    for _ in 0..ok {
        assert_eq!(s.predict("demo", r#""great""#).await.status(), 200);
    }
    assert_eq!(s.predict("nope", "x").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_and_names_are_torchserves() {
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    traffic(&s, 6).await;
    let r = s
        .client
        .get(format!("{}/metrics", s.metrics_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    let host = common::sample(&text, "Requests4XX{Level=\"Host\",Hostname=");
    assert_eq!(host, Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            r#"ts_inference_requests_total{model_name="demo",model_version="default","#
        ),
        Some(6.0)
    );
    assert!(
        sample(
            &text,
            r#"ts_inference_latency_microseconds{model_name="demo",model_version="default","#
        )
        .unwrap()
            > 0.0
    );
    assert!(text.contains("# HELP Requests2XX Torchserve prometheus counter metric with unit: Count\n# TYPE Requests2XX counter\n"));
    assert!(!text.contains("Requests2XX_total"));
    // Every family of TorchServe's default set is listed, with or without samples.
    for family in [
        "Requests2XX",
        "Requests4XX",
        "Requests5XX",
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
        "QueueTime",
        "WorkerThreadTime",
        "WorkerLoadTime",
        "CPUUtilization",
        "MemoryUsed",
        "MemoryAvailable",
        "MemoryUtilization",
        "DiskUsage",
        "DiskUtilization",
        "DiskAvailable",
        "GPUMemoryUtilization",
        "GPUMemoryUsed",
        "GPUUtilization",
        "HandlerTime",
        "PredictionTime",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    // Without a GPU the GPU families have HELP/TYPE and no samples.
    assert!(!text.lines().any(|l| l.starts_with("GPUUtilization{")));
    // In-process backends report TorchServe's handler timings too.
    assert!(sample(&text, "HandlerTime{ModelName=\"demo\",Level=\"Model\",").is_some());
    assert!(
        sample(
            &text,
            "WorkerLoadTime{WorkerName=\"W-9000-demo_1.0\",Level=\"Host\","
        )
        .is_some(),
        "{text}"
    );
    // oxserve's own families.
    let p = r#"{model_name="demo",model_version="1.0"}"#;
    assert_eq!(
        sample(&text, &format!("oxserve_request_duration_seconds_count{p}")),
        Some(6.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"oxserve_request_duration_seconds_bucket{model_name="demo",model_version="1.0",le="+Inf"}"#
        ),
        Some(6.0)
    );
    assert_eq!(
        sample(&text, &format!("oxserve_queue_capacity{p}")),
        Some(100.0)
    );
    assert_eq!(sample(&text, &format!("oxserve_queue_depth{p}")), Some(0.0));
    assert_eq!(
        sample(
            &text,
            r#"oxserve_model_responses_total{model_name="demo",model_version="1.0",status_class="2xx"}"#
        ),
        Some(6.0)
    );
    assert!(text.contains("oxserve_build_info{version=\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_filter_selects_families_and_samples() {
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    traffic(&s, 2).await;
    let get = |q: &'static str| {
        let c = s.client.clone();
        let url = format!("{}/metrics{q}", s.metrics_url());
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (code, text) = get("?name[]=Requests4XX&name[]=ts_inference_requests_total").await;
    assert_eq!(code, 200);
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    assert_eq!(
        families,
        ["Requests4XX counter", "ts_inference_requests_total counter"]
    );
    // A histogram by family name or by sample name.
    let (_, text) = get("?name[]=oxserve_request_duration_seconds").await;
    assert!(text.contains("_bucket{") && text.contains("_sum{") && text.contains("_count{"));
    let (_, text) = get("?name[]=oxserve_request_duration_seconds_count").await;
    assert!(text.contains("_count{") && !text.contains("_bucket{"));
    // Unknown names: 200 and an empty body. Other parameters are ignored.
    assert_eq!(get("?name[]=NoSuchMetric").await, (200, String::new()));
    let (_, all) = get("?foo=bar").await;
    assert!(all.contains("# TYPE Requests2XX counter"));
    let (code, err) = get("?name[]=%zz").await;
    assert_eq!(code, 400, "{err}");
    assert!(err.contains("malformed query"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_bearer_token() {
    let s = Server::start("metrics_auth_token=s3cret", &[]);
    let url = format!("{}/metrics", s.metrics_url());
    let r = s.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(&url)
        .bearer_auth("s3cret")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let bytes = r.bytes().await.unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains("# TYPE Requests2XX counter"));
    // The inference API needs no token: /ping, asked without one, turns healthy (it answers 500
    // until the demo worker is up, so a single request right after start-up may see that).
    s.wait_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_metrics_are_plausible() {
    let s = Server::start("metric_time_interval=1", &[]);
    s.wait_healthy().await;
    s.wait_sample("CPUUtilization{", |_| true).await;
    let text = s.scrape().await;
    let v = |name: &str| {
        sample(&text, &format!("{name}{{Level=\"Host\","))
            .unwrap_or_else(|| panic!("{name}: {text}"))
    };
    for pct in ["CPUUtilization", "MemoryUtilization", "DiskUtilization"] {
        assert!((0.0..=100.0).contains(&v(pct)), "{pct}");
    }
    let (used, avail) = (v("MemoryUsed"), v("MemoryAvailable"));
    assert!(used > 0.0 && avail > 0.0);
    let util = v("MemoryUtilization");
    assert!(
        (util - used * 100.0 / (used + avail)).abs() < 1.0,
        "{util} vs {used}/{avail}"
    );
    // This machine has no NVIDIA driver: said once in the log, and workers get no GPU.
    if !std::path::Path::new("/proc/driver/nvidia").exists() {
        assert_eq!(
            s.log().matches("no NVIDIA GPU found").count(),
            1,
            "{}",
            s.log()
        );
        let (_, d) = s.mgmt(reqwest::Method::GET, "/models/demo").await;
        assert_eq!(d[0]["workers"][0]["gpu"], false);
    }
    let (dused, davail) = (v("DiskUsage"), v("DiskAvailable"));
    assert!(dused > 0.0 && davail > 0.0);
    assert!((v("DiskUtilization") - dused * 100.0 / (dused + davail)).abs() < 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_system_metrics_and_no_metrics_api() {
    let s = Server::start("disable_system_metrics=true\nmetric_time_interval=1", &[]);
    // A twin with system metrics on, started alongside: once it has sampled the host, this one
    // would have too.
    let twin = Server::start("metric_time_interval=1", &[]);
    s.wait_healthy().await;
    twin.wait_healthy().await;
    twin.wait_sample("CPUUtilization{", |_| true).await;
    let text = s.scrape().await;
    assert!(text.contains("# TYPE CPUUtilization gauge"));
    assert!(!text.lines().any(|l| l.starts_with("CPUUtilization{")));

    let s = Server::start("enable_metrics_api=false", &[]);
    assert!(s.metrics.is_none());
    s.wait_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_writes_torchserve_lines() {
    let logs = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        "metrics_mode=log\ndisable_system_metrics=true",
        &[],
        &[("METRICS_LOCATION", logs.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    traffic(&s, 3).await;
    let text = s.scrape().await;
    assert!(text.starts_with("# metrics_mode=log"), "{text}");
    assert_eq!(text.lines().count(), 1);
    // The log is written by a writer thread: wait for the last request's line too.
    let log = wait_for_log(&logs.path().join("ts_metrics.log"), |log| {
        log.matches("ts_inference_requests_total.Count:1.0").count() >= 3
            && log.contains("Requests4XX.Count:1.0")
    })
    .await;
    let line = log
        .lines()
        .find(|l| l.contains("Requests4XX.Count:1.0"))
        .unwrap_or_else(|| panic!("{log}"));
    // 2024-05-30T21:46:03,626 - Requests4XX.Count:1.0|#Level:Host|#hostname:myhost,timestamp:1717105563
    let (stamp, rest) = line.split_once(" - ").unwrap();
    assert_eq!(stamp.len(), 23, "{line}");
    assert_eq!(&stamp[19..20], ",");
    assert!(
        rest.starts_with("Requests4XX.Count:1.0|#Level:Host|#hostname:"),
        "{line}"
    );
    assert!(rest.contains(",timestamp:"));
    assert_eq!(log.matches("ts_inference_requests_total.Count:1.0|#model_name:demo,model_version:default|#hostname:").count(), 3, "{log}");
    assert!(std::path::Path::new(&logs.path().join("model_metrics.log")).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_mode_keeps_only_ts_counters_on_the_endpoint() {
    let logs = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        "metrics_mode=legacy",
        &[],
        &[("METRICS_LOCATION", logs.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    traffic(&s, 2).await;
    let text = s.scrape().await;
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .collect();
    assert_eq!(
        families,
        [
            "ts_inference_latency_microseconds counter",
            "ts_inference_requests_total counter",
            "ts_queue_latency_microseconds counter"
        ]
    );
    // Metric lines reach the file through the log writer thread: wait for them.
    wait_for_log(&logs.path().join("ts_metrics.log"), |log| {
        log.contains("Requests4XX.Count:1.0")
    })
    .await;
}

/// Waits (60 s at most, then fails showing the file) until the metric log at `path` satisfies
/// `ok`; its text.
async fn wait_for_log(path: &std::path::Path, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if ok(&log) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never had the awaited lines:\n{log}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_metrics_yaml_and_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("metrics.yaml");
    std::fs::write(
        &yaml,
        "dimensions:\n  - &level \"Level\"\n  - &hostname \"Hostname\"\nts_metrics:\n  counter:\n    - name: Requests2XX\n      unit: Count\n      dimensions: [*level, *hostname]\n    - name: ts_inference_requests_total\n      unit: Count\n      dimensions: [\"model_name\", \"model_version\", \"hostname\"]\n",
    )
    .unwrap();
    let s = Server::start(
        &format!(
            "metrics_config={}\nhistogram_buckets=0.001,0.01,0.1",
            yaml.display()
        ),
        &[],
    );
    s.wait_healthy().await;
    traffic(&s, 1).await;
    let text = s.scrape().await;
    // Only what the file declares exists among TorchServe's families.
    assert!(!text.contains("# TYPE Requests4XX"));
    assert!(text.contains("# TYPE Requests2XX counter"));
    assert!(text.contains("# TYPE ts_inference_requests_total counter"));
    let buckets: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("oxserve_request_duration_seconds_bucket{"))
        .collect();
    assert_eq!(buckets.len(), 4, "{text}");
    assert!(buckets[0].contains("le=\"0.001\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_no_problem_in_oxserve_families() {
    if which("promtool").is_none() {
        panic!("promtool is not installed (apt-get install prometheus); .ci/run installs it");
    }
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    traffic(&s, 3).await;
    let text = s.scrape().await;
    let report = common::promtool_parses(&text);
    let oxserve_problems: Vec<&str> = report.lines().filter(|l| l.contains("oxserve_")).collect();
    assert!(oxserve_problems.is_empty(), "{report}");
    // The only complaints are about TorchServe's own names, kept for compatibility.
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            [
                "Requests",
                "ts_",
                "Time",
                "Utilization",
                "Memory",
                "Disk",
                "GPU",
                "Handler",
                "Prediction"
            ]
            .iter()
            .any(|n| line.contains(n)),
            "unexpected promtool complaint: {line}"
        );
    }
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

/// TorchServe's Java client ends every label set with a comma, histogram `le` included
/// (`Requests2XX{Level="Host",Hostname="vm",} 6.0`); scripts and TorchServe's own tests match
/// that text, so every labelled sample line is written that way, and promtool still parses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_sets_end_with_a_comma_like_torchserves() {
    let s = Server::start("", &[]);
    s.wait_healthy().await;
    traffic(&s, 3).await;
    let text = s.scrape().await;
    let hostname = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests2XX{Level=\"Host\",Hostname=\""))
        .and_then(|rest| rest.split('"').next())
        .expect("a Requests2XX host sample")
        .to_string();
    // /ping and /metrics count too: at least the 3 predictions.
    let prefix = format!("Requests2XX{{Level=\"Host\",Hostname=\"{hostname}\",}} ");
    let count: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} line in\n{text}"));
    assert!(count >= 3.0, "{text}");
    let mut labelled = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('{'))
    {
        labelled += 1;
        assert!(
            line.contains("\",} "),
            "label set without TorchServe's trailing comma: {line}"
        );
    }
    assert!(labelled > 10, "{text}");
    assert!(
        text.contains("_bucket{") && text.contains("le=\"+Inf\",} "),
        "{text}"
    );
    common::promtool_parses(&text);
}

/// A handler that emits, per request, the auto-detected metrics of TorchServe's
/// examples/custom_metrics handler, in the line format TorchServe's `ts.metrics` prints.
const PERCENT_HANDLER: &str = r#"
def handle(data, context):
    if data is None:
        return None
    for _ in data:
        print("[METRICS]ExamplePercentMetric.Percent:50.0|#ModelName:pm,Level:Model|#type:HISTOGRAM|#hostname:x,1717105563,req", flush=True)
        print("[METRICS]HandlerMethodTime.ms:2.5|#ModelName:pm,Level:Model|#type:GAUGE|#hostname:x,1717105563,req", flush=True)
    return ["ok" for _ in data]
"#;

/// A model store holding the folder model `pm` run by [`PERCENT_HANDLER`].
fn percent_model_store() -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    common::model_folder(
        store.path(),
        "pm",
        "pm.py",
        None,
        &[("pm.py", PERCENT_HANDLER)],
    );
    store
}

/// TorchServe's test_auto_detect_backend_metrics_prometheus_mode: auto-detection switched on by
/// `TS_MODEL_METRICS_AUTO_DETECT` (with enable_envvars_config), and an undeclared HISTOGRAM line
/// served as a histogram whose `_sum` and `_count` print as doubles (`_count{...} 1.0`), the
/// shape its regular expressions (`\d+\.\d+`) expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_detected_histogram_from_env_is_torchserves_shape() {
    let store = percent_model_store();
    let s = Server::start_with_env(
        "enable_envvars_config=true\ndefault_workers_per_model=1",
        &[
            "--model-store",
            store.path().to_str().unwrap(),
            "--models",
            "pm",
        ],
        &[
            ("TS_MODEL_METRICS_AUTO_DETECT", "true"),
            ("TS_METRICS_MODE", "prometheus"),
        ],
    );
    s.wait_healthy().await;
    assert_eq!(s.predict("pm", "x").await.status(), 200);
    let labels = "{ModelName=\"pm\",Level=\"Model\",Hostname=\"";
    // Metric lines are read from the worker's stdout after its reply: wait for them.
    s.wait_sample(&format!("ExamplePercentMetric_count{labels}"), |v| v == 1.0)
        .await;
    let text = s.scrape().await;
    assert!(
        text.contains("# TYPE ExamplePercentMetric histogram\n"),
        "{text}"
    );
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}: {text}"))
            .to_string()
    };
    assert!(
        line(&format!("ExamplePercentMetric_count{labels}")).ends_with("\",} 1.0"),
        "{text}"
    );
    assert!(
        line(&format!("ExamplePercentMetric_sum{labels}")).ends_with("\",} 50.0"),
        "{text}"
    );
    assert!(
        line("ExamplePercentMetric_bucket{").ends_with(" 0.0")
            || line("ExamplePercentMetric_bucket{").ends_with(" 1.0"),
        "{text}"
    );
    assert!(
        line(&format!("HandlerMethodTime{labels}")).ends_with("\",} 2.5"),
        "{text}"
    );
    assert!(!s.log().contains("dropped backend metric"), "{}", s.log());
}

/// TorchServe's test_metrics_legacy_mode: in legacy mode, auto-detected handler metrics are
/// written to model_metrics.log (and are not served on /metrics).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_mode_logs_auto_detected_handler_metrics() {
    let store = percent_model_store();
    let logs = tempfile::tempdir().unwrap();
    let s = Server::start_with_env(
        "enable_envvars_config=true\ndefault_workers_per_model=1",
        &[
            "--model-store",
            store.path().to_str().unwrap(),
            "--models",
            "pm",
        ],
        &[
            ("TS_MODEL_METRICS_AUTO_DETECT", "true"),
            ("TS_METRICS_MODE", "legacy"),
            ("METRICS_LOCATION", logs.path().to_str().unwrap()),
        ],
    );
    s.wait_healthy().await;
    assert_eq!(s.predict("pm", "x").await.status(), 200);
    let log = wait_for_log(&logs.path().join("model_metrics.log"), |log| {
        log.contains("ExamplePercentMetric.Percent:50.0|#ModelName:pm,Level:Model|#hostname:")
            && log.contains("HandlerMethodTime.ms:2.5|#ModelName:pm,Level:Model|#hostname:")
    })
    .await;
    assert!(log.contains(",requestID:req,timestamp:"), "{log}");
    let text = s.scrape().await;
    assert!(!text.contains("ExamplePercentMetric"), "{text}");
}
