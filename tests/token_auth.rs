//! TorchServe's token authorization: on by default, key_file.json, bearer keys per API, the token
//! API, the ways to turn it off (flag, config, `TS_DISABLE_TOKEN_AUTHORIZATION`) and their order.

mod common;

use common::Server;
use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_each_api_and_rotate() {
    // Nothing in the config: the default is on.
    let mut s = Server::start_secure("", &[], &[]);
    s.wait_healthy().await; // /ping needs no key
    assert!(
        s.log().contains("Token Authorization Enabled: keys are in")
            && s.log()
                .contains(&s.path().join("key_file.json").display().to_string()),
        "the start-up log says where the keys are: {}",
        s.log()
    );
    let file = s.path().join("key_file.json");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let key = |k: &str| keys[k]["key"].as_str().unwrap().to_string();
    let (inference, management, api) = (key("inference"), key("management"), key("API"));
    assert!(keys["inference"]["expiration time"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    let predict = |token: Option<String>| {
        let mut r = s
            .client
            .post(format!("{}/predictions/demo", s.inference))
            .header("content-type", "application/json")
            .body(r#""good""#);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(predict(None).await, 400);
    assert_eq!(predict(Some(management.clone())).await, 400);
    assert_eq!(predict(Some(inference.clone())).await, 200);

    let models = |token: &str| {
        let r = s
            .client
            .get(format!("{}/models", s.management))
            .bearer_auth(token);
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(models(&inference).await, 400);
    assert_eq!(models(&management).await, 200);

    // The token API (with the API key only) replaces a key.
    let r = s
        .client
        .get(format!("{}/token?type=inference", s.management))
        .bearer_auth(&management)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .get(format!("{}/token?type=inference", s.management))
        .bearer_auth(&api)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fresh: serde_json::Value = r.json().await.unwrap();
    let new_inference = fresh["inference"]["key"].as_str().unwrap().to_string();
    assert_ne!(new_inference, inference);
    assert_eq!(predict(Some(inference)).await, 400);
    assert_eq!(predict(Some(new_inference.clone())).await, 200);
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(on_disk["inference"]["key"], new_inference.as_str());
    let r = s
        .client
        .get(format!("{}/token?type=everything", s.management))
        .bearer_auth(&api)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // The key file goes away with the server.
    assert!(s.stop().success());
    assert!(!file.exists());
}

/// Whether `GET /models` on the management API answers without a key.
async fn open_management(s: &Server) -> bool {
    let r = s
        .client
        .get(format!("{}/models", s.management))
        .send()
        .await
        .unwrap();
    match r.status().as_u16() {
        200 => true,
        400 => {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["code"], 400);
            assert_eq!(body["type"], "InvalidKeyException");
            false
        }
        other => panic!("unexpected status {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turned_off_by_flag_or_config() {
    let s = Server::start_secure("", &["--disable-token-auth"], &[]);
    s.wait_healthy().await;
    assert!(!s.path().join("key_file.json").exists());
    assert!(
        s.log().contains("Token Authorization Disabled"),
        "{}",
        s.log()
    );
    assert_eq!(s.predict("demo", r#""good""#).await.status(), 200);
    assert!(open_management(&s).await);
    drop(s);

    let s = Server::start_secure("disable_token_authorization=true", &[], &[]);
    s.wait_healthy().await;
    assert!(!s.path().join("key_file.json").exists());
    assert!(open_management(&s).await);
}

/// TorchServe's order (its test_priority_env and test_priority_env_cmd): with
/// enable_envvars_config, `TS_DISABLE_TOKEN_AUTHORIZATION` beats the file and the flag; without
/// it, the variable is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_beats_flag_and_file() {
    let env_off = [("TS_DISABLE_TOKEN_AUTHORIZATION", "true")];
    let env_on = [("TS_DISABLE_TOKEN_AUTHORIZATION", "false")];

    let s = Server::start_secure(
        "enable_envvars_config=true\ndisable_token_authorization=false",
        &[],
        &env_off,
    );
    s.wait_healthy().await;
    assert!(open_management(&s).await);
    drop(s);

    let s = Server::start_secure(
        "enable_envvars_config=true",
        &["--disable-token-auth"],
        &env_on,
    );
    s.wait_healthy().await;
    assert!(!open_management(&s).await);
    assert!(s.path().join("key_file.json").exists());
    drop(s);

    let s = Server::start_secure("", &[], &env_off);
    s.wait_healthy().await;
    assert!(
        !open_management(&s).await,
        "TS_* variables apply only with enable_envvars_config=true"
    );
}

/// `token_expiration_min` takes fractions, as TorchServe's does: a key expires after that long
/// and the token API hands out a fresh one that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_expiration_expires_keys() {
    // 0.02 minutes: 1.2 s.
    let s = Server::start_secure("token_expiration_min=0.02", &[], &[]);
    s.wait_healthy().await;
    let management = s.key("management");
    let status = |key: String| {
        let r = s
            .client
            .get(format!("{}/models", s.management))
            .bearer_auth(key);
        async move { r.send().await.unwrap() }
    };
    // Wait for the expiry itself (no fixed sleep): poll until the key stops working.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let expired = loop {
        let r = status(management.clone()).await;
        if r.status() == 400 {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        assert_eq!(r.status(), 200);
        assert!(
            std::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        expired["message"].as_str().unwrap().contains("expired"),
        "{expired}"
    );
    let r = s
        .client
        .post(format!("{}/token?type=management", s.management))
        .bearer_auth(s.key("API"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let fresh = s.key("management");
    assert_ne!(fresh, management);
    assert_eq!(status(fresh).await.status(), 200);
}

#[test]
fn bad_expiration_stops_start_up() {
    for bad in ["0", "-5", "forever", "NaN"] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.properties");
        std::fs::write(&config, format!("token_expiration_min={bad}\n")).unwrap();
        let out = std::process::Command::new(common::BIN)
            .args(["start", "--foreground", "--ts-config"])
            .arg(&config)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("token_expiration_min"), "{bad}: {err}");
        assert!(!dir.path().join("key_file.json").exists());
    }
}

/// The metrics listener is not behind the token, as in TorchServe 0.12 (its metrics connector
/// has no TokenAuthorizationHandler): Prometheus scrapes it without a key; /ping needs none either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_ping_need_no_key() {
    let s = Server::start_secure("", &[], &[]);
    s.wait_healthy().await;
    let r = s
        .client
        .get(format!("{}/metrics", s.metrics_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!open_management(&s).await);
}

/// At a terminal (`cargo run`, `oxserve start --foreground` by hand) the server prints the first
/// prediction with the inference key written out, ready to paste; the log files never get the key.
/// The terminal is a real pseudo-terminal made by util-linux `script`; Ctrl-C stops the server.
#[test]
fn a_terminal_gets_a_ready_to_paste_curl() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.properties"),
        "inference_address=http://127.0.0.1:0\nmanagement_address=http://127.0.0.1:0\nmetrics_address=http://127.0.0.1:0\ngrpc_inference_port=0\ngrpc_management_port=0\n",
    )
    .unwrap();
    let mut child = std::process::Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "exec {} start --foreground --ts-config config.properties",
            common::BIN
        ))
        .arg("/dev/null")
        .current_dir(dir.path())
        .env("LOG_LOCATION", dir.path().join("logs"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("util-linux script");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let curl = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(line) => {
                if let Some(rest) = line.trim_end().strip_prefix("First prediction: ") {
                    break rest.to_string();
                }
                seen.push(line);
            }
            Err(e) => {
                let _ = child.kill();
                panic!("no first-prediction line ({e}): {}", seen.join("\n"));
            }
        }
    };
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("key_file.json")).unwrap())
            .unwrap();
    let key = keys["inference"]["key"].as_str().unwrap();
    assert!(
        curl.starts_with(&format!(
            "curl -H 'Authorization: Bearer {key}' -X POST http://127.0.0.1:"
        )) && curl.ends_with("/predictions/demo -d 'I love this'"),
        "{curl}"
    );
    // Ctrl-C at the terminal stops the server cleanly.
    child.stdin.as_mut().unwrap().write_all(b"\x03").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!dir.path().join("key_file.json").exists());
    for file in ["ts_log.log", "model_log.log", "access_log.log"] {
        let text = std::fs::read_to_string(dir.path().join("logs").join(file)).unwrap_or_default();
        assert!(!text.contains(key), "the key reached {file}");
    }
    let ts_log = std::fs::read_to_string(dir.path().join("logs/ts_log.log")).unwrap();
    assert!(ts_log.contains("jq -r .inference.key"), "{ts_log}");
}
