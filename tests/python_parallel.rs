//! torchrun workers (`parallelType: tp` with `torchrun: nproc-per-node: 2` in model-config.yaml):
//! the real server starts a worker under torchrun with two ranks on the CPU (gloo), connects to
//! both ranks' sockets, and answers from rank 0, with oxserve's runtime and with TorchServe's own
//! worker. torch (and so torchrun) exists only in TorchServe's virtualenv: these tests run with
//! OXSERVE_TEST_TORCHSERVE_PYTHON=/work/ts-venv/bin/python and `--ignored`.

mod common;

use common::{write_mar, Server};
use reqwest::Method;
use std::time::{Duration, Instant};

fn python() -> String {
    std::env::var("OXSERVE_TEST_TORCHSERVE_PYTHON")
        .expect("OXSERVE_TEST_TORCHSERVE_PYTHON names a python with torch and torchserve")
}

/// A handler for oxserve's runtime: every rank joins a gloo group at load, sums the request's
/// number over the ranks, and streams one part first (which only rank 0 may send).
const OXSERVE_HANDLER: &str = r#"
import json, os
import torch
import torch.distributed as dist
from ts.handler_utils.utils import send_intermediate_predict_response

def handle(data, context):
    if data is None:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return None
    body = data[0].get("body")
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body.decode())
    send_intermediate_predict_response(["0"], context.request_ids, "part", 200, context)
    x = torch.tensor([int(body)])
    dist.all_reduce(x)
    return [json.dumps({
        "sum": int(x.item()),
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "world_size": int(os.environ["WORLD_SIZE"]),
    })]
"#;

/// TorchServe's own test_parallelism.py handler and model, for TorchServe's worker.
const TS_MODEL_PY: &str = r#"
import torch
import torch.nn as nn

class Foo(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        torch.distributed.all_reduce(x)
        return x
"#;

const TS_HANDLER_PY: &str = r#"
import os
import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

class FooHandler(BaseHandler):
    def initialize(self, ctx):
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        torch.set_default_device("cpu")
        self.context = ctx
        super().initialize(ctx)

    def preprocess(self, data):
        send_intermediate_predict_response(
                ["0"],
                self.context.request_ids,
                "Intermediate Prediction success",
                200,
                self.context,
            )

        return torch.as_tensor(int(data[0].get('body').decode('utf-8')), device=self.device)

    def postprocess(self, x):
        return [x.item()]
"#;

const MODEL_CONFIG: &str =
    "parallelType: \"tp\"\ndeviceType: \"cpu\"\n\ntorchrun:\n    nproc-per-node: 2\n";

fn archive(store: &std::path::Path, name: &str, handler: &str, files: &[(&str, &[u8])]) {
    let mut model = serde_json::json!({
        "modelName": name,
        "modelVersion": "1.0",
        "handler": handler,
        "configFile": "model_config.yaml",
    });
    if files.iter().any(|(f, _)| *f == "model.py") {
        model["modelFile"] = "model.py".into();
    }
    let manifest = serde_json::json!({
        "createdOn": "29/11/2026 03:00:00",
        "runtime": "python",
        "model": model,
        "archiverVersion": "0.12.0",
    });
    let mut all: Vec<(&str, &[u8])> = vec![("model_config.yaml", MODEL_CONFIG.as_bytes())];
    all.extend_from_slice(files);
    write_mar(store, &format!("{name}.mar"), &manifest, &all);
}

/// The processes below `root` (its children, theirs, ...), from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let rest = stat.rsplit(')').next().unwrap_or("");
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        if state == "Z" {
            continue;
        }
        if let Some(ppid) = fields.next().and_then(|p| p.parse::<u32>().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// The LOCAL_RANK in a process's environment, if it has one.
fn local_rank(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("LOCAL_RANK=").map(String::from))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start(store: &std::path::Path, runtime: &str) -> Server {
    let props = format!(
        "python_executable={}\nworker_runtime={runtime}\ndefault_startup_timeout=300\ndefault_response_timeout=300\n",
        python()
    );
    Server::start_store(&props, store, "", &["--enable-model-api"])
}

async fn register(s: &Server, name: &str) {
    let (status, body) = s
        .mgmt(
            Method::POST,
            &format!("/models?url={name}.mar&initial_workers=1&synchronous=true&batch_size=1"),
        )
        .await;
    assert_eq!(status, 200, "{body}\n{}", s.log());
}

/// POSTs `42` and returns the chunks of the streamed answer.
async fn predict_chunks(s: &Server, name: &str) -> Vec<String> {
    let mut r = s
        .client
        .post(format!("{}/predictions/{name}", s.inference))
        .body("42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked")
    );
    let mut chunks = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        chunks.push(String::from_utf8(c.to_vec()).unwrap());
    }
    chunks
}

async fn worker_pid(s: &Server, name: &str) -> u32 {
    let (_, d) = s.mgmt(Method::GET, &format!("/models/{name}")).await;
    d[0]["workers"][0]["pid"].as_u64().expect("worker pid") as u32
}

/// The rank processes (those with LOCAL_RANK) under the worker, by rank.
fn ranks_of(worker: u32) -> Vec<(String, u32)> {
    let mut ranks: Vec<(String, u32)> = descendants(worker)
        .into_iter()
        .filter_map(|p| local_rank(p).map(|r| (r, p)))
        .collect();
    ranks.sort();
    ranks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs torch (torchrun): OXSERVE_TEST_TORCHSERVE_PYTHON=/work/ts-venv/bin/python"]
async fn a_torchrun_worker_with_two_ranks_answers_from_rank_0_with_oxserves_runtime() {
    let store = tempfile::tempdir().unwrap();
    archive(
        store.path(),
        "tp_ox",
        "tp_handler:handle",
        &[("tp_handler.py", OXSERVE_HANDLER.as_bytes())],
    );
    let mut s = start(store.path(), "oxserve");
    register(&s, "tp_ox").await;

    let chunks = predict_chunks(&s, "tp_ox").await;
    let text = chunks.concat();
    // One streamed part (rank 0's alone), then rank 0's answer: 42 summed over 2 ranks.
    let (part, last) = text.split_at(1);
    assert_eq!(part, "0", "{chunks:?}");
    let answer: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"sum": 84, "rank": 0, "local_rank": 0, "world_size": 2})
    );
    // A second request: the ranks stay in step.
    let text = predict_chunks(&s, "tp_ox").await.concat();
    assert!(text.starts_with("0{"), "{text}");

    // Two rank processes under the worker (torchrun), each with its LOCAL_RANK.
    let worker = worker_pid(&s, "tp_ox").await;
    let ranks = ranks_of(worker);
    let names: Vec<&str> = ranks.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(names, ["0", "1"], "{ranks:?}");

    // A rank that dies takes its worker down (torchrun stops the other rank and exits); the
    // pool starts a new worker with two new ranks, and requests are answered again.
    let mut old = descendants(worker);
    old.push(worker);
    let rank1 = ranks[1].1;
    // SAFETY: plain kill(2) of a process this test just found under the worker.
    unsafe {
        libc::kill(rank1 as i32, libc::SIGKILL);
    }
    wait_until("torchrun and rank 0 gone after rank 1 died", || {
        old.iter().all(|&p| !common::pid_alive(p.into()))
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        // The first request after the death may fail with it; a new worker answers afterwards.
        let r = s
            .client
            .post(format!("{}/predictions/tp_ox", s.inference))
            .body("42")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let text = r.text().await.unwrap();
            assert!(text.starts_with("0{\"sum\": 84"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker answered after rank 1 died"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let worker = worker_pid(&s, "tp_ox").await;
    assert!(!old.contains(&worker));
    assert_eq!(ranks_of(worker).len(), 2);

    // The server killed outright: torchrun and both ranks go with it.
    let mut all = descendants(worker);
    all.push(worker);
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    wait_until("torchrun and its ranks gone with the server", || {
        all.iter().all(|&p| !common::pid_alive(p.into()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs torch (torchrun): OXSERVE_TEST_TORCHSERVE_PYTHON=/work/ts-venv/bin/python"]
async fn torchserves_test_parallelism_model_runs_under_torchserves_worker() {
    let store = tempfile::tempdir().unwrap();
    archive(
        store.path(),
        "tp_model",
        "handler.py",
        &[
            ("handler.py", TS_HANDLER_PY.as_bytes()),
            ("model.py", TS_MODEL_PY.as_bytes()),
        ],
    );
    let s = start(store.path(), "torchserve");
    register(&s, "tp_model").await;
    // TorchServe's assertion: "0" + str(nproc * 42).
    assert_eq!(predict_chunks(&s, "tp_model").await.concat(), "084");
    let worker = worker_pid(&s, "tp_model").await;
    let ranks = ranks_of(worker);
    assert_eq!(ranks.len(), 2, "{ranks:?}");

    // Unregistering stops torchrun and every rank.
    let mut all = descendants(worker);
    all.push(worker);
    let (status, body) = s.mgmt(Method::DELETE, "/models/tp_model").await;
    assert_eq!(status, 200, "{body}");
    wait_until("torchrun and its ranks gone after unregister", || {
        all.iter().all(|&p| !common::pid_alive(p.into()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_parallelism_fails_the_registration() {
    // No torch needed: the configuration is refused before any worker starts.
    let store = tempfile::tempdir().unwrap();
    let manifest = serde_json::json!({
        "createdOn": "29/11/2026 03:00:00",
        "runtime": "python",
        "model": {
            "modelName": "badtp",
            "modelVersion": "1.0",
            "handler": "h:handle",
            "configFile": "model_config.yaml",
        },
        "archiverVersion": "0.12.0",
    });
    write_mar(
        store.path(),
        "badtp.mar",
        &manifest,
        &[
            ("h.py", b"def handle(data, context):\n    return data\n"),
            (
                "model_config.yaml",
                b"parallelType: tp\ntorchrun:\n    nproc-per-node: 100000\n",
            ),
        ],
    );
    let s = Server::start_store("", store.path(), "", &["--enable-model-api"]);
    let (status, body) = s
        .mgmt(
            Method::POST,
            "/models?url=badtp.mar&initial_workers=1&synchronous=true",
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "ModelException");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("torchrun.nproc-per-node must be a whole number from 1 to 64"),
        "{body}"
    );
    let (status, _) = s.mgmt(Method::GET, "/models/badtp").await;
    assert_eq!(status, 404);
}
