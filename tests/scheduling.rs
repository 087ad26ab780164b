//! The scheduler over the real binary: panicking backends, true worker states, /ping's three
//! answers, and autoscaling under real load.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{demo_manifest, write_mar, Server};
use reqwest::Method;

/// Polls `f` until it returns Some, failing with `what` and the server log after 60 s.
async fn eventually<T, F, Fut>(s: &Server, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ping(s: &Server) -> (u16, String) {
    let (code, v) = s.get_json(format!("{}/ping", s.inference)).await;
    (code, v["status"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_inference_answers_500_and_the_server_keeps_serving() {
    let s = Server::start_with_env(
        "default_workers_per_model=1",
        &[],
        &[("OXSERVE_DEMO_PANIC_WORD", "kaboom")],
    );
    s.wait_healthy().await;
    let r = s.predict("demo", r#"{"text": "kaboom"}"#).await;
    assert_eq!(r.status(), 500);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["code"], 500);
    assert_eq!(v["type"], "InternalServerException");
    assert!(v["message"].as_str().unwrap().contains("panic"), "{v}");
    // The backend is replaced; the next request waits for it and is served.
    let r = s.predict("demo", r#"{"text": "a great day"}"#).await;
    assert_eq!(r.status(), 200);
    s.wait_healthy().await;
    // Both requests were counted, the failed one as a 5xx.
    let p = r#"ts_inference_requests_total{model_name="demo",model_version="default""#;
    assert_eq!(s.sample(p).await, Some(2.0));
    let p = r#"oxserve_model_responses_total{model_name="demo",model_version="1.0",status_class="5xx"}"#;
    assert_eq!(s.sample(p).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_model_load_is_a_failed_load_that_is_retried() {
    let s = Server::start_with_env(
        "default_workers_per_model=1",
        &[],
        &[("OXSERVE_DEMO_PANIC_LOADS", "1")],
    );
    s.wait_healthy().await;
    let (_, d) = s.mgmt(Method::GET, "/models/demo").await;
    assert_eq!(d[0]["workers"][0]["status"], "READY", "{d}");
    assert_eq!(s.predict("demo", r#"{"text": "good"}"#).await.status(), 200);
    assert!(s.log().contains("model load panicked"), "{}", s.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_load_is_shown_in_backoff_without_a_pid() {
    let s = Server::start_with_env(
        "default_workers_per_model=1",
        &[],
        &[("OXSERVE_DEMO_PANIC_LOADS", "1000000")],
    );
    let srv = &s;
    let w = eventually(&s, "worker in BACKOFF", || async move {
        let (_, d) = srv.mgmt(Method::GET, "/models/demo").await;
        let w = d[0]["workers"][0].clone();
        (w["status"] == "BACKOFF").then_some(w)
    })
    .await;
    assert_eq!(w["pid"], -1, "{w}");
    assert_eq!(w["memoryUsage"], 0, "{w}");
    assert_eq!(ping(&s).await, (500, "Unhealthy".to_string()));
    let backoff = r#"oxserve_workers{model_name="demo",model_version="1.0",state="backoff"}"#;
    assert_eq!(s.sample(backoff).await, Some(1.0));
    let ready = r#"oxserve_workers{model_name="demo",model_version="1.0",state="ready"}"#;
    assert_eq!(s.sample(ready).await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_says_partial_healthy_while_some_minimums_are_not_met() {
    let store = tempfile::tempdir().unwrap();
    common::model_folder(
        store.path(),
        "broken",
        "h.py",
        None,
        &[("h.py", "import no_such_module_here\n")],
    );
    write_mar(store.path(), "good.mar", &demo_manifest("good", "1.0"), &[]);
    let s = Server::start_store(
        "default_workers_per_model=1",
        store.path(),
        "good.mar",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    assert_eq!(ping(&s).await, (200, "Healthy".to_string()));
    let (code, _) = s
        .mgmt(Method::POST, "/models?url=broken&synchronous=false")
        .await;
    assert_eq!(code, 202);
    // One of the two minimums is met: TorchServe's "Partial Healthy", with 500 for balancers.
    assert_eq!(ping(&s).await, (500, "Partial Healthy".to_string()));
    let srv = &s;
    eventually(&s, "broken worker in BACKOFF", || async move {
        let (_, d) = srv.mgmt(Method::GET, "/models/broken").await;
        (d[0]["workers"][0]["status"] == "BACKOFF" && d[0]["workers"][0]["pid"] == -1).then_some(())
    })
    .await;
    // None of the minimums met: Unhealthy.
    let (code, _) = s
        .mgmt(
            Method::PUT,
            "/models/good?min_worker=0&max_worker=0&synchronous=true",
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(ping(&s).await, (500, "Unhealthy".to_string()));
    // Without the broken model, every (zero) minimum is met.
    assert_eq!(s.mgmt(Method::DELETE, "/models/broken").await.0, 200);
    assert_eq!(ping(&s).await, (200, "Healthy".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_adds_workers_under_load_and_removes_them_when_idle() {
    let store = tempfile::tempdir().unwrap();
    write_mar(store.path(), "auto.mar", &demo_manifest("auto", "1.0"), &[]);
    let props = concat!(
        "models={\"auto\": {\"1.0\": {\"marName\": \"auto.mar\", \"minWorkers\": 1, \"maxWorkers\": 3}}}\n",
        "autoscale_interval_ms=50\nautoscale_up_samples=2\nautoscale_down_samples=6\n",
    );
    let s = Arc::new(Server::start(
        props,
        &["--model-store", store.path().to_str().unwrap()],
    ));
    s.wait_healthy().await;
    let workers = |d: &serde_json::Value| d[0]["workers"].as_array().map_or(0, |w| w.len());
    let (_, d) = s.mgmt(Method::GET, "/models/auto").await;
    assert_eq!((workers(&d), d[0]["minWorkers"].clone()), (1, 1.into()));

    // Eight clients, each request holding a worker for 100 ms: the queue stays long.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (s, stop, served) = (s.clone(), stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = s
                    .predict("auto", r#"{"text": "ok", "sleep_ms": 100}"#)
                    .await;
                assert_eq!(r.status(), 200);
                served.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let most = AtomicUsize::new(0);
    let (srv, most_ref) = (&*s, &most);
    eventually(&s, "autoscaled to 3 workers", || async move {
        let (_, d) = srv.mgmt(Method::GET, "/models/auto").await;
        most_ref.fetch_max(workers(&d), Ordering::Relaxed);
        (workers(&d) == 3).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(most.into_inner() <= 3, "never above maxWorkers");
    let up = r#"oxserve_worker_scale_events_total{model_name="auto",model_version="1.0",direction="up",trigger="autoscale"}"#;
    assert_eq!(s.sample(up).await, Some(2.0));
    // Idle again: back to minWorkers, one step per idle window, and never below.
    eventually(&s, "scaled back to 1 worker", || async move {
        let (_, d) = srv.mgmt(Method::GET, "/models/auto").await;
        (workers(&d) == 1).then_some(())
    })
    .await;
    let down = r#"oxserve_worker_scale_events_total{model_name="auto",model_version="1.0",direction="down",trigger="autoscale"}"#;
    assert_eq!(s.sample(down).await, Some(2.0));
    let total = r#"ts_inference_requests_total{model_name="auto",model_version="default""#;
    assert_eq!(
        s.sample(total).await,
        Some(served.load(Ordering::Relaxed) as f64),
        "every request counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_counts_have_a_ceiling() {
    // The ceiling is max_workers_per_model, itself at most the scheduler's 1024.
    let s = Server::start(
        "default_workers_per_model=1\nmax_workers_per_model=1024",
        &["--enable-model-api"],
    );
    s.wait_healthy().await;
    for path in [
        "/models/demo?min_worker=100000&max_worker=100000",
        "/models/demo?min_worker=1&max_worker=4294967295",
        "/models/demo?min_worker=1025",
    ] {
        let (code, e) = s.mgmt(Method::PUT, path).await;
        assert_eq!(code, 400, "{path}: {e}");
        assert!(e["message"].as_str().unwrap().contains("1024"), "{e}");
    }
    let (code, e) = s
        .mgmt(Method::POST, "/models?url=x.mar&initial_workers=5000")
        .await;
    assert_eq!(code, 400, "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("initial_workers"),
        "{e}"
    );
    // The refused requests changed nothing.
    let (_, d) = s.mgmt(Method::GET, "/models/demo").await;
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1);
    assert_eq!(d[0]["maxWorkers"], 1);
}
