//! `oxserve top`: the dashboard's numbers in a terminal, refreshed every second.
//!
//! It reads `GET /dashboard/api/latest` from a running server's metrics listener, so the numbers
//! are the page's (same windows, same quantile rule) and top computes nothing itself. `--once`
//! prints one plain-text frame and exits (scripts, tests); otherwise it draws on the terminal's
//! alternate screen until q, Esc or Ctrl-C. TorchServe has no such command.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// What to talk to and how.
#[derive(Debug, Clone)]
pub struct TopOptions {
    /// Base URL of the metrics listener, e.g. `http://127.0.0.1:8082`.
    pub url: String,
    /// Bearer token (metrics_auth_token), if the server wants one.
    pub token: Option<String>,
    /// Print one frame and exit.
    pub once: bool,
}

/// `/dashboard/api/latest`, as top reads it (unknown fields ignored, missing ones empty).
#[derive(Debug, Default, Deserialize)]
pub struct Latest {
    #[serde(default)]
    pub host: BTreeMap<String, Option<f64>>,
    #[serde(default)]
    pub gpus: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    #[serde(default)]
    pub models: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    #[serde(default)]
    pub untracked_models: usize,
}

/// The largest answer top accepts (a frame for many models is a few hundred KB at most).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Why top cannot show the server: the fetch failed (shown on screen, retried every second), or
/// the terminal cannot be driven (top ends).
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("reading {url}: {source}")]
    Read { url: String, source: reqwest::Error },
    #[error("{url} answered {len} bytes, more than top reads")]
    TooLarge { url: String, len: usize },
    /// An error status; `message` is the server's (or the body's start), `hint` what may fix it.
    #[error("{url}: {status}: {message}{hint}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        message: String,
        hint: &'static str,
    },
    #[error("{url} answered something else than the dashboard's data: {source}")]
    NotData {
        url: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    Client(reqwest::Error),
    #[error("this terminal cannot run top: {0}")]
    Terminal(std::io::Error),
    /// Writing to the terminal or reading its keys failed, or no runtime could be built.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Fetches the newest point from the server.
pub async fn fetch(client: &reqwest::Client, opts: &TopOptions) -> Result<Latest, TopError> {
    let url = format!("{}/dashboard/api/latest", opts.url.trim_end_matches('/'));
    let mut req = client.get(&url);
    if let Some(t) = &opts.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|source| TopError::Unreachable {
        url: url.clone(),
        source,
    })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|source| TopError::Read {
        url: url.clone(),
        source,
    })?;
    if body.len() > MAX_BODY {
        return Err(TopError::TooLarge {
            url,
            len: body.len(),
        });
    }
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        let hint = if status.as_u16() == 401 {
            " (pass --token, or set metrics_auth_token in the config top reads)"
        } else if status.as_u16() == 404 {
            " (is the dashboard on? enable_dashboard=true)"
        } else {
            ""
        };
        return Err(TopError::Status {
            url,
            status,
            message,
            hint,
        });
    }
    serde_json::from_slice(&body).map_err(|source| TopError::NotData { url, source })
}

/// A number with `digits` decimals, or `-` when there is none.
fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

fn get(m: &BTreeMap<String, Option<f64>>, key: &str) -> Option<f64> {
    m.get(key).copied().flatten()
}

/// One frame, as lines of at most `width` characters; at most `height` lines when given (the rows
/// that do not fit are counted in the last line).
pub fn frame(latest: &Latest, source: &str, width: usize, height: Option<usize>) -> Vec<String> {
    let mut lines = Vec::new();
    let h = &latest.host;
    let mut head = format!(
        "oxserve top  {source}  CPU {}%  memory {}% ({} MB)  5xx {}% of all responses",
        num(get(h, "cpu_pct"), 1),
        num(get(h, "mem_pct"), 1),
        num(get(h, "mem_used_mb"), 0),
        num(get(h, "host_5xx_pct"), 2),
    );
    if latest.gpus.is_empty() {
        head.push_str("  GPU: none");
    }
    lines.push(head);
    for (id, g) in &latest.gpus {
        lines.push(format!(
            "GPU {id}: memory {}% ({} MB), utilization {}%",
            num(get(g, "gpu_mem_pct"), 1),
            num(get(g, "gpu_mem_used_mb"), 0),
            num(get(g, "gpu_util_pct"), 0),
        ));
    }
    lines.push(String::new());
    let name_w = latest
        .models
        .keys()
        .map(|k| k.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 32);
    lines.push(format!(
        "{:<name_w$} {:>9} {:>9} {:>9} {:>8} {:>8} {:>11} {:>17}",
        "MODEL", "REQ/S", "P50 ms", "P99 ms", "5XX/S", "4XX/S", "QUEUE", "WORKERS rdy/bsy/all"
    ));
    let mut rows: Vec<String> = latest
        .models
        .iter()
        .map(|(name, m)| {
            let name: String = name.chars().take(name_w).collect();
            let queue = format!(
                "{}/{}",
                num(get(m, "queue_depth"), 0),
                num(get(m, "queue_capacity"), 0)
            );
            let all: f64 = [
                "workers_starting",
                "workers_ready",
                "workers_busy",
                "workers_stopping",
            ]
            .iter()
            .filter_map(|k| get(m, k))
            .sum();
            let workers = format!(
                "{}/{}/{}",
                num(get(m, "workers_ready"), 0),
                num(get(m, "workers_busy"), 0),
                num(Some(all), 0)
            );
            format!(
                "{name:<name_w$} {:>9} {:>9} {:>9} {:>8} {:>8} {queue:>11} {workers:>17}",
                num(get(m, "req_per_s"), 1),
                num(get(m, "p50_ms"), 2),
                num(get(m, "p99_ms"), 2),
                num(get(m, "err_5xx_per_s"), 2),
                num(get(m, "err_4xx_per_s"), 2),
            )
        })
        .collect();
    if rows.is_empty() {
        rows.push("(no model registered)".into());
    }
    let mut tail = String::new();
    if latest.untracked_models > 0 {
        let _ = write!(
            tail,
            "{} more models are registered than the dashboard tracks",
            latest.untracked_models
        );
    }
    if let Some(height) = height {
        let room = height.saturating_sub(lines.len() + 1).max(1);
        if rows.len() > room {
            let hidden = rows.len() - (room - 1);
            rows.truncate(room - 1);
            rows.push(format!("... {hidden} more models (enlarge the terminal)"));
        }
    }
    lines.extend(rows);
    if !tail.is_empty() {
        lines.push(tail);
    }
    lines
        .into_iter()
        .map(|l| l.chars().take(width).collect())
        .collect()
}

/// Runs top until the user quits (or after one frame with `--once`).
pub fn run(opts: TopOptions) -> Result<(), TopError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(TopError::Client)?;
    if opts.once {
        let latest = runtime.block_on(fetch(&client, &opts))?;
        for line in frame(&latest, &opts.url, 200, None) {
            println!("{line}");
        }
        return Ok(());
    }
    interactive(&runtime, &client, &opts)
}

/// The full-screen loop: alternate screen, raw mode (for single keys), restored on every exit path.
fn interactive(
    runtime: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    opts: &TopOptions,
) -> Result<(), TopError> {
    use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
    use crossterm::{cursor, execute, queue, terminal};

    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = terminal::disable_raw_mode();
            let _ = execute!(
                std::io::stdout(),
                cursor::Show,
                terminal::LeaveAlternateScreen
            );
        }
    }
    terminal::enable_raw_mode().map_err(TopError::Terminal)?;
    let _restore = Restore;
    let mut out = std::io::stdout();
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    loop {
        let started = Instant::now();
        let (w, h) = terminal::size().unwrap_or((100, 30));
        let lines = match runtime.block_on(fetch(client, opts)) {
            Ok(latest) => frame(
                &latest,
                &opts.url,
                w as usize,
                Some((h as usize).saturating_sub(1)),
            ),
            Err(e) => vec![format!("oxserve top: {e}"), "retrying every second".into()],
        };
        queue!(
            out,
            cursor::MoveTo(0, 0),
            terminal::Clear(terminal::ClearType::All)
        )?;
        for (i, line) in lines.iter().enumerate() {
            queue!(out, cursor::MoveTo(0, i as u16))?;
            let _ = out.write_all(line.as_bytes());
        }
        queue!(out, cursor::MoveTo(0, h.saturating_sub(1)))?;
        let _ = out.write_all(b"q: quit");
        out.flush()?;
        // Wait for the rest of the second, answering keys meanwhile.
        while let Some(left) = Duration::from_secs(1).checked_sub(started.elapsed()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(KeyEvent {
                code, modifiers, ..
            }) = event::read()?
            {
                let ctrl_c =
                    code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(pairs: &[(&str, f64)]) -> BTreeMap<String, Option<f64>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(*v)))
            .collect()
    }

    #[test]
    fn frame_lists_models_and_fits_the_terminal() {
        let mut latest = Latest {
            host: model(&[
                ("cpu_pct", 12.5),
                ("mem_pct", 40.0),
                ("mem_used_mb", 1024.0),
            ]),
            ..Default::default()
        };
        for i in 0..10 {
            latest.models.insert(
                format!("m{i}"),
                model(&[
                    ("req_per_s", 100.0 + i as f64),
                    ("p50_ms", 1.5),
                    ("p99_ms", 9.25),
                    ("queue_depth", 3.0),
                    ("queue_capacity", 100.0),
                    ("workers_ready", 1.0),
                    ("workers_busy", 1.0),
                ]),
            );
        }
        let all = frame(&latest, "http://x", 200, None);
        assert!(
            all[0].contains("CPU 12.5%") && all[0].contains("GPU: none"),
            "{all:?}"
        );
        let row = all.iter().find(|l| l.starts_with("m3 ")).unwrap();
        for want in ["103.0", "1.50", "9.25", "3/100", "1/1/2"] {
            assert!(row.contains(want), "{want} in {row:?}");
        }
        let small = frame(&latest, "http://x", 40, Some(8));
        assert!(small.len() <= 8, "{small:?}");
        assert!(small.iter().all(|l| l.chars().count() <= 40));
        assert!(small.last().unwrap().contains("more models"), "{small:?}");
        assert!(frame(&Latest::default(), "u", 80, None)
            .iter()
            .any(|l| l.contains("no model registered")));
    }
}
