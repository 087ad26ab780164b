//! A real Prometheus server for tests: own config, temporary storage, a free loopback port.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    /// Starts Prometheus with this configuration text; `rule_files` are copied beside it.
    pub fn start(config: &str, rule_files: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        for (name, text) in rule_files {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (apt-get install prometheus; .ci/run does it)");
        Prometheus {
            child,
            _dir: dir,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs an instant query; returns the `data` object, or the error text.
    pub async fn query(
        &self,
        client: &reqwest::Client,
        expr: &str,
    ) -> Result<serde_json::Value, String> {
        let r = client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(v.to_string());
        }
        Ok(v["data"].clone())
    }

    /// Polls `expr` until `ok` accepts its result vector, at most `limit`.
    pub async fn wait_for(
        &self,
        client: &reqwest::Client,
        expr: &str,
        limit: Duration,
        ok: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + limit;
        let mut last: String;
        loop {
            match self.query(client, expr).await {
                Ok(data) => {
                    let result = data["result"].as_array().cloned().unwrap_or_default();
                    if ok(&result) {
                        return result;
                    }
                    last = format!("{result:?}");
                }
                Err(e) => last = e,
            }
            assert!(
                Instant::now() < deadline,
                "{expr} never satisfied; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The number in a vector sample.
pub fn value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
