//! The live dashboard end to end: a real server under real traffic, the page in a real headless
//! Chromium (every panel must have drawn points for the model), the JSON endpoints' limits, and
//! `oxserve top` against the same server.

mod common;

use common::Server;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "dash-s3cret";

/// Keeps requests flowing: successes, a 404, a 400 from the model and, with one worker and a
/// one-slot queue, a burst that gets a 503. Stops after `limit`.
fn traffic(s: &Server, limit: Duration) -> tokio::task::JoinHandle<()> {
    let (client, inference) = (s.client.clone(), s.inference.clone());
    tokio::spawn(async move {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let post = |body: &'static str, model: &'static str| {
                client
                    .post(format!("{inference}/predictions/{model}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
            };
            for _ in 0..5 {
                let _ = post(r#"{"text": "good"}"#, "demo").await;
            }
            let _ = post("{}", "nope").await;
            let _ = post(r#"{"nope": 1}"#, "demo").await;
            let burst: Vec<_> = (0..3)
                .map(|_| post(r#"{"text": "ok", "sleep_ms": 30}"#, "demo"))
                .collect();
            for b in burst {
                let _ = b.await;
            }
        }
    })
}

async fn history(s: &Server, query: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut r = s
        .client
        .get(format!("{}/dashboard/api/history{query}", s.metrics_url()));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Waits until the history tracks the demo model (it is sampled once a second, so a model appears
/// within a second or so of its registration).
async fn wait_for_demo(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, view) = history(s, "", Some(TOKEN)).await;
        if status == 200 && view["model"] == "demo" {
            return;
        }
        assert!(Instant::now() < deadline, "{status} {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Non-null points of every series of every panel: (panel id, series label, points).
fn points(view: &serde_json::Value) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    for p in view["panels"].as_array().unwrap() {
        for s in p["series"].as_array().unwrap() {
            let n = s["values"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| !v.is_null())
                .count();
            out.push((
                p["id"].as_str().unwrap().to_string(),
                s["label"].as_str().unwrap().to_string(),
                n,
            ));
        }
    }
    out
}

/// Runs Debian's chromium headless on `url` with these extra arguments; returns stdout.
fn chromium(url: &str, profile: &Path, extra: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1400,1250",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium (Debian package `chromium`) runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The chart state the page publishes in `<pre id="chart-state">`.
fn chart_state(dom: &str) -> Option<serde_json::Value> {
    let start = dom.find("id=\"chart-state\"")?;
    let text = &dom[start..];
    let text = &text[text.find('>')? + 1..];
    let text = &text[..text.find("</pre>")?];
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&text).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_draws_the_models_data_in_headless_chromium() {
    let s = Server::start(
        &format!("metric_time_interval=1\ndefault_workers_per_model=1\njob_queue_size=1\nmetrics_auth_token={TOKEN}"),
        &[],
    );
    s.wait_healthy().await;
    wait_for_demo(&s).await;
    let load = traffic(&s, Duration::from_secs(150));

    // The data the page will draw: wait until every series of every panel has a few points.
    let deadline = Instant::now() + Duration::from_secs(90);
    let view = loop {
        let (status, view) = history(&s, "?model=demo&range=300", Some(TOKEN)).await;
        assert_eq!(status, 200, "{view}");
        let p = points(&view);
        if !p.is_empty() && p.iter().all(|(_, _, n)| *n >= 3) {
            break view;
        }
        assert!(Instant::now() < deadline, "panels without data: {p:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ids: Vec<&str> = view["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    for want in [
        "throughput",
        "latency",
        "quantiles",
        "errors",
        "queue",
        "workers",
        "host",
    ] {
        assert!(ids.contains(&want), "{want} in {ids:?}");
    }
    // Errors were driven, so the error panel has a non-zero point.
    let errors = view["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "errors")
        .unwrap();
    assert!(
        errors["series"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["values"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v.as_f64().is_some_and(|v| v > 0.0))),
        "{errors}"
    );

    // The page, with the token in the URL fragment (browsers do not send fragments).
    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/dashboard#model=demo&token={TOKEN}", s.metrics_url());
    let mut state = None;
    for budget in [5000, 10000, 20000] {
        let (u, p) = (url.clone(), profile.path().to_path_buf());
        let dom = tokio::task::spawn_blocking(move || {
            chromium(
                &u,
                &p,
                &[&format!("--virtual-time-budget={budget}"), "--dump-dom"],
            )
        })
        .await
        .unwrap();
        let st = chart_state(&dom).unwrap_or_default();
        let drawn = st["panels"].as_array().is_some_and(|ps| {
            !ps.is_empty()
                && ps.iter().all(|p| {
                    p["draws"].as_u64() > Some(0)
                        && p["series"]
                            .as_array()
                            .is_some_and(|ss| ss.iter().all(|s| s["points"].as_u64() > Some(0)))
                })
        });
        if drawn {
            state = Some(st);
            break;
        }
    }
    let state = state.expect("the page drew every panel within Chromium's time budgets");
    assert_eq!(state["model"], "demo");
    let drawn: Vec<&str> = state["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    // Every panel the server lists for the model is on the page, each with drawn points.
    for id in &ids {
        assert!(drawn.contains(id), "{id} drawn: {state}");
    }

    // A screenshot of the page (docs/dashboard.png is one of these).
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let (u, p, sh) = (url.clone(), profile.path().to_path_buf(), shot.clone());
    tokio::task::spawn_blocking(move || {
        chromium(
            &u,
            &p,
            &[
                "--virtual-time-budget=5000",
                &format!("--screenshot={}", sh.display()),
            ],
        )
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    // Charts full of lines compress worse than a blank page (a few KB).
    assert!(png.len() > 30_000, "{} bytes", png.len());
    println!("screenshot: {}", shot.display());
    load.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_endpoints_follow_the_token_rule_and_refuse_bad_input() {
    let s = Server::start(&format!("metrics_auth_token={TOKEN}"), &[]);
    s.wait_healthy().await;
    let m = s.metrics_url();
    // The page and its assets hold no data: public, so a browser can load them.
    let r = s.client.get(format!("{m}/dashboard")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("chart-state"));
    let r = s
        .client
        .get(format!("{m}/dashboard/uPlot.iife.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("uPlot"));
    // GET / leads to the page; OPTIONS / is still the OpenAPI document.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects.get(format!("{m}/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/dashboard");
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, format!("{m}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("openapi"));

    // The data needs the token, like /metrics.
    for path in ["/dashboard/api/history", "/dashboard/api/latest"] {
        for token in [None, Some("wrong")] {
            let mut req = s.client.get(format!("{m}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} {token:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["type"], "UnauthorizedException", "{body}");
        }
    }
    wait_for_demo(&s).await;
    let (status, view) = history(&s, "", Some(TOKEN)).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["models"], serde_json::json!(["demo"]));
    assert_eq!(view["range_s"], 300);

    // Bad input: a clear error in TorchServe's shape, never a panic.
    let long = "x".repeat(4096);
    let cases: [(&str, u16, &str); 7] = [
        ("?range=abc", 400, "BadRequestException"),
        ("?range=1000", 400, "BadRequestException"),
        ("?range=99999999999999999999", 400, "BadRequestException"),
        ("?model=nope", 404, "ModelNotFoundException"),
        ("?model=%zz", 400, "BadRequestException"),
        ("?colour=red", 400, "BadRequestException"),
        (&format!("?model={long}"), 404, "ModelNotFoundException"),
    ];
    for (query, code, kind) in cases {
        let (status, body) = history(&s, query, Some(TOKEN)).await;
        assert_eq!(status, code, "{query}: {body}");
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["type"], kind, "{body}");
    }
    // Still serving.
    let (status, _) = history(&s, "?range=3600", Some(TOKEN)).await;
    assert_eq!(status, 200);

    // enable_dashboard=false: no page, no history, and GET / is what it is without a dashboard
    // (405: only OPTIONS / is served there).
    let off = Server::start("enable_dashboard=false", &[]);
    off.wait_healthy().await;
    let r = off.client.get(off.metrics_url()).send().await.unwrap();
    assert_eq!(r.status(), 405);
    for path in ["/dashboard", "/dashboard/api/latest"] {
        let r = off
            .client
            .get(format!("{}{path}", off.metrics_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

fn top(args: &[&str]) -> std::process::Output {
    Command::new(common::BIN)
        .arg("top")
        .args(args)
        .env_remove("OXSERVE_METRICS_TOKEN")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_prints_the_servers_numbers() {
    let s = Server::start(
        &format!("metric_time_interval=1\ndefault_workers_per_model=1\nmetrics_auth_token={TOKEN}"),
        &[],
    );
    s.wait_healthy().await;
    let load = traffic(&s, Duration::from_secs(120));
    // Wait until the server has a request rate for the model.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = s
            .client
            .get(format!("{}/dashboard/api/latest", s.metrics_url()))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        if v["models"]["demo"]["req_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no rate yet: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = s.metrics_url();
    let out =
        tokio::task::spawn_blocking(move || top(&["--once", "--url", &url, "--token", TOKEN]))
            .await
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("oxserve top"), "{text}");
    assert!(text.contains("CPU ") && text.contains("REQ/S"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("demo "))
        .unwrap_or_else(|| panic!("no demo row: {text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    let rate: f64 = cols[1].parse().unwrap();
    assert!(rate > 0.0, "{row}");
    // Queue depth/capacity (job_queue_size 100) and workers ready/busy/all (one worker).
    assert!(cols[6].ends_with("/100"), "{row}");
    assert!(cols[7].ends_with("/1"), "{row}");

    // Without the token: a clear refusal and a non-zero exit.
    let url = s.metrics_url();
    let out = tokio::task::spawn_blocking(move || top(&["--once", "--url", &url]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("--token"), "{err}");

    // The address and token from a config file, as `oxserve start` reads them.
    let addr = s.metrics_url().trim_start_matches("http://").to_string();
    let config = s.path().join("top.properties");
    std::fs::write(
        &config,
        format!("metrics_address=http://{addr}\nmetrics_auth_token={TOKEN}\n"),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        top(&["--once", "--ts-config", config.to_str().unwrap()])
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.lines().any(|l| l.starts_with("demo ")), "{text}");

    // Nobody listening: a clear error.
    let out = tokio::task::spawn_blocking(|| top(&["--once", "--url", "http://127.0.0.1:9"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    load.abort();
}

/// tmux on a private socket (so it never touches anyone's tmux server).
fn tmux(socket: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .arg("-L")
        .arg(socket)
        .args(args)
        .env_remove("TMUX")
        .output()
        .expect("tmux (Debian package `tmux`) runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_redraws_in_a_terminal_and_quits_on_q() {
    let s = Server::start(
        &format!("metric_time_interval=1\ndefault_workers_per_model=1\nmetrics_auth_token={TOKEN}"),
        &[],
    );
    s.wait_healthy().await;
    let load = traffic(&s, Duration::from_secs(120));
    let socket = format!("oxserve-top-test-{}", std::process::id());
    // Whatever happens below, the private tmux server (and top in it) goes away with the test.
    struct KillTmux(String);
    impl Drop for KillTmux {
        fn drop(&mut self) {
            let _ = tmux(&self.0, &["kill-server"]);
        }
    }
    let _guard = KillTmux(socket.clone());
    let command = format!(
        "{} top --url {} --token {TOKEN}",
        common::BIN,
        s.metrics_url()
    );
    let out = tmux(
        &socket,
        &[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "150",
            "-y",
            "30",
            &command,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The screen fills in and keeps being redrawn: the demo row's numbers change between frames.
    let capture = || {
        String::from_utf8_lossy(&tmux(&socket, &["capture-pane", "-p", "-t", "top"]).stdout)
            .into_owned()
    };
    let demo_row = |screen: &str| {
        screen
            .lines()
            .find(|l| l.starts_with("demo "))
            .map(String::from)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first: Option<String> = None;
    let screen = loop {
        let screen = capture();
        let row = demo_row(&screen);
        let rate = row
            .as_deref()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok());
        if let (Some(row), Some(rate)) = (row, rate) {
            if rate > 0.0 {
                match &first {
                    None => first = Some(row),
                    Some(f) if *f != row => break screen,
                    Some(_) => {}
                }
            }
        }
        assert!(Instant::now() < deadline, "top did not redraw: {screen}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(screen.starts_with("oxserve top"), "{screen}");
    assert!(screen.contains("q: quit"), "{screen}");
    // q quits, and the session (whose only program is top) ends with it.
    tmux(&socket, &["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tmux(&socket, &["has-session", "-t", "top"])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "top did not quit: {}", capture());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.abort();
}
