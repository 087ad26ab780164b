//! Per-model Python dependencies (`install_py_dep_per_model`): the real server pip-installs an
//! archive's requirementsFile from the package index this machine is configured for (PyPI), real
//! Python workers import it, and failures answer TorchServe's 400 ModelException.

mod common;

use common::{write_mar, Server};
use reqwest::Method;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A handler that says whether `inflection` (a small pure-Python package the system Python lacks)
/// is importable, and if so uses it and says where it came from.
const HANDLER: &str = r#"
import importlib.util, json

def handle(data, context):
    if data is None:
        return None
    out = {"found": importlib.util.find_spec("inflection") is not None}
    if out["found"]:
        import inflection
        out["camel"] = inflection.camelize("oxserve_python_deps")
        out["file"] = inflection.__file__
        out["model_dir"] = context.system_properties["model_dir"]
    return [json.dumps(out) for _ in data]
"#;

/// An archive of the handler; `requirements` (if any) is named by the manifest's requirementsFile.
fn archive(store: &Path, name: &str, requirements: Option<&str>, extra: &[(&str, &[u8])]) {
    let mut model = serde_json::json!({
        "modelName": name,
        "modelVersion": "1.0",
        "handler": "deps_handler:handle",
    });
    let mut files: Vec<(&str, &[u8])> = vec![("deps_handler.py", HANDLER.as_bytes())];
    if let Some(text) = requirements {
        model["requirementsFile"] = "requirements.txt".into();
        files.push(("requirements.txt", text.as_bytes()));
    }
    files.extend_from_slice(extra);
    let manifest = serde_json::json!({
        "createdOn": "29/11/2026 03:00:00",
        "runtime": "python",
        "model": model,
        "archiverVersion": "0.12.0",
    });
    write_mar(store, &format!("{name}.mar"), &manifest, &files);
}

fn start(props: &str, store: &Path) -> Server {
    let store = store.to_str().unwrap();
    Server::start(props, &["--model-store", store, "--enable-model-api"])
}

async fn register(s: &Server, name: &str) -> (u16, serde_json::Value) {
    s.mgmt(
        Method::POST,
        &format!("/models?url={name}.mar&initial_workers=1&synchronous=true"),
    )
    .await
}

async fn ask(s: &Server, name: &str) -> serde_json::Value {
    let r = s.predict(name, "{}").await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn model_log(s: &Server) -> String {
    std::fs::read_to_string(s.path().join("logs/model_log.log")).unwrap_or_default()
}

/// Waits (bounded) until `cond` holds.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_requirements_are_installed_for_that_model_alone() {
    let store = tempfile::tempdir().unwrap();
    archive(store.path(), "withdeps", Some("inflection==0.5.1\n"), &[]);
    archive(store.path(), "plain", None, &[]);
    let s = start("install_py_dep_per_model=true", store.path());
    s.wait_healthy().await;

    let (status, body) = register(&s, "withdeps").await;
    assert_eq!(status, 200, "{body}\n{}", s.log());
    let out = ask(&s, "withdeps").await;
    assert_eq!(out["found"], true, "{out}");
    assert_eq!(out["camel"], "OxservePythonDeps");
    // Installed into a folder of its own: not the model folder, not the system's site-packages.
    let file = PathBuf::from(out["file"].as_str().unwrap());
    let model_dir = out["model_dir"].as_str().unwrap();
    assert!(!file.starts_with(model_dir), "{file:?} in {model_dir}");
    let deps_dir = file
        .ancestors()
        .find(|a| {
            a.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("oxserve-pydeps-"))
        })
        .unwrap_or_else(|| panic!("{file:?} is not in oxserve's dependency folder"))
        .to_path_buf();
    // pip's output is in the model's log.
    let log = model_log(&s);
    assert!(
        log.contains("pip-withdeps_1.0-stdout MODEL_LOG - Successfully installed inflection-0.5.1"),
        "{log}"
    );

    // Another model of the same server does not see those packages.
    let (status, body) = register(&s, "plain").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ask(&s, "plain").await["found"], false);

    // The packages go with the model.
    let (status, body) = s.mgmt(Method::DELETE, "/models/withdeps").await;
    assert_eq!(status, 200, "{body}");
    wait_until("the dependency folder removed", || !deps_dir.exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_installed_when_the_key_is_off() {
    let store = tempfile::tempdir().unwrap();
    archive(store.path(), "withdeps", Some("inflection==0.5.1\n"), &[]);
    let s = start("", store.path());
    s.wait_healthy().await;
    let (status, body) = register(&s, "withdeps").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ask(&s, "withdeps").await["found"], false);
    let log = model_log(&s);
    assert!(!log.contains("pip-withdeps"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_is_a_400_model_exception_and_nothing_is_registered() {
    let store = tempfile::tempdir().unwrap();
    archive(
        store.path(),
        "baddeps",
        Some("oxserve-no-such-package-for-this-test==0.0.1\n"),
        &[],
    );
    let s = start("install_py_dep_per_model=true", store.path());
    s.wait_healthy().await;
    let (status, body) = register(&s, "baddeps").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], 400);
    assert_eq!(body["type"], "ModelException");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Custom pip package installation failed for model baddeps: pip exit status: 1"
        ),
        "{message}"
    );
    // pip's own reason, not only that it failed.
    assert!(
        message.contains("oxserve-no-such-package-for-this-test"),
        "{message}"
    );
    let (status, _) = s.mgmt(Method::GET, "/models/baddeps").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_pointing_outside_the_archive_are_refused_before_pip_runs() {
    let store = tempfile::tempdir().unwrap();
    archive(store.path(), "outside", Some("six\n-e /etc\n"), &[]);
    archive(
        store.path(),
        "index",
        Some("--index-url https://pypi.example/simple\nsix\n"),
        &[],
    );
    let s = start("install_py_dep_per_model=true", store.path());
    s.wait_healthy().await;
    for (name, why) in [
        (
            "outside",
            "requirements.txt line 2: \"/etc\" is a local path outside the archive",
        ),
        (
            "index",
            "requirements.txt line 1: --index-url would replace the package index",
        ),
    ] {
        let (status, body) = register(&s, name).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["type"], "ModelException");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "Custom pip package installation failed for model {name}: {why}"
            )),
            "{message}"
        );
    }
    let log = model_log(&s);
    assert!(
        !log.contains("pip-outside") && !log.contains("pip-index"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_install_is_stopped_by_install_py_dep_timeout_with_its_processes() {
    let store = tempfile::tempdir().unwrap();
    let pidfile = store.path().join("backend.pid");
    // A local project of the archive whose in-tree build backend never returns: pip hangs in a
    // child process of its own, with no network involved.
    let backend = format!(
        "import os, time\n\
         def _hang(*args, **kwargs):\n    \
             with open({pidfile:?}, 'w') as f:\n        f.write(str(os.getpid()))\n    \
             time.sleep(3600)\n\
         get_requires_for_build_wheel = prepare_metadata_for_build_wheel = build_wheel = _hang\n",
        pidfile = pidfile.to_str().unwrap()
    );
    let pyproject = "[build-system]\nrequires = []\nbuild-backend = \"hang_backend\"\nbackend-path = [\".\"]\n\n[project]\nname = \"hangs\"\nversion = \"0.1\"\n";
    archive(
        store.path(),
        "hangs",
        Some("./hangs\n"),
        &[
            ("hangs/pyproject.toml", pyproject.as_bytes()),
            ("hangs/hang_backend.py", backend.as_bytes()),
        ],
    );
    let s = start(
        "install_py_dep_per_model=true\ninstall_py_dep_timeout=20",
        store.path(),
    );
    s.wait_healthy().await;
    let (status, body) = register(&s, "hangs").await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Custom pip package installation failed for model hangs: pip did not finish within 20 s (install_py_dep_timeout)"
        ),
        "{message}"
    );
    // The build backend pip started ran (it wrote its pid) and went with pip.
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the build backend ran before the time limit")
        .trim()
        .parse()
        .unwrap();
    wait_until("the build backend killed", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| {
                st.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    })
    .await;
}
