//! TorchServe workflows behind the real server: a .war made by the real torch-workflow-archiver,
//! models from the real torch-model-archiver, real Python workers for models and function nodes,
//! real HTTP. Hostile archives (cycles, too many nodes, traversal, junk) are written here with
//! the zip crate, since the archiver refuses to make them.

mod common;

use common::Server;
use reqwest::Method;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

/// echo.mar (examples/make_archives.sh) and echo_pipeline.war (examples/make_workflow_archive.sh),
/// packaged once per test run into target/.
fn stores() -> &'static (PathBuf, PathBuf) {
    static STORES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    STORES.get_or_init(|| {
        let models = common::example_archives().to_path_buf();
        let workflows = PathBuf::from(format!("{}/target/test-workflow-store", root()));
        common::package_examples("make_workflow_archive.sh", &workflows);
        assert!(workflows.join("echo_pipeline.war").is_file());
        (models, workflows)
    })
}

/// A server whose workflow store is a fresh folder of its own holding `wars` (copied from the
/// shared store, or written by the test afterwards).
fn start(props: &str, extra: &[&str]) -> (Server, PathBuf) {
    let (models, workflows) = stores();
    let store = tempfile::tempdir().unwrap().keep();
    std::fs::copy(
        workflows.join("echo_pipeline.war"),
        store.join("echo_pipeline.war"),
    )
    .unwrap();
    let mut args = vec![
        "--model-store",
        models.to_str().unwrap(),
        "--workflow-store",
        store.to_str().unwrap(),
        "--enable-model-api",
    ];
    args.extend_from_slice(extra);
    (Server::start(props, &args), store)
}

/// Removes the test's own workflow store.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn post(s: &Server, path: &str) -> (u16, serde_json::Value) {
    s.mgmt(Method::POST, path).await
}

async fn wfpredict(s: &Server, name: &str, body: &str) -> (u16, String) {
    let r = s
        .client
        .post(format!("{}/wfpredict/{name}", s.inference))
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// Writes a .war (zip) of these entries into `dir`.
fn write_war(dir: &Path, file: &str, entries: &[(&str, &str)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(dir.join(file)).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for (name, data) in entries {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(data.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
}

fn manifest(name: &str) -> String {
    format!(
        r#"{{"createdOn": "29/11/2026 00:00:00", "archiverVersion": "0.2.15", "workflow": {{"workflowName": "{name}", "specFile": "spec.yaml", "handler": "handler.py"}}}}"#
    )
}

/// A .war of function nodes only: `handler` is the handler file, `spec` the YAML.
fn function_war(dir: &Path, file: &str, name: &str, spec: &str, handler: &str) {
    write_war(
        dir,
        file,
        &[
            ("WAR-INF/MANIFEST.json", &manifest(name)),
            ("spec.yaml", spec),
            ("handler.py", handler),
        ],
    );
}

async fn model_names(s: &Server) -> Vec<String> {
    let (_, list) = s.mgmt(Method::GET, "/models").await;
    list["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_registers_its_models_runs_parallel_branches_and_unregisters() {
    let (s, store) = start("", &[]);
    let _clean = Cleanup(store.clone());

    let (code, body) = post(&s, "/workflows?url=echo_pipeline.war").await;
    assert_eq!(code, 200, "{body} {}", s.log());
    assert_eq!(
        body["status"],
        "Workflow echo_pipeline has been registered and scaled successfully."
    );
    // Every node is a model named <workflow>__<node>, function nodes included.
    let mut names = model_names(&s).await;
    names.sort();
    assert_eq!(
        names,
        [
            "echo_pipeline__left",
            "echo_pipeline__post_processing",
            "echo_pipeline__pre_processing",
            "echo_pipeline__right"
        ]
    );
    let (code, list) = s.mgmt(Method::GET, "/workflows").await;
    assert_eq!(code, 200);
    assert_eq!(
        list,
        serde_json::json!({"workflows": [{"workflowName": "echo_pipeline", "workflowUrl": "echo_pipeline.war"}]})
    );
    let (code, d) = s.mgmt(Method::GET, "/workflows/echo_pipeline").await;
    assert_eq!(code, 200);
    assert_eq!(d[0]["workflowName"], "echo_pipeline");
    assert_eq!(d[0]["maxBatchDelay"], 10);
    assert_eq!(
        d[0]["workflowDag"],
        "{pre_processing=[left, right], left=[post_processing], right=[post_processing]}"
    );

    // pre_processing -> left and right in parallel -> post_processing joins them.
    let (code, text) = wfpredict(&s, "echo_pipeline", "hello").await;
    assert_eq!(code, 200, "{text} {}", s.log());
    let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"left": {"input": "hello"}, "right": {"input": "hello"}})
    );

    // Each node call is an ordinary request of its model, counted in its metrics.
    for node in ["pre_processing", "left", "right", "post_processing"] {
        let series = format!(
            r#"ts_inference_requests_total{{model_name="echo_pipeline__{node}",model_version="default""#
        );
        assert_eq!(s.sample(&series).await, Some(1.0), "{node}");
    }

    let (_, d) = s.mgmt(Method::GET, "/models/echo_pipeline__left").await;
    let pid = d[0]["workers"][0]["pid"].as_u64().unwrap();
    assert!(common::pid_alive(pid));
    let (code, body) = s.mgmt(Method::DELETE, "/workflows/echo_pipeline").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Workflow \"echo_pipeline\" unregistered");
    assert!(model_names(&s).await.is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "worker {pid} outlived its workflow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = s.mgmt(Method::GET, "/workflows/echo_pipeline").await;
    assert_eq!(code, 404);
    assert_eq!(body["type"], "WorkflowNotFoundException");
    let (code, _) = wfpredict(&s, "echo_pipeline", "hello").await;
    assert_eq!(code, 404);
    // The archive in the store is the operator's: it stays, and registers again.
    assert!(store.join("echo_pipeline.war").is_file());
    let (code, body) = post(&s, "/workflows?url=echo_pipeline.war").await;
    assert_eq!(code, 200, "{body}");

    // Config snapshots leave workflow nodes out: restored alone, they would make registering
    // the workflow again a conflict. (The shutdown snapshot is written with them registered.)
    let mut s = s;
    assert!(s.stop().success());
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(s.path().join("logs").join("config"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    snaps.sort();
    let newest = snaps.pop().expect("a snapshot");
    assert!(
        newest.to_string_lossy().ends_with("-shutdown.cfg"),
        "{newest:?}"
    );
    let text = std::fs::read_to_string(&newest).unwrap();
    let props = oxserve::config::parse_properties(&text).unwrap();
    let models: serde_json::Value = serde_json::from_str(&props["model_snapshot"]).unwrap();
    assert_eq!(models["models"], serde_json::json!({}), "{models}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_workflow_archives_are_refused_with_the_reason() {
    let (s, store) = start("", &[]);
    let _clean = Cleanup(store.clone());
    let handler = "def a(data, context):\n    return data\n";
    // (file, its entries, what the refusal says)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "cycle.war",
            vec![
                ("WAR-INF/MANIFEST.json", manifest("cycle")),
                ("spec.yaml", "dag:\n  a: [b]\n  b: [c]\n  c: [b]\n".into()),
                ("handler.py", handler.into()),
            ],
            "cycle",
        ),
        (
            "self.war",
            vec![
                ("WAR-INF/MANIFEST.json", manifest("selfloop")),
                ("spec.yaml", "dag:\n  a: [a]\n".into()),
                ("handler.py", handler.into()),
            ],
            "Self loop",
        ),
        (
            "big.war",
            vec![
                ("WAR-INF/MANIFEST.json", manifest("big")),
                (
                    "spec.yaml",
                    format!(
                        "dag:\n{}",
                        (0..200)
                            .map(|i| format!("  n{i}: [n{}]\n", i + 1))
                            .collect::<String>()
                    ),
                ),
                ("handler.py", handler.into()),
            ],
            "more than 64 nodes",
        ),
        (
            "traversal.war",
            vec![
                ("WAR-INF/MANIFEST.json", manifest("traversal")),
                ("../escaped.yaml", "dag:\n  a: []\n".into()),
            ],
            "outside the archive",
        ),
        (
            "spec_outside.war",
            vec![(
                "WAR-INF/MANIFEST.json",
                manifest("outside").replace("spec.yaml", "../../etc/passwd"),
            )],
            "outside the archive",
        ),
        (
            "nomanifest.war",
            vec![("spec.yaml", "dag:\n  a: []\n".into())],
            "MANIFEST.json",
        ),
        (
            "badname.war",
            vec![
                ("WAR-INF/MANIFEST.json", manifest("../evil")),
                ("spec.yaml", "dag:\n  a: []\n".into()),
                ("handler.py", handler.into()),
            ],
            "invalid workflow name",
        ),
        (
            "badyaml.war",
            vec![
                ("WAR-INF/MANIFEST.json", manifest("badyaml")),
                (
                    "spec.yaml",
                    "models:\n  batch-size: lots\ndag:\n  a: []\n".into(),
                ),
                ("handler.py", handler.into()),
            ],
            "batch-size",
        ),
    ];
    for (file, entries, want) in &cases {
        let entries: Vec<(&str, &str)> = entries.iter().map(|(n, d)| (*n, d.as_str())).collect();
        write_war(&store, file, &entries);
        let (code, body) = post(&s, &format!("/workflows?url={file}")).await;
        assert!(
            code == 400,
            "{file}: {code} {body} (want 400 with {want:?})"
        );
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{file}: {body}");
    }
    std::fs::write(store.join("junk.war"), b"not a zip at all").unwrap();
    let (code, body) = post(&s, "/workflows?url=junk.war").await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["type"], "InvalidWorkflowException");

    // Names outside the store, absent files, no url.
    for (url, code) in [
        ("../echo_pipeline.war", 404),
        ("/etc/passwd", 404),
        ("absent.war", 404),
        ("", 400),
    ] {
        let (got, body) = post(&s, &format!("/workflows?url={url}")).await;
        assert_eq!(got, code, "{url}: {body}");
    }
    let (got, body) = post(&s, "/workflows").await;
    assert_eq!(got, 400, "{body}");
    // Nothing half-registered is left behind, and the server still works.
    assert!(
        model_names(&s).await.is_empty(),
        "{:?}",
        model_names(&s).await
    );
    let (_, list) = s.mgmt(Method::GET, "/workflows").await;
    assert_eq!(list["workflows"], serde_json::json!([]));
    let (code, body) = s.mgmt(Method::GET, "/workflows?limit=x").await;
    assert_eq!(code, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_load_rolls_the_whole_workflow_back() {
    let (s, store) = start("", &[]);
    let _clean = Cleanup(store.clone());
    // `a` loads; `b` raises when TorchServe's load call handle(None, context) reaches it.
    function_war(
        &store,
        "broken.war",
        "broken",
        "dag:\n  a: [b]\n",
        "def a(data, context):\n    return data\n\n\ndef b(data, context):\n    raise MemoryError('stand-in: out of memory at load')\n",
    );
    let (code, body) = post(&s, "/workflows?url=broken.war").await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(body["type"], "WorkflowException");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("Workflow broken has failed to register. Failures: [Failed to start workers for model broken__b"),
        "{message}"
    );
    assert!(
        model_names(&s).await.is_empty(),
        "{:?}",
        model_names(&s).await
    );
    let (code, _) = s.mgmt(Method::GET, "/workflows/broken").await;
    assert_eq!(code, 404);

    // A name taken twice: the second registration is a conflict.
    function_war(
        &store,
        "one.war",
        "twice",
        "dag:\n  a: []\n",
        "def a(data, context):\n    if data is None:\n        return None\n    return [row.get('body') for row in data]\n",
    );
    std::fs::copy(store.join("one.war"), store.join("two.war")).unwrap();
    let (code, body) = post(&s, "/workflows?url=one.war").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&s, "/workflows?url=two.war").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["type"], "ConflictStatusException");
    // workflow_name overrides the manifest's name.
    let (code, body) = post(&s, "/workflows?url=two.war&workflow_name=other").await;
    assert_eq!(code, 200, "{body}");
    let (_, list) = s.mgmt(Method::GET, "/workflows?limit=1").await;
    assert_eq!(list["workflows"][0]["workflowName"], "other");
    assert_eq!(list["nextPageToken"], "1");
    // A single function node's reply is the answer as is.
    let (code, text) = wfpredict(&s, "twice", "ping").await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(text, "ping");

    // Several leaves: a JSON object keyed by leaf node.
    function_war(
        &store,
        "fan.war",
        "fan",
        "dag:\n  a: [b, c]\n",
        "def a(data, context):\n    return data and [row.get('body') for row in data]\n\n\ndef b(data, context):\n    return data and [{'b': row.get('body').decode()} for row in data]\n\n\ndef c(data, context):\n    return data and ['c saw ' + row.get('body').decode() for row in data]\n",
    );
    let (code, body) = post(&s, "/workflows?url=fan.war").await;
    assert_eq!(code, 200, "{body}");
    let (code, text) = wfpredict(&s, "fan", "x").await;
    assert_eq!(code, 200, "{text}");
    let reply: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply, serde_json::json!({"b": {"b": "x"}, "c": "c saw x"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_is_retried_then_fails_and_its_late_replies_still_count() {
    let (s, store) = start("", &[]);
    let _clean = Cleanup(store.clone());
    // The node waits for a file the test never writes until both attempts have given up, so
    // the outcome does not depend on how fast this machine is.
    let gate = store.join("gate");
    let handler = format!(
        "import os, time\n\n\ndef slow(data, context):\n    if data is None:\n        return None\n    while not os.path.exists({:?}):\n        time.sleep(0.02)\n    return ['late' for _ in data]\n",
        gate.to_str().unwrap()
    );
    function_war(
        &store,
        "slow.war",
        "slowwf",
        "models:\n  timeout-ms: 300\n  retry-attempts: 1\ndag:\n  slow: []\n",
        &handler,
    );
    let (code, body) = post(&s, "/workflows?url=slow.war").await;
    assert_eq!(code, 200, "{body}");
    let (code, text) = wfpredict(&s, "slowwf", "x").await;
    assert_eq!(code, 500, "{text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["type"], "InternalServerException");
    assert_eq!(body["message"], "Error executing slow");
    // Two attempts were sent; once the worker answers them, both are counted.
    std::fs::write(&gate, b"open").unwrap();
    let series = r#"ts_inference_requests_total{model_name="slowwf__slow",model_version="default""#;
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.sample(series).await != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "late replies not counted: {:?}",
            s.sample(series).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, text) = wfpredict(&s, "slowwf", "x").await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(text, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_need_a_store_and_the_model_api() {
    let s = Server::start("", &["--enable-model-api"]);
    let (code, body) = post(&s, "/workflows?url=echo_pipeline.war").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["message"], "Workflow store has not been configured.");

    // Without --enable-model-api, registering and unregistering are refused, as for models.
    let (models, _) = stores();
    let store = tempfile::tempdir().unwrap();
    let s2 = Server::start_store(
        "",
        models,
        "",
        &["--workflow-store", store.path().to_str().unwrap()],
    );
    let (code, body) = post(&s2, "/workflows?url=echo_pipeline.war").await;
    assert_eq!(code, 405, "{body}");
    let (code, _) = s2.mgmt(Method::DELETE, "/workflows/echo_pipeline").await;
    assert_eq!(code, 405);
    // Listing and describing stay open, as for models.
    let (code, _) = s2.mgmt(Method::GET, "/workflows").await;
    assert_eq!(code, 200);
}

/// A loopback HTTP server answering `GET /wf/dl.war` with `war` and anything else with 404.
fn archive_server(war: Vec<u8>) -> u16 {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let head = if line.split_whitespace().nth(1) == Some("/wf/dl.war") {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    war.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(head.as_bytes());
            if head.starts_with("HTTP/1.1 200") {
                let _ = stream.write_all(&war);
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloaded_archive_is_kept_while_registered_and_removed_after() {
    let scratch = tempfile::tempdir().unwrap();
    function_war(
        scratch.path(),
        "dl.war",
        "dl",
        "dag:\n  a: []\n",
        "def a(data, context):\n    return data and [row.get('body') for row in data]\n",
    );
    let port = archive_server(std::fs::read(scratch.path().join("dl.war")).unwrap());
    let allowed = format!("allowed_urls=http://127\\\\.0\\\\.0\\\\.1:{port}/wf/.*");
    let (s, store) = start(&allowed, &[]);
    let _clean = Cleanup(store.clone());
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let url = format!("http://127.0.0.1:{port}/wf/dl.war");

    // A URL outside allowed_urls is refused before anything is fetched.
    let (code, body) = post(
        &s,
        &format!("/workflows?url=http://127.0.0.1:{port}/other/x.war"),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("allowed URL"),
        "{body}"
    );
    // A failed download leaves nothing in the store.
    let (code, body) = post(
        &s,
        &format!("/workflows?url=http://127.0.0.1:{port}/wf/absent.war"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["type"], "DownloadArchiveException");
    assert_eq!(listing(), ["echo_pipeline.war"]);

    let (code, body) = post(&s, &format!("/workflows?url={url}")).await;
    assert_eq!(code, 200, "{body} {}", s.log());
    assert_eq!(listing(), ["dl.war", "echo_pipeline.war"]);
    let (_, d) = s.mgmt(Method::GET, "/workflows/dl").await;
    assert_eq!(d[0]["workflowUrl"], url.as_str());
    let (code, text) = wfpredict(&s, "dl", "over http").await;
    assert_eq!((code, text.as_str()), (200, "over http"));
    // The URL's file is in the store now: TorchServe's 500 FileAlreadyExistsException.
    let (code, body) = post(&s, &format!("/workflows?url={url}")).await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(body["type"], "FileAlreadyExistsException");
    assert_eq!(body["message"], "dl.war");
    // Unregistering removes what the server downloaded, so the URL registers again.
    let (code, _) = s.mgmt(Method::DELETE, "/workflows/dl").await;
    assert_eq!(code, 200);
    assert_eq!(listing(), ["echo_pipeline.war"]);
    let (code, body) = post(&s, &format!("/workflows?url={url}")).await;
    assert_eq!(code, 200, "{body}");
}
