//! Sizes that are too wide, against the real binary: batch sizes, worker counts, queue sizes and
//! timeouts from the register and scale APIs, model-config.yaml, the `models` key and
//! config.properties. Each is refused with a clear error (a 400, or one line at start-up naming
//! the key); the live model keeps its workers and exact metrics.

mod common;

use std::process::Command;

use common::{demo_manifest, write_mar, Server, BIN};
use reqwest::Method;

fn start_expecting_failure(props: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(&config, props).unwrap();
    let out = Command::new(BIN)
        .args(["start", "--foreground", "--ts-config"])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_properties_refuses_sizes_past_their_ceilings() {
    for (props, key) in [
        ("batch_size=4294967295", "batch_size"),
        ("batch_size=2000", "batch_size"),
        ("max_batch_size=8\nbatch_size=9", "batch_size"),
        (
            "default_workers_per_model=100000",
            "default_workers_per_model",
        ),
        ("job_queue_size=100000000", "job_queue_size"),
        (
            "default_response_timeout=99999999999",
            "default_response_timeout",
        ),
        (
            "default_startup_timeout=18446744073709551615",
            "default_startup_timeout",
        ),
        ("max_batch_delay=99999999999", "max_batch_delay"),
        (
            "token_expiration_min=18446744073709551615",
            "token_expiration_min",
        ),
        ("max_request_size=3000000000", "max_request_size"),
        ("max_response_size=3000000000", "max_response_size"),
        ("initial_worker_port=99999999999", "initial_worker_port"),
        ("max_archive_entries=0", "max_archive_entries"),
        ("model_metrics_max_series=0", "model_metrics_max_series"),
        ("onnx_load_memory_limit=0", "onnx_load_memory_limit"),
        ("onnx_load_memory_limit=4GiB", "onnx_load_memory_limit"),
        ("onnx_load_timeout=0", "onnx_load_timeout"),
        ("install_py_dep_timeout=0", "install_py_dep_timeout"),
        (
            "install_py_dep_timeout=18446744073709551615",
            "install_py_dep_timeout",
        ),
        ("install_py_dep_per_model=yes", "install_py_dep_per_model"),
        (
            r#"models={"m": {"1.0": {"marName": "m.mar", "batchSize": 4294967295}}}"#,
            "batchSize",
        ),
        (
            r#"models={"m": {"1.0": {"marName": "m.mar", "maxWorkers": 100000}}}"#,
            "maxWorkers",
        ),
    ] {
        let (code, err) = start_expecting_failure(&format!("{props}\n"));
        assert_eq!(code, 2, "{props}: {err}");
        assert_eq!(err.lines().count(), 1, "{props}: {err}");
        assert!(err.contains(key), "{props}: {err}");
        assert!(!err.contains("panicked"), "{props}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apis_and_model_config_refuse_sizes_past_their_ceilings() {
    let store = tempfile::tempdir().unwrap();
    write_mar(store.path(), "demo.mar", &demo_manifest("demo", "1.0"), &[]);
    write_mar(
        store.path(),
        "other.mar",
        &demo_manifest("other", "1.0"),
        &[],
    );
    for (file, yaml) in [
        ("bigbatch.mar", "batchSize: 100000\n"),
        ("manyworkers.mar", "minWorkers: 1\nmaxWorkers: 100000\n"),
    ] {
        let mut manifest = demo_manifest(file.trim_end_matches(".mar"), "1.0");
        manifest["model"]["configFile"] = serde_json::json!("model-config.yaml");
        write_mar(
            store.path(),
            file,
            &manifest,
            &[("model-config.yaml", yaml.as_bytes())],
        );
    }
    let s = Server::start_store(
        "default_workers_per_model=1\nmax_workers_per_model=4\nmax_batch_size=64",
        store.path(),
        "demo.mar",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    for (method, path, needle) in [
        (
            Method::POST,
            "/models?url=other.mar&batch_size=4294967295",
            "max_batch_size",
        ),
        (
            Method::POST,
            "/models?url=other.mar&batch_size=65",
            "max_batch_size",
        ),
        (
            Method::POST,
            "/models?url=other.mar&initial_workers=100000",
            "max_workers_per_model",
        ),
        (Method::POST, "/models?url=bigbatch.mar", "max_batch_size"),
        (
            Method::POST,
            "/models?url=manyworkers.mar",
            "max_workers_per_model",
        ),
        (
            Method::PUT,
            "/models/demo?min_worker=100000",
            "max_workers_per_model",
        ),
        (
            Method::PUT,
            "/models/demo?min_worker=1&max_worker=5",
            "max_workers_per_model",
        ),
    ] {
        let (code, e) = s.mgmt(method.clone(), path).await;
        assert_eq!(code, 400, "{method} {path}: {e}");
        assert_eq!(e["type"], "BadRequestException", "{path}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{path}: {e}"
        );
    }
    // Nothing was registered, and the live model kept its one worker.
    let (_, models) = s.mgmt(Method::GET, "/models").await;
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
    let (_, d) = s.mgmt(Method::GET, "/models/demo").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1, "{d}");
    // At the ceiling is fine.
    let (code, e) = s
        .mgmt(
            Method::POST,
            "/models?url=other.mar&batch_size=64&initial_workers=4&synchronous=true",
        )
        .await;
    assert_eq!(code, 200, "{e}");
    for _ in 0..4 {
        assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    }
    let text = s.scrape().await;
    assert_eq!(
        common::sample(&text, "oxserve_model_responses_total{model_name=\"demo\",model_version=\"1.0\",status_class=\"2xx\"}"),
        Some(4.0),
        "{text}"
    );
    // Worker gauges: a worker turns ready again just after its reply, so wait for it.
    for (model, n) in [("demo", 1.0), ("other", 4.0)] {
        let ready = format!(
            "oxserve_workers{{model_name=\"{model}\",model_version=\"1.0\",state=\"ready\"}}"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while s.sample(&ready).await != Some(n) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(s.sample(&ready).await, Some(n), "{}", s.scrape().await);
    }
}
