//! TorchServe's token authorization: key_file.json, bearer keys per API, the token API.

mod common;

use common::Server;
use std::os::unix::fs::PermissionsExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guard_each_api_and_rotate() {
    let mut s = Server::start("disable_token_authorization=false", &[]);
    s.wait_healthy().await; // /ping needs no key
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
    assert_eq!(predict(None).await, 401);
    assert_eq!(predict(Some(management.clone())).await, 401);
    assert_eq!(predict(Some(inference.clone())).await, 200);

    let models = |token: &str| {
        let r = s
            .client
            .get(format!("{}/models", s.management))
            .bearer_auth(token);
        async move { r.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(models(&inference).await, 401);
    assert_eq!(models(&management).await, 200);

    // The token API (with the API key only) replaces a key.
    let r = s
        .client
        .get(format!("{}/token?type=inference", s.management))
        .bearer_auth(&management)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
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
    assert_eq!(predict(Some(inference)).await, 401);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_by_default_and_by_flag() {
    let s = Server::start(
        "disable_token_authorization=false",
        &["--disable-token-auth"],
    );
    s.wait_healthy().await;
    assert!(!s.path().join("key_file.json").exists());
    assert_eq!(s.predict("demo", r#""good""#).await.status(), 200);
}
