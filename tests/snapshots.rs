//! Config snapshots (TorchServe's SnapshotManager): written on start-up, on every management
//! change and at shutdown into {LOG_LOCATION}/config, and restored by a real restart of the real
//! binary started without --ts-config; none with --ncs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{demo_manifest, write_mar, Server, BIN};
use reqwest::Method;

const BASE: &str = "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\nenable_model_api=true\ndisable_token_authorization=true\n";

/// `oxserve start --foreground ARGS` in `dir` with LOG_LOCATION=dir/logs.
fn start_in(dir: &Path, args: &[&str]) -> Server {
    let keep = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("start")
        .arg("--foreground")
        .args(args)
        .current_dir(dir)
        .env("LOG_LOCATION", dir.join("logs"))
        .env_remove("TS_CONFIG_FILE")
        .env("RUST_LOG", "info");
    Server::spawn(cmd, keep)
}

fn snapshots(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("logs").join("config"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn model_snapshot(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.starts_with("#Saving snapshot\n"), "{text}");
    let props = oxserve::config::parse_properties(&text).unwrap();
    serde_json::from_str(&props["model_snapshot"]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_written_and_restored_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    write_mar(&store, "m1.mar", &demo_manifest("m", "1.0"), &[]);
    write_mar(&store, "m2.mar", &demo_manifest("m", "2.0"), &[]);
    let cfg = dir.path().join("first.properties");
    std::fs::write(&cfg, BASE).unwrap();
    let store_arg = store.to_str().unwrap();
    let mut s = start_in(
        dir.path(),
        &[
            "--ts-config",
            cfg.to_str().unwrap(),
            "--model-store",
            store_arg,
        ],
    );
    s.wait_healthy().await;
    let startup: Vec<_> = snapshots(dir.path());
    assert!(
        startup
            .iter()
            .any(|p| p.to_string_lossy().ends_with("-startup.cfg")),
        "{startup:?}"
    );
    for q in [
        "/models?url=m1.mar&initial_workers=1&synchronous=true",
        "/models?url=m2.mar&initial_workers=2&synchronous=true",
    ] {
        let (code, v) = s.mgmt(Method::POST, q).await;
        assert_eq!(code, 200, "{v}");
    }
    let (code, v) = s.mgmt(Method::PUT, "/models/m/2.0/set-default").await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = s
        .mgmt(
            Method::PUT,
            "/models/m/1.0?min_worker=1&max_worker=3&synchronous=true",
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let newest = snapshots(dir.path()).pop().unwrap();
    assert!(
        newest.to_string_lossy().ends_with("-snapshot.cfg"),
        "{newest:?}"
    );
    let snap = model_snapshot(&newest);
    assert_eq!(snap["modelCount"], 2, "{snap}");
    assert_eq!(
        snap["name"].as_str().unwrap(),
        newest.file_name().unwrap().to_str().unwrap()
    );
    let v1 = &snap["models"]["m"]["1.0"];
    assert_eq!(v1["marName"], "m1.mar", "{snap}");
    assert_eq!(v1["defaultVersion"], false);
    assert_eq!(
        (v1["minWorkers"].as_u64(), v1["maxWorkers"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(snap["models"]["m"]["2.0"]["defaultVersion"], true, "{snap}");
    assert_eq!(snap["models"]["m"]["2.0"]["minWorkers"], 2, "{snap}");
    assert!(s.stop().success());
    let last = snapshots(dir.path()).pop().unwrap();
    assert!(
        last.to_string_lossy().ends_with("-shutdown.cfg"),
        "{last:?}"
    );
    assert_eq!(model_snapshot(&last)["models"], snap["models"]);

    // A restart without --ts-config reads the newest snapshot: its properties (the port-0
    // addresses of the first run) and its models.
    let s = start_in(dir.path(), &["--model-store", store_arg]);
    s.wait_healthy().await;
    let (code, all) = s.mgmt(Method::GET, "/models/m/all").await;
    assert_eq!(code, 200, "{all}");
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let (_, d) = s.mgmt(Method::GET, "/models/m").await;
    assert_eq!(d[0]["modelVersion"], "2.0", "{d}");
    assert_eq!(d[0]["minWorkers"], 2, "{d}");
    let (_, d) = s.mgmt(Method::GET, "/models/m/1.0").await;
    assert_eq!(
        (d[0]["minWorkers"].as_u64(), d[0]["maxWorkers"].as_u64()),
        (Some(1), Some(3)),
        "{d}"
    );
    assert_eq!(s.predict("m", r#""good""#).await.status(), 200);
    assert!(
        s.log().contains("Started restoring models from snapshot"),
        "{}",
        s.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ncs_writes_no_snapshot_and_a_broken_model_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    write_mar(&store, "m1.mar", &demo_manifest("m", "1.0"), &[]);
    let cfg = dir.path().join("c.properties");
    std::fs::write(&cfg, BASE).unwrap();
    let mut s = start_in(
        dir.path(),
        &[
            "--ts-config",
            cfg.to_str().unwrap(),
            "--model-store",
            store.to_str().unwrap(),
            "--ncs",
        ],
    );
    s.wait_healthy().await;
    let (code, v) = s
        .mgmt(
            Method::POST,
            "/models?url=m1.mar&initial_workers=1&synchronous=true",
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert!(s.stop().success());
    assert!(
        snapshots(dir.path()).is_empty(),
        "{:?}",
        snapshots(dir.path())
    );

    // A model_snapshot that is not TorchServe's JSON stops the start with a clear error.
    std::fs::write(&cfg, format!("{BASE}model_snapshot={{\"name\": 3\n")).unwrap();
    let out = Command::new(BIN)
        .args([
            "start",
            "--foreground",
            "--ts-config",
            cfg.to_str().unwrap(),
        ])
        .current_dir(dir.path())
        .env("LOG_LOCATION", dir.path().join("logs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model_snapshot"), "{err}");
}
