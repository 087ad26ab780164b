//! Management API over real HTTP against the real binary.

mod common;

use common::{demo_manifest, write_mar, Server};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

fn store_with(archives: &[(&str, serde_json::Value)]) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    for (file, manifest) in archives {
        write_mar(store.path(), file, manifest, &[("README.txt", b"demo")]);
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_describe_and_paginate() {
    let store = store_with(&[
        ("a.mar", demo_manifest("alpha", "1.0")),
        ("b.mar", demo_manifest("beta", "2.0")),
        ("c.mar", demo_manifest("gamma", "1.0")),
    ]);
    let s = Server::start_store("default_workers_per_model=1", store.path(), "all", &[]);
    s.wait_healthy().await;
    let (code, v) = s.mgmt(Method::GET, "/models").await;
    assert_eq!(code, 200);
    let names: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    assert_eq!(v["models"][0]["modelUrl"], "a.mar");
    assert!(v.get("nextPageToken").is_none());

    let (_, page) = s.mgmt(Method::GET, "/models?limit=2").await;
    assert_eq!(page["models"].as_array().unwrap().len(), 2);
    assert_eq!(page["nextPageToken"], "2");
    let (_, page2) = s
        .mgmt(Method::GET, "/models?limit=2&next_page_token=2")
        .await;
    assert_eq!(page2["models"][0]["modelName"], "gamma");
    assert!(page2.get("nextPageToken").is_none());
    let (code, e) = s.mgmt(Method::GET, "/models?limit=abc").await;
    assert_eq!(code, 400);
    assert!(e["message"].as_str().unwrap().contains("limit"));

    let (code, d) = s.mgmt(Method::GET, "/models/beta").await;
    assert_eq!(code, 200);
    let d = &d[0];
    assert_eq!(d["modelName"], "beta");
    assert_eq!(d["modelVersion"], "2.0");
    assert_eq!(d["minWorkers"], 1);
    assert_eq!(d["loadedAtStartup"], true);
    assert_eq!(d["jobQueueStatus"]["remainingCapacity"], 100);
    let w = &d["workers"][0];
    assert_eq!(w["status"], "READY");
    assert!(w["id"].as_str().unwrap().parse::<u32>().unwrap() >= 9000);
    assert!(w["pid"].as_u64().unwrap() > 0);
    assert!(w["startTime"].as_str().unwrap().ends_with('Z'));

    let (code, e) = s.mgmt(Method::GET, "/models/nope").await;
    assert_eq!(
        (code, e["type"].as_str()),
        (404, Some("ModelNotFoundException"))
    );
    let (code, _) = s.mgmt(Method::GET, "/models/beta/9.9").await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_validates_every_parameter() {
    let s = Server::start("default_workers_per_model=1", &[]);
    s.wait_healthy().await;
    for (q, needle) in [
        ("min_worker=abc", "min_worker"),
        ("min_worker=-1", "min_worker"),
        ("max_worker=1.5", "max_worker"),
        (
            "min_worker=3&max_worker=2",
            "max_worker cannot be less than min_worker.",
        ),
        ("min_worker=1&synchronous=maybe", "synchronous"),
    ] {
        let (code, e) = s.mgmt(Method::PUT, &format!("/models/demo?{q}")).await;
        assert_eq!(code, 400, "{q}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{q}: {e}");
    }
    let (code, e) = s.mgmt(Method::PUT, "/models/demo/7.0?min_worker=1").await;
    assert_eq!(code, 404, "{e}");

    let (code, v) = s
        .mgmt(
            Method::PUT,
            "/models/demo?min_worker=3&max_worker=3&synchronous=true",
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(v["status"], "Workers scaled to 3 for model: demo");
    let (_, d) = s.mgmt(Method::GET, "/models/demo").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 3);
    assert_eq!(d[0]["minWorkers"], 3);

    let (code, v) = s
        .mgmt(Method::PUT, "/models/demo?min_worker=1&max_worker=1")
        .await;
    assert_eq!(code, 202);
    assert_eq!(v["status"], "Processing worker updates...");
    let mut n = 0;
    for _ in 0..200 {
        let (_, d) = s.mgmt(Method::GET, "/models/demo").await;
        n = d[0]["workers"].as_array().unwrap().len();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_under_load_loses_no_request() {
    let s = Server::start("default_workers_per_model=1\njob_queue_size=500", &[]);
    s.wait_healthy().await;
    let url = format!("{}/predictions/demo", s.inference);
    let handles: Vec<_> = (0..60)
        .map(|i| {
            let (c, u) = (s.client.clone(), url.clone());
            tokio::spawn(async move {
                c.post(u)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"text": "good {i}", "sleep_ms": 100}}"#))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    // Scale while requests wait in the queue, and scale down while several workers are busy.
    s.wait_sample(
        r#"oxserve_queue_depth{model_name="demo",model_version="1.0"}"#,
        |depth| depth > 0.0,
    )
    .await;
    let (code, _) = s
        .mgmt(
            Method::PUT,
            "/models/demo?min_worker=4&max_worker=4&synchronous=true",
        )
        .await;
    assert_eq!(code, 200);
    s.wait_sample(
        r#"oxserve_workers{model_name="demo",model_version="1.0",state="busy"}"#,
        |busy| busy >= 2.0,
    )
    .await;
    let (code, _) = s
        .mgmt(
            Method::PUT,
            "/models/demo?min_worker=1&max_worker=1&synchronous=true",
        )
        .await;
    assert_eq!(code, 200);
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap());
    }
    assert_eq!(statuses, vec![200; 60]);
    let total = s
        .sample(r#"ts_inference_requests_total{model_name="demo",model_version="default","#)
        .await;
    assert_eq!(total, Some(60.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_versions_default_and_unregister() {
    let store = store_with(&[
        ("m1.mar", demo_manifest("m", "1.0")),
        ("m2.mar", demo_manifest("m", "2.0")),
    ]);
    // Without enable_model_api, register and unregister are refused.
    {
        let s = Server::start("", &["--model-store", store.path().to_str().unwrap()]);
        let (code, _) = s.mgmt(Method::POST, "/models?url=m1.mar").await;
        assert_eq!(code, 405);
        let (code, _) = s.mgmt(Method::DELETE, "/models/m").await;
        assert_eq!(code, 405);
    }
    let s = Server::start_store(
        "default_workers_per_model=1\nallowed_urls=file://.*,http://127\\.0\\.0\\.1:.*",
        store.path(),
        "",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    let (code, v) = s
        .mgmt(
            Method::POST,
            "/models?url=m1.mar&initial_workers=1&synchronous=true",
        )
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["status"],
        "Model \"m\" Version: 1.0 registered with 1 initial workers"
    );
    let (code, v) = s.mgmt(Method::POST, "/models?url=m1.mar").await;
    assert_eq!(code, 409, "{v}");
    let (code, _) = s
        .mgmt(
            Method::POST,
            "/models?url=m2.mar&initial_workers=1&synchronous=true",
        )
        .await;
    assert_eq!(code, 200);

    // The first registered version is the default.
    let (_, d) = s.mgmt(Method::GET, "/models/m").await;
    assert_eq!(d[0]["modelVersion"], "1.0");
    let (_, all) = s.mgmt(Method::GET, "/models/m/all").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (code, v) = s.mgmt(Method::PUT, "/models/m/2.0/set-default").await;
    assert_eq!(code, 200);
    assert_eq!(
        v["status"],
        "Default version successfully updated for model \"m\" to \"2.0\""
    );
    let (_, d) = s.mgmt(Method::GET, "/models/m").await;
    assert_eq!(d[0]["modelVersion"], "2.0");
    let (code, _) = s.mgmt(Method::PUT, "/models/m/3.0/set-default").await;
    assert_eq!(code, 404);
    assert_eq!(s.predict("m", r#""good""#).await.status(), 200);

    for (q, needle) in [
        ("/models", "url"),
        ("/models?url=missing.mar", "not found"),
        ("/models?url=m1.mar&initial_workers=x", "initial_workers"),
        ("/models?url=m1.mar&batch_size=0", "batch_size"),
        ("/models?url=../m1.mar", "model store"),
        ("/models?url=http://example.com/m.mar", "allowed"),
    ] {
        let (code, e) = s.mgmt(Method::POST, q).await;
        assert_eq!(code, 400, "{q}: {e}");
        assert!(e["message"].as_str().unwrap().contains(needle), "{q}: {e}");
    }

    // An allowed http:// URL is downloaded into the model store (a real HTTP server serves it).
    let web = tempfile::tempdir().unwrap();
    write_mar(web.path(), "web.mar", &demo_manifest("web", "1.0"), &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut http = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(web.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut registered = (0, json!(null));
    for _ in 0..100 {
        registered = s
            .mgmt(
                Method::POST,
                &format!("/models?url=http://127.0.0.1:{port}/web.mar&synchronous=true"),
            )
            .await;
        if registered.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = http.kill();
    let _ = http.wait();
    assert_eq!(registered.0, 200, "{}", registered.1);
    assert!(store.path().join("web.mar").exists());
    // TorchServe's answer to a URL whose file is already in the store.
    let (code, e) = s
        .mgmt(
            Method::POST,
            &format!("/models?url=http://127.0.0.1:{port}/web.mar&model_name=web2"),
        )
        .await;
    assert_eq!(code, 500, "{e}");
    assert_eq!(e["type"], "InternalServerException", "{e}");
    assert_eq!(e["message"], "Model file already exists web.mar", "{e}");
    assert_eq!(s.predict("web", r#""good""#).await.status(), 200);

    let (code, v) = s.mgmt(Method::DELETE, "/models/m/1.0").await;
    assert_eq!(code, 200);
    assert_eq!(v["status"], "Model \"m\" unregistered");
    assert_eq!(s.mgmt(Method::GET, "/models/m/1.0").await.0, 404);
    let (code, _) = s.mgmt(Method::DELETE, "/models/m").await;
    assert_eq!(code, 200);
    assert_eq!(s.mgmt(Method::GET, "/models/m").await.0, 404);
    assert_eq!(s.predict("m", "x").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregister_answers_queued_requests() {
    let store = store_with(&[("q.mar", demo_manifest("q", "1.0"))]);
    let s = Server::start_store(
        "default_workers_per_model=1",
        store.path(),
        "q.mar",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    let url = format!("{}/predictions/q", s.inference);
    let send = |c: reqwest::Client, u: String| async move {
        c.post(u)
            .header("content-type", "application/json")
            .body(r#"{"text": "ok", "sleep_ms": 1000}"#)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let handles: Vec<_> = (0..3)
        .map(|_| tokio::spawn(send(s.client.clone(), url.clone())))
        .collect();
    // One request in the worker, two in the queue.
    s.wait_sample(
        r#"oxserve_queue_depth{model_name="q",model_version="1.0"}"#,
        |depth| depth == 2.0,
    )
    .await;
    let (code, _) = s.mgmt(Method::DELETE, "/models/q").await;
    assert_eq!(code, 200);
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap());
    }
    statuses.sort();
    // The one in the worker finishes; the queued ones get a clear 503, none is lost.
    assert_eq!(statuses, [200, 503, 503]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_archives_are_refused_and_write_nothing_outside() {
    let store = tempfile::tempdir().unwrap();
    write_mar(
        store.path(),
        "evil.mar",
        &demo_manifest("evil", "1.0"),
        &[("../../escaped.txt", b"x")],
    );
    std::fs::write(
        store.path().join("corrupt.mar"),
        b"PK\x03\x04 this is not a zip",
    )
    .unwrap();
    write_mar(store.path(), "nomanifest.mar", &json!({}), &[]);
    std::fs::remove_file(store.path().join("nomanifest.mar")).unwrap();
    {
        use std::io::Write;
        let f = std::fs::File::create(store.path().join("nomanifest.mar")).unwrap();
        let mut z = zip::ZipWriter::new(f);
        z.start_file("handler.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(b"pass").unwrap();
        z.finish().unwrap();
    }
    let s = Server::start_store("", store.path(), "", &["--enable-model-api"]);
    for (file, needle) in [
        ("evil.mar", "outside"),
        ("corrupt.mar", "zip"),
        ("nomanifest.mar", "MANIFEST.json"),
    ] {
        let (code, e) = s.mgmt(Method::POST, &format!("/models?url={file}")).await;
        assert_eq!(code, 400, "{file}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{file}: {e}"
        );
    }
    assert!(!store.path().parent().unwrap().join("escaped.txt").exists());
    assert!(!std::path::Path::new("/tmp/escaped.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_key_sets_per_version_settings_at_start_up() {
    let store = store_with(&[
        ("m1.mar", demo_manifest("m", "1.0")),
        ("m2.mar", demo_manifest("m", "2.0")),
    ]);
    let props = r#"models={"m": {"1.0": {"marName": "m1.mar", "minWorkers": 1, "maxWorkers": 1}, "2.0": {"marName": "m2.mar", "minWorkers": 2, "maxWorkers": 3, "batchSize": 4, "maxBatchDelay": 50, "defaultVersion": true}}}"#;
    let s = Server::start(props, &["--model-store", store.path().to_str().unwrap()]);
    s.wait_healthy().await;
    let (_, d) = s.mgmt(Method::GET, "/models/m").await;
    let d = &d[0];
    assert_eq!(d["modelVersion"], "2.0", "{d}");
    assert_eq!(
        (d["minWorkers"].as_u64(), d["maxWorkers"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(
        (d["batchSize"].as_u64(), d["maxBatchDelay"].as_u64()),
        (Some(4), Some(50))
    );
    assert_eq!(d["workers"].as_array().unwrap().len(), 2);
    assert_eq!(d["loadedAtStartup"], true);
}

/// What TorchServe's own management suite checks: trailing slashes, empty values, the register
/// API's defaults (no workers), handler and runtime, startup_timeout=0, describe's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchserve_register_rules_and_paths() {
    let store = store_with(&[
        ("m1.mar", demo_manifest("m", "1.0")),
        ("h.mar", demo_manifest("h", "1.0")),
    ]);
    let s = Server::start_store("", store.path(), "", &["--enable-model-api"]);
    s.wait_healthy().await;
    // An empty value is "not given"; `url=` is TorchServe's 404, no url its 400.
    let (code, v) = s.mgmt(Method::GET, "/models?limit=&next_page_token=").await;
    assert_eq!((code, v.clone()), (200, json!({"models": []})), "{v}");
    // `/models/` is `/models` (TorchServe drops empty path segments; its test_snapshot.py lists
    // models that way), and so are `/workflows/` and a workflow's name with a trailing slash.
    let (code, v) = s.mgmt(Method::GET, "/models/").await;
    assert_eq!((code, v.clone()), (200, json!({"models": []})), "{v}");
    let (code, v) = s.mgmt(Method::GET, "/workflows/").await;
    assert_eq!(code, 200, "{v}");
    let (code, e) = s.mgmt(Method::GET, "/workflows/nope/").await;
    assert_eq!(
        (code, e.clone()),
        s.mgmt(Method::GET, "/workflows/nope").await,
        "{e}"
    );
    assert_ne!(e["type"], "ResourceNotFoundException", "{e}");
    let (code, e) = s.mgmt(Method::POST, "/models?url=&model_name=x").await;
    assert_eq!(code, 404, "{e}");
    assert_eq!(e["type"], "ModelNotFoundException");
    assert_eq!(e["message"], "empty url");
    let (code, e) = s.mgmt(Method::POST, "/models").await;
    assert_eq!(
        (code, e["message"].clone()),
        (400, json!("Parameter url is required."))
    );

    // No initial_workers and no default_workers_per_model key: no workers, synchronous or not.
    for sync in ["true", "false"] {
        let (code, v) = s
            .mgmt(
                Method::POST,
                &format!("/models?url=m1.mar&synchronous={sync}"),
            )
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["status"],
            "Model \"m\" Version: 1.0 registered with 0 initial workers. Use scale workers API to add workers for the model."
        );
        let (code, d) = s.mgmt(Method::GET, "/models/m/").await;
        assert_eq!(code, 200, "{d}");
        let (code, l) = s.mgmt(Method::GET, "/models/").await;
        assert_eq!(
            (code, l["models"][0]["modelName"].clone()),
            (200, json!("m")),
            "{l}"
        );
        assert_eq!(d[0]["minWorkers"], 0, "{d}");
        assert_eq!(d[0]["workers"], json!([]), "{d}");
        for (field, value) in [
            ("maxRetryTimeoutInSec", json!(300)),
            ("clientTimeoutInMills", json!(0)),
            ("deviceType", json!("cpu")),
            ("parallelType", json!("")),
            ("continuousBatching", json!(false)),
            ("stateful", json!(false)),
        ] {
            assert_eq!(d[0][field], value, "{field}: {d}");
        }
        let (code, v) = s.mgmt(Method::DELETE, "/models/m/?synchronous=true").await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], "Model \"m\" unregistered");
    }
    assert_eq!(s.mgmt(Method::GET, "/models/m/").await.0, 404);

    // runtime: TorchServe's values are checked (python and python3 both run on Python).
    let (code, e) = s
        .mgmt(Method::POST, "/models?url=m1.mar&runtime=python4")
        .await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(e["message"], "Invalid RuntimeType value: python4");
    let (code, e) = s.mgmt(Method::POST, "/models?url=m1.mar&runtime=LSP").await;
    assert_eq!(code, 400, "{e}");
    let (code, v) = s
        .mgmt(
            Method::POST,
            "/models?url=m1.mar&runtime=python3&initial_workers=1",
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, d) = s.mgmt(Method::GET, "/models/m/1.0/").await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(s.predict("m", r#""good""#).await.status(), 200);

    // handler replaces the manifest's: a handler that does not exist registers (no workers yet)
    // and a synchronous scale then fails as TorchServe's does, leaving the model registered.
    let (code, v) = s
        .mgmt(
            Method::POST,
            "/models?url=h.mar&handler=no_such_handler_module",
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, e) = s
        .mgmt(Method::PUT, "/models/h?min_worker=1&synchronous=true")
        .await;
    assert_eq!(code, 500, "{e}");
    assert_eq!(e["type"], "InternalServerException", "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Failed to start workers for model h version: 1.0"),
        "{e}"
    );
    assert_eq!(s.mgmt(Method::GET, "/models/h").await.0, 200);
    let (code, e) = s
        .mgmt(
            Method::POST,
            &format!(
                "/models?url=h.mar&model_name=h2&handler={}",
                "x".repeat(2000)
            ),
        )
        .await;
    assert_eq!(code, 400, "{e}");

    // startup_timeout=0: fine without workers, TorchServe's 500 with them (nothing registered).
    let (code, e) = s
        .mgmt(
            Method::POST,
            "/models?url=m1.mar&model_name=z&initial_workers=1&startup_timeout=0",
        )
        .await;
    assert_eq!(code, 500, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .starts_with("Failed to start workers"),
        "{e}"
    );
    assert_eq!(s.mgmt(Method::GET, "/models/z").await.0, 404);
    let (code, v) = s
        .mgmt(
            Method::POST,
            "/models?url=m1.mar&model_name=z&startup_timeout=0",
        )
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = s
        .mgmt(Method::PUT, "/models/z/1.0/?min_worker=0&synchronous=true")
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["status"],
        "Workers scaled to 0 for model: z, version: 1.0"
    );
    // The strict 400s stay (docs/compatibility.md).
    for q in [
        "/models/z?min_worker=-1",
        "/models/z?min_worker=nan&synchronous=nan",
    ] {
        assert_eq!(s.mgmt(Method::PUT, q).await.0, 400, "{q}");
    }
}
