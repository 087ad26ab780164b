//! Configuration and the command line: bad values stop start-up with one clear line.

mod common;

use common::{Server, BIN};
use std::process::Command;

fn start_expecting_failure(props: &str, args: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(&config, props).unwrap();
    let out = Command::new(BIN)
        .args(["start", "--foreground", "--ts-config"])
        .arg(&config)
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_values_name_the_key_and_value() {
    for (props, key, value) in [
        (
            "inference_address=http://127.0.0.1:80x\n",
            "inference_address",
            "80x",
        ),
        ("metrics_mode=statsd\n", "metrics_mode", "statsd"),
        ("job_queue_size=lots\n", "job_queue_size", "lots"),
        ("enable_metrics_api=yes\n", "enable_metrics_api", "yes"),
        ("histogram_buckets=1,0.5\n", "histogram_buckets", "1,0.5"),
        (
            "number_of_netty_threads=-1\n",
            "number_of_netty_threads",
            "-1",
        ),
        (
            "number_of_netty_threads=100000\n",
            "number_of_netty_threads",
            "100000",
        ),
    ] {
        let (code, err) = start_expecting_failure(props, &[]);
        assert_eq!(code, 2, "{props}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(key) && err.contains(value), "{props}: {err}");
    }
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let props = format!(
        "inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n"
    );
    let (code, err) = start_expecting_failure(&props, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("inference_address") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(err.to_lowercase().contains("in use"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_bad_metrics_yaml_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("metrics.yaml");
    std::fs::write(&yaml, "ts_metrics:\n  counter:\n    - name: Dup\n      unit: Count\n    - name: Dup\n      unit: Count\n").unwrap();
    let props = format!(
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\nmetrics_config={}\n",
        yaml.display()
    );
    let (code, err) = start_expecting_failure(&props, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("metrics.yaml") && err.contains("duplicate") && err.contains("Dup"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_warn_and_env_overrides_apply() {
    let s = Server::start_with_env(
        "enable_envvars_config=true\nno_such_key=1",
        &[],
        &[("TS_JOB_QUEUE_SIZE", "7")],
    );
    s.wait_healthy().await;
    let (_, d) = s.mgmt(reqwest::Method::GET, "/models/demo").await;
    assert_eq!(d[0]["jobQueueStatus"]["remainingCapacity"], 7);
    assert!(s.log().contains("no_such_key"), "{}", s.log());
}

/// TorchServe's frontend thread count sets the runtime's worker threads (its log line reads
/// the runtime, not the key), from the file or from TS_NUMBER_OF_NETTY_THREADS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_of_netty_threads_sets_the_frontend_threads() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (props, env, want) in [
        ("number_of_netty_threads=1", vec![], 1),
        // TorchServe's default value: one per CPU.
        ("number_of_netty_threads=0", vec![], cpus),
        (
            "enable_envvars_config=true\nnumber_of_netty_threads=1",
            vec![("TS_NUMBER_OF_NETTY_THREADS", "3")],
            3,
        ),
    ] {
        let s = Server::start_with_env(props, &[], &env);
        s.wait_healthy().await;
        let r = s.predict("demo", r#"{"text":"great"}"#).await;
        assert_eq!(r.status(), 200);
        let line = format!("Frontend threads: {want} (number_of_netty_threads)");
        assert!(
            s.log().contains(&line),
            "{props}: no {line:?} in\n{}",
            s.log()
        );
    }
}

#[test]
fn start_status_stop_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("oxserve.pid");
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .env("OXSERVE_PID_FILE", &pid_file)
            .env("LOG_LOCATION", dir.path().join("logs"))
            .output()
            .unwrap()
    };
    let out = run(&["start", "--ts-config", config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Token authorization is on by default: `oxserve start` says where the keys are and how to
    // send the first prediction with them, without writing a key to the terminal or the log.
    let said = String::from_utf8_lossy(&out.stdout);
    let key_file = dir.path().join("key_file.json");
    assert!(
        said.contains(&format!("keys in {}", key_file.display())),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "curl -H \"Authorization: Bearer $(jq -r .inference.key {})\"",
            key_file.display()
        )) && said.contains("/predictions/demo"),
        "{said}"
    );
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    let inference_key = keys["inference"]["key"].as_str().unwrap();
    assert!(!said.contains(inference_key), "{said}");
    // Port 0 in the config: the lines name the ports the OS chose, so the printed URL answers.
    assert!(!said.contains(":0/") && !said.contains(":0,"), "{said}");
    let url = said
        .split_whitespace()
        .find(|w| w.contains("/predictions/demo"))
        .map(|w| w.trim_matches(|c| c == '"' || c == '\''))
        .expect("a prediction URL")
        .to_string();
    let answer = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", &format!("Authorization: Bearer {inference_key}")])
        .args(["--retry", "50", "--retry-connrefused", "--retry-delay", "1"])
        .args(["-d", "{\"text\": \"good\"}", &url])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&answer.stdout).to_string();
    // (curl --retry also retries a 503 while the demo worker starts.)
    assert_eq!(code, "200", "{url}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = run(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pid.to_string()));
    let log_path = dir.path().join("logs/oxserve.log");
    for _ in 0..200 {
        if std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("oxserve listening")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = run(&["stop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !std::fs::read_to_string(&log_path)
            .unwrap()
            .contains(inference_key),
        "a key reached the log"
    );
    assert!(!key_file.exists(), "the key file outlived the server");
    assert!(unsafe { libc::kill(pid, 0) } != 0, "server still running");
    let out = run(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("oxserve listening"), "{log}");
    // A detached server writes TorchServe's log files, not a console copy that nothing rotates.
    let ts_log = std::fs::read_to_string(dir.path().join("logs/ts_log.log")).unwrap();
    assert!(ts_log.contains(" - Model server started."), "{ts_log}");
    assert!(ts_log.contains("shutting down"), "{ts_log}");
    assert!(!log.contains("shutting down"), "{log}");
    assert!(dir.path().join("logs/access_log.log").is_file());
    assert!(dir.path().join("logs/model_log.log").is_file());
}

#[test]
fn min_workers_above_max_workers_stops_start_up() {
    let (code, err) = start_expecting_failure(
        "models={\"m\": {\"1.0\": {\"marName\": \"m.mar\", \"minWorkers\": 3, \"maxWorkers\": 1}}}\n",
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("models") && err.contains("minWorkers 3") && err.contains("maxWorkers 1"),
        "{err}"
    );
}

#[test]
fn background_start_reports_a_failed_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        format!("inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:{port}\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["start", "--ts-config", config.to_str().unwrap()])
        .current_dir(dir.path())
        .env("OXSERVE_PID_FILE", dir.path().join("pid"))
        .env("LOG_LOCATION", dir.path().join("logs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("management_address") && err.contains(&port.to_string()),
        "{err}"
    );
    assert!(!dir.path().join("pid").exists());
}

/// A model store that is not a folder stops start-up with TorchServe's message, in the foreground
/// and through `oxserve start` in the background, and leaves no key file behind.
#[test]
fn a_missing_model_store_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.properties");
    std::fs::write(
        &config,
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n",
    )
    .unwrap();
    let missing = dir.path().join("no-such-store");
    let a_file = dir.path().join("store.txt");
    std::fs::write(&a_file, "not a folder").unwrap();
    for store in [&missing, &a_file] {
        for background in [false, true] {
            let mut args = vec!["start"];
            if !background {
                args.push("--foreground");
            }
            let out = Command::new(BIN)
                .args(&args)
                .arg("--ts-config")
                .arg(&config)
                .arg("--model-store")
                .arg(store)
                .current_dir(dir.path())
                .env("OXSERVE_PID_FILE", dir.path().join("pid"))
                .env("LOG_LOCATION", dir.path().join("logs"))
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(1),
                "{store:?} background={background}"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!(
                    "--model-store directory not found: {}",
                    store.display()
                )),
                "{err}"
            );
            assert!(!dir.path().join("key_file.json").exists());
            assert!(!dir.path().join("pid").exists());
        }
    }
}
