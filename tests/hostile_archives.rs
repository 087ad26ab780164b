//! Hostile model archives against the real binary: zip bombs, archives of many entries, huge
//! MANIFEST.json and model-config.yaml files, names and versions that try to leave their folder or
//! split log lines. Each registration must be refused with a clear 400 that leaves nothing behind,
//! and the server must go on serving the model it already has, with exact metrics.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{demo_manifest, write_mar, Server};
use reqwest::Method;
use serde_json::json;

/// A .mar whose entries are written with deflate, so that megabytes of zeros take a few KB.
fn write_deflated_mar(dir: &Path, file: &str, entries: &[(&str, Vec<u8>)]) {
    let f = std::fs::File::create(dir.join(file)).unwrap();
    let mut zip = zip::ZipWriter::new(f);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        zip.start_file(*name, opts).unwrap();
        zip.write_all(data).unwrap();
    }
    zip.finish().unwrap();
}

fn manifest_bytes(name: &str, version: &str) -> Vec<u8> {
    demo_manifest(name, version).to_string().into_bytes()
}

/// Registers `url` and returns (status, body).
async fn register(s: &Server, query: &str) -> (u16, serde_json::Value) {
    s.mgmt(Method::POST, &format!("/models?{query}")).await
}

/// Folders under `tmp` whose name starts with `prefix`.
fn folders(tmp: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// The demo model still answers, and its response count is exactly `n` after `n` predictions.
async fn still_serving(s: &Server, n: usize) {
    for _ in 0..n {
        assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    }
    assert_eq!(
        s.sample("oxserve_model_responses_total{model_name=\"demo\",model_version=\"1.0\",status_class=\"2xx\"}")
            .await,
        Some(n as f64),
        "{}",
        s.scrape().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_archives_are_refused_and_leave_nothing_behind() {
    let store = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // 8 MB of zeros, a few KB packed, against a 4 MB cap.
    write_deflated_mar(
        store.path(),
        "bomb.mar",
        &[
            ("MAR-INF/MANIFEST.json", manifest_bytes("bomb", "1.0")),
            ("weights.bin", vec![0u8; 8 << 20]),
        ],
    );
    // 50 small entries against a cap of 20.
    let many: Vec<(String, Vec<u8>)> = (0..50).map(|i| (format!("f{i}.txt"), vec![b'x'])).collect();
    let mut entries: Vec<(&str, Vec<u8>)> =
        vec![("MAR-INF/MANIFEST.json", manifest_bytes("many", "1.0"))];
    entries.extend(many.iter().map(|(n, d)| (n.as_str(), d.clone())));
    write_deflated_mar(store.path(), "many.mar", &entries);
    // A 2 MiB MANIFEST.json (valid JSON: the manifest padded with spaces) against the 1 MiB cap.
    let mut big = manifest_bytes("bigmanifest", "1.0");
    big.extend(std::iter::repeat_n(b' ', 2 << 20));
    write_deflated_mar(
        store.path(),
        "bigmanifest.mar",
        &[("MAR-INF/MANIFEST.json", big)],
    );
    // A 2 MiB model-config.yaml (a comment line) against the same cap.
    let mut manifest = demo_manifest("bigyaml", "1.0");
    manifest["model"]["configFile"] = json!("model-config.yaml");
    let mut yaml = b"minWorkers: 1\n# ".to_vec();
    yaml.extend(std::iter::repeat_n(b'x', 2 << 20));
    write_deflated_mar(
        store.path(),
        "bigyaml.mar",
        &[
            ("MAR-INF/MANIFEST.json", manifest.to_string().into_bytes()),
            ("model-config.yaml", yaml),
        ],
    );
    // Just under both caps: accepted.
    write_deflated_mar(
        store.path(),
        "fits.mar",
        &[
            ("MAR-INF/MANIFEST.json", manifest_bytes("fits", "1.0")),
            ("weights.bin", vec![0u8; 3 << 20]),
        ],
    );

    write_mar(store.path(), "demo.mar", &demo_manifest("demo", "1.0"), &[]);
    let s = Server::start_store_with_env(
        "default_workers_per_model=1\nmax_archive_unpacked_bytes=4194304\nmax_archive_entries=20",
        store.path(),
        "demo.mar",
        &["--enable-model-api"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    s.wait_healthy().await;
    // The start-up model's own folder.
    let before = folders(tmp.path(), "oxserve-model-");
    assert_eq!(before.len(), 1, "{before:?}");
    for (url, needle) in [
        ("bomb.mar", "max_archive_unpacked_bytes"),
        ("many.mar", "max_archive_entries"),
        ("bigmanifest.mar", "larger than the limit"),
        ("bigyaml.mar", "larger than the limit"),
    ] {
        let (code, e) = register(&s, &format!("url={url}&initial_workers=1")).await;
        assert_eq!(code, 400, "{url}: {e}");
        assert_eq!(e["type"], "BadRequestException", "{url}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(needle), "{url}: {message}");
        // The refused archive's folder is gone already.
        assert_eq!(folders(tmp.path(), "oxserve-model-"), before, "{url}");
    }
    let (code, e) = register(&s, "url=fits.mar&initial_workers=1&synchronous=true").await;
    assert_eq!(code, 200, "{e}");
    // Unpacked folders are private.
    let unpacked = folders(tmp.path(), "oxserve-model-");
    assert_eq!(unpacked.len(), 2, "{unpacked:?}");
    for dir in &unpacked {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}: {mode:o}", dir.display());
    }
    let (code, models) = s.mgmt(Method::GET, "/models").await;
    assert_eq!(code, 200);
    let names: Vec<&str> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo", "fits"], "{models}");
    still_serving(&s, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_versions_follow_torchserves_rule() {
    let store = tempfile::tempdir().unwrap();
    for (file, name, version) in [
        ("dots.mar", "..", "1.0"),
        ("slash.mar", "a/b", "1.0"),
        ("dash.mar", "-x", "1.0"),
        ("newline.mar", "nl", "1.0\n\"injected\": 1"),
        ("dotdot_version.mar", "dv", ".."),
        ("space.mar", "sp", "1 0"),
    ] {
        write_mar(store.path(), file, &demo_manifest(name, version), &[]);
    }
    write_mar(
        store.path(),
        "good.mar",
        &demo_manifest("Good_model-1.x", "2.0-rc.1"),
        &[],
    );
    write_mar(store.path(), "demo.mar", &demo_manifest("demo", "1.0"), &[]);
    let s = Server::start_store(
        "default_workers_per_model=1",
        store.path(),
        "demo.mar",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    for (query, needle) in [
        ("url=dots.mar", "invalid model name"),
        ("url=slash.mar", "invalid model name"),
        ("url=dash.mar", "invalid model name"),
        ("url=newline.mar", "invalid model version"),
        ("url=dotdot_version.mar", "invalid model version"),
        ("url=space.mar", "invalid model version"),
        ("url=good.mar&model_name=..", "invalid model name"),
        ("url=good.mar&model_name=a%0Ab", "invalid model name"),
        (
            &format!("url=good.mar&model_name={}", "a".repeat(200)),
            "invalid model name",
        ),
    ] {
        let (code, e) = register(&s, query).await;
        assert_eq!(code, 400, "{query}: {e}");
        assert_eq!(e["type"], "BadRequestException", "{query}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{query}: {e}"
        );
    }
    // No refused name reached the log as a line of its own.
    assert!(
        !s.log().lines().any(|l| l.starts_with("\"injected\"")),
        "{}",
        s.log()
    );
    let (code, e) = register(&s, "url=good.mar&synchronous=true").await;
    assert_eq!(code, 200, "{e}");
    let (code, d) = s.mgmt(Method::GET, "/models/Good_model-1.x/2.0-rc.1").await;
    assert_eq!(code, 200, "{d}");
    still_serving(&s, 2).await;
}
