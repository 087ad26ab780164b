//! The supervisor driven by commands with a fake backend: no processes, no sleeps. Every test
//! runs on a paused tokio clock, so timers (batch delay, backoff, autoscaling samples) fire
//! exactly when due, and "how long" is virtual time, not the machine's load.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::*;
use crate::backend::{
    Backend, BackendError, BackendLoader, InferResponse, ModelSpec, StreamSink, WorkerSpec,
};
use crate::config::{Config, Overrides};
use crate::metrics::Metrics;

/// How a fake model load ends.
#[derive(Clone, Copy, Debug)]
enum Load {
    Ok,
    Fail,
    Panic,
}

/// How the test answers a batch.
#[derive(Debug)]
enum Outcome {
    Ok,
    Die,
    Panic,
}

/// A batch the fake backend received; the test answers it.
struct Call {
    worker: u32,
    ids: Vec<String>,
    answer: oneshot::Sender<Outcome>,
}

struct FakeLoader {
    plan: Mutex<VecDeque<Load>>,
    /// (worker, when) of every load attempt.
    loads: mpsc::UnboundedSender<(u32, Instant)>,
    calls: mpsc::UnboundedSender<Call>,
}

struct FakeBackend {
    worker: u32,
    calls: mpsc::UnboundedSender<Call>,
}

#[async_trait]
impl BackendLoader for FakeLoader {
    fn runtime(&self) -> &str {
        "fake"
    }
    async fn load(&self, spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError> {
        let _ = self.loads.send((spec.id, Instant::now()));
        let plan = self.plan.lock().unwrap().pop_front().unwrap_or(Load::Ok);
        match plan {
            Load::Ok => Ok(Box::new(FakeBackend {
                worker: spec.id,
                calls: self.calls.clone(),
            })),
            Load::Fail => Err(BackendError::Load("no such file".into())),
            Load::Panic => panic!("fake load panic"),
        }
    }
}

#[async_trait]
impl Backend for FakeBackend {
    async fn infer(
        &mut self,
        batch: &[InferRequest],
        _sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError> {
        let (tx, rx) = oneshot::channel();
        let ids: Vec<String> = batch.iter().map(|r| r.id.clone()).collect();
        let _ = self.calls.send(Call {
            worker: self.worker,
            ids: ids.clone(),
            answer: tx,
        });
        match rx.await {
            Ok(Outcome::Ok) | Err(_) => Ok(ids
                .iter()
                .map(|id| InferResponse::ok("text/plain", format!("ok {id}")))
                .collect()),
            Ok(Outcome::Die) => Err(BackendError::Died("socket closed".into())),
            Ok(Outcome::Panic) => panic!("fake infer panic"),
        }
    }
}

struct Harness {
    pool: Pool,
    loads: mpsc::UnboundedReceiver<(u32, Instant)>,
    calls: mpsc::UnboundedReceiver<Call>,
    metrics: Arc<Metrics>,
}

fn settings(batch_size: u32, queue_capacity: usize, rule: AutoscaleRule) -> PoolSettings {
    PoolSettings {
        batch_size,
        max_batch_delay: Duration::from_millis(100),
        queue_capacity,
        response_timeout: Duration::from_secs(3600),
        startup_timeout: Duration::from_secs(3600),
        autoscale: rule,
        mode: BatchMode::Classic,
        sequence: None,
    }
}

fn harness(s: PoolSettings, plan: &[Load]) -> Harness {
    let metrics = Arc::new(Metrics::for_tests());
    let (loads_tx, loads) = mpsc::unbounded_channel();
    let (calls_tx, calls) = mpsc::unbounded_channel();
    let loader = Arc::new(FakeLoader {
        plan: Mutex::new(plan.iter().copied().collect()),
        loads: loads_tx,
        calls: calls_tx,
    });
    let pool = make_pool(loader, s, &metrics);
    Harness {
        pool,
        loads,
        calls,
        metrics,
    }
}

fn make_pool(loader: Arc<dyn BackendLoader>, s: PoolSettings, metrics: &Arc<Metrics>) -> Pool {
    let (config, _) = Config::from_sources(HashMap::new(), &[], &Overrides::default()).unwrap();
    let spec = Arc::new(ModelSpec {
        model_name: "m".into(),
        model_version: "1.0".into(),
        model_dir: Default::default(),
        manifest: Default::default(),
        batch_size: s.batch_size,
        startup_timeout: s.startup_timeout,
        response_timeout: s.response_timeout,
        metrics: metrics.clone(),
        settings: Arc::new(config),
    });
    let model = metrics.model("m", "1.0");
    Pool::new(loader, spec, s, model, Arc::new(AtomicU32::new(9000)))
}

fn request(id: &str) -> (Job, ReplyRx) {
    let req = InferRequest {
        id: id.into(),
        ..Default::default()
    };
    Job::new(req, Timings::new(std::time::Instant::now()))
}

/// (status, body) of a whole reply.
async fn answer(rx: ReplyRx) -> (u16, String) {
    match rx.await.expect("every job is answered") {
        Reply::Whole(p) => (
            p.response.status,
            String::from_utf8(p.response.body.to_vec()).unwrap(),
        ),
        Reply::Stream(..) => panic!("no streaming here"),
    }
}

impl Harness {
    fn submit(&self, id: &str) -> ReplyRx {
        let (job, rx) = request(id);
        self.pool.submit(job).expect("queued");
        rx
    }

    async fn call(&mut self) -> Call {
        self.calls
            .recv()
            .await
            .expect("a batch reaches the backend")
    }

    /// Waits until the supervisor's published state satisfies `f`.
    async fn until(&self, f: impl Fn(&PoolStatus) -> bool) -> PoolStatus {
        let mut rx = self.pool.handle.status.clone();
        let s = rx.wait_for(|s| f(s)).await.expect("supervisor alive");
        s.clone()
    }

    fn sample(&self, name: &str) -> f64 {
        let text = self.metrics.render(None);
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
    }
}

fn statuses(s: &PoolStatus) -> Vec<WorkerStatus> {
    s.workers.iter().map(|w| w.status).collect()
}

fn no_autoscale() -> AutoscaleRule {
    AutoscaleRule::default()
}

#[tokio::test(start_paused = true)]
async fn concurrent_scale_requests_never_overshoot() {
    let mut h = harness(settings(1, 10, no_autoscale()), &[]);
    // Twenty scale-ups race (the old pool could start one batch of workers per request).
    let pools: Vec<Pool> = (0..20).map(|_| h.pool.clone()).collect();
    let all = pools.iter().map(|p| p.scale(3, 3, false));
    let counts = futures_util::future::join_all(all).await;
    assert!(counts.iter().all(|&n| n == 3), "{counts:?}");
    let s = h.until(|s| s.live_workers() == 3).await;
    assert_eq!(s.workers.len(), 3);
    let mut loads = 0;
    while h.loads.try_recv().is_ok() {
        loads += 1;
    }
    assert_eq!(loads, 3, "exactly three workers were ever started");
    // Racing scale-downs and scale-ups settle on the last bounds.
    let a = h.pool.scale(1, 1, true);
    let b = h.pool.scale(2, 2, true);
    let (a, b) = tokio::join!(a, b);
    assert_eq!(
        (a, b),
        (2, 2),
        "both answer once the last bounds are in force"
    );
    let s = h.until(|s| s.workers.len() == 2).await;
    assert_eq!((s.min_workers, s.max_workers), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_a_batch_fails_exactly_that_batch_and_is_replaced() {
    let mut h = harness(settings(2, 10, no_autoscale()), &[]);
    assert_eq!(h.pool.scale(2, 2, true).await, 2);
    let (a, b, c) = (h.submit("a"), h.submit("b"), h.submit("c"));
    // Two full batches? a+b go together (batch_size 2); c waits for the delay on the other.
    let first = h.call().await;
    assert_eq!(first.ids, ["a", "b"]);
    let second = h.call().await;
    assert_eq!(second.ids, ["c"]);
    let crashed = first.worker;
    let died_at = Instant::now();
    first.answer.send(Outcome::Die).unwrap();
    for rx in [a, b] {
        let (status, body) = answer(rx).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("Worker died"), "{body}");
    }
    // The other batch is untouched.
    second.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(c).await, (200, "ok c".to_string()));
    // The crashed worker waits, without a process, then is replaced under the same id.
    let s = h
        .until(|s| s.workers.iter().any(|w| w.status == WorkerStatus::Backoff))
        .await;
    let w = s.workers.iter().find(|w| w.id == crashed).unwrap();
    assert_eq!((w.status, w.pid), (WorkerStatus::Backoff, None));
    assert_eq!(s.live_workers(), 1);
    while h.loads.try_recv().is_ok() {}
    let (worker, at) = h.loads.recv().await.unwrap();
    assert_eq!(worker, crashed);
    assert_eq!(at - died_at, runner::FIRST_BACKOFF);
    let s = h.until(|s| s.live_workers() == 2).await;
    assert!(s.workers.iter().all(|w| w.pid == Some(std::process::id())));
    // And it serves again.
    let d = h.submit("d");
    let e = h.submit("e");
    h.call().await.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(d).await.0, 200);
    assert_eq!(answer(e).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_infer_answers_500_and_replaces_the_backend() {
    let mut h = harness(settings(1, 10, no_autoscale()), &[]);
    h.pool.scale(1, 1, true).await;
    let a = h.submit("a");
    h.call().await.answer.send(Outcome::Panic).unwrap();
    let (status, body) = answer(a).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("InternalServerException") && body.contains("fake infer panic"));
    h.until(|s| s.workers[0].status == WorkerStatus::Backoff)
        .await;
    h.until(|s| s.live_workers() == 1).await;
    let b = h.submit("b");
    h.call().await.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(b).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_load_is_a_failed_load_that_is_retried() {
    let mut h = harness(settings(1, 10, no_autoscale()), &[Load::Panic]);
    // The synchronous scale returns as soon as the load failed with nothing serving.
    assert_eq!(h.pool.scale(1, 1, true).await, 1);
    let s = h.pool.describe().await;
    assert_eq!(statuses(&s), [WorkerStatus::Backoff]);
    assert!(s.load_error.unwrap().contains("fake load panic"));
    // A request waits in the queue meanwhile and is served once the retry loads.
    let a = h.submit("a");
    h.call().await.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(a).await.0, 200);
    assert_eq!(h.pool.load_error(), None);
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_on_failed_loads_and_resets_once_a_worker_served() {
    let plan = [Load::Fail, Load::Fail, Load::Fail, Load::Ok, Load::Ok];
    let mut h = harness(settings(1, 10, no_autoscale()), &plan);
    h.pool.scale(1, 1, false).await;
    let mut times = Vec::new();
    for _ in 0..4 {
        times.push(h.loads.recv().await.unwrap().1);
    }
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let ms = |n| Duration::from_millis(n);
    assert_eq!(gaps, [ms(500), ms(1000), ms(2000)]);
    // It serves, then crashes: the next restart is quick again, not 4 s.
    let a = h.submit("a");
    h.call().await.answer.send(Outcome::Ok).unwrap();
    answer(a).await;
    let b = h.submit("b");
    let call = h.call().await;
    let died = Instant::now();
    call.answer.send(Outcome::Die).unwrap();
    answer(b).await;
    let (_, at) = h.loads.recv().await.unwrap();
    assert_eq!(at - died, ms(500));
}

#[tokio::test(start_paused = true)]
async fn close_finishes_running_batches_and_answers_queued_jobs_503() {
    let mut h = harness(settings(1, 10, no_autoscale()), &[]);
    h.pool.scale(1, 1, true).await;
    let running = h.submit("running");
    let call = h.call().await;
    let queued: Vec<ReplyRx> = (0..3).map(|i| h.submit(&format!("q{i}"))).collect();
    // Describe is answered after the three submits are handled (the queue length is published
    // without waking waiters: it changes with every request).
    assert_eq!(h.pool.describe().await.queue_len, 3);
    h.pool.close("going away");
    for rx in queued {
        let (status, body) = answer(rx).await;
        assert_eq!(status, 503);
        assert!(body.contains("going away") && body.contains("ServiceUnavailable"));
    }
    // Submitting while closing is answered 503 through the reply.
    let (job, late) = request("late");
    if h.pool.submit(job).is_ok() {
        assert_eq!(answer(late).await.0, 503);
    }
    let s = h.pool.describe().await;
    assert_eq!(statuses(&s), [WorkerStatus::Stopping]);
    assert!(!s.stopped, "the running batch is not cut short");
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(running).await, (200, "ok running".into()));
    tokio::time::timeout(
        Duration::from_secs(5),
        h.pool.wait_stopped(Duration::from_secs(3600)),
    )
    .await
    .expect("stops once the batch is done");
    assert!(h.pool.status().workers.is_empty());
    let (job, _) = request("after");
    assert_eq!(h.pool.submit(job), Err(SubmitError::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_answers_503_without_dropping_anything() {
    let mut h = harness(settings(1, 2, no_autoscale()), &[]);
    h.pool.scale(1, 1, true).await;
    let busy = h.submit("busy");
    let call = h.call().await;
    let waiting = [h.submit("w1"), h.submit("w2")];
    let rejected = h.submit("over");
    let (status, body) = answer(rejected).await;
    assert_eq!(status, 503);
    assert!(body.contains("Model \\\"m\\\" has no worker"), "{body}");
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(busy).await.0, 200);
    for rx in waiting {
        h.call().await.answer.send(Outcome::Ok).unwrap();
        assert_eq!(answer(rx).await.0, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn scaling_down_stops_idle_workers_first_and_lets_busy_ones_finish() {
    let mut h = harness(settings(1, 10, no_autoscale()), &[]);
    h.pool.scale(3, 3, true).await;
    let a = h.submit("a");
    let call = h.call().await;
    let busy = call.worker;
    h.pool.scale(1, 1, false).await;
    // The answer comes after the new bounds are published (start-up marks /ping ready on it).
    assert_eq!((h.pool.min_workers(), h.pool.max_workers()), (1, 1));
    let s = h.until(|s| s.workers.len() == 1).await;
    assert_eq!(s.workers[0].id, busy, "the busy worker is kept");
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(a).await.0, 200);
    // Down to zero: the last one finishes its batch, queued work waits for a worker.
    let b = h.submit("b");
    let call = h.call().await;
    h.pool.scale(0, 0, false).await;
    let c = h.submit("c");
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(b).await.0, 200);
    h.until(|s| s.workers.is_empty() && s.queue_len == 1).await;
    h.pool.scale(1, 1, false).await;
    h.call().await.answer.send(Outcome::Ok).unwrap();
    assert_eq!(answer(c).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn autoscaling_follows_the_rule_and_stays_within_min_and_max() {
    let rule = AutoscaleRule {
        interval: Duration::from_millis(100),
        queue_per_worker: 1,
        up_samples: 2,
        down_samples: 3,
    };
    let mut h = harness(settings(1, 100, rule), &[]);
    h.pool.scale(1, 3, true).await;
    let start = Instant::now();
    // Ten requests and a backend that holds every batch: constant pressure.
    let replies: Vec<ReplyRx> = (0..10).map(|i| h.submit(&format!("r{i}"))).collect();
    let mut held = vec![h.call().await];
    // Samples at 100 and 200 ms: pressure twice -> a second worker at 200 ms.
    let s = h.until(|s| s.workers.len() == 2).await;
    assert_eq!(Instant::now() - start, Duration::from_millis(200));
    assert_eq!(s.max_workers, 3);
    held.push(h.call().await);
    // The next window starts after the step: a third at 400 ms.
    h.until(|s| s.workers.len() == 3).await;
    assert_eq!(Instant::now() - start, Duration::from_millis(400));
    held.push(h.call().await);
    // Still under pressure, but at max: a long while later there are still 3.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.pool.describe().await.workers.len(), 3);
    assert_eq!(h.sample("oxserve_worker_scale_events_total{model_name=\"m\",model_version=\"1.0\",direction=\"up\",trigger=\"autoscale\",}"), 2.0);
    // Serve everything.
    for c in held.drain(..) {
        c.answer.send(Outcome::Ok).unwrap();
    }
    for mut rx in replies {
        loop {
            tokio::select! {
                r = &mut rx => {
                    match r.expect("answered") {
                        Reply::Whole(p) => assert_eq!(p.response.status, 200),
                        Reply::Stream(..) => panic!("no streaming here"),
                    }
                    break;
                }
                c = h.calls.recv() => c.unwrap().answer.send(Outcome::Ok).unwrap(),
            }
        }
    }
    // Idle: three idle samples per step, down to min and no further.
    h.until(|s| s.workers.len() == 2).await;
    h.until(|s| s.workers.len() == 1).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s = h.pool.describe().await;
    assert_eq!(s.workers.len(), 1, "never below min");
    assert_eq!(h.sample("oxserve_worker_scale_events_total{model_name=\"m\",model_version=\"1.0\",direction=\"down\",trigger=\"autoscale\",}"), 2.0);
    // min == max turns it off, whatever the load.
    h.pool.scale(1, 1, true).await;
    let more: Vec<ReplyRx> = (0..5).map(|i| h.submit(&format!("x{i}"))).collect();
    let c = h.call().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.pool.describe().await.workers.len(), 1);
    c.answer.send(Outcome::Ok).unwrap();
    for _ in 1..more.len() {
        h.call().await.answer.send(Outcome::Ok).unwrap();
    }
    for rx in more {
        assert_eq!(answer(rx).await.0, 200);
    }
}

#[tokio::test(start_paused = true)]
async fn the_gauges_are_the_state_the_supervisor_holds() {
    let mut h = harness(settings(1, 10, no_autoscale()), &[Load::Fail]);
    h.pool.scale(2, 2, true).await;
    h.until(|s| s.live_workers() == 2).await;
    let g = |st: &str| {
        format!("oxserve_workers{{model_name=\"m\",model_version=\"1.0\",state=\"{st}\",}}")
    };
    let a = h.submit("a");
    let call = h.call().await;
    let s = h.pool.describe().await;
    assert_eq!(h.sample(&g("busy")), 1.0);
    assert_eq!(h.sample(&g("ready")), 1.0);
    assert_eq!(h.sample(&g("backoff")), 0.0);
    assert_eq!(s.live_workers(), 2);
    call.answer.send(Outcome::Die).unwrap();
    answer(a).await;
    let s = h
        .until(|s| s.workers.iter().any(|w| w.status == WorkerStatus::Backoff))
        .await;
    assert_eq!(s.live_workers(), 1);
    assert_eq!(h.sample(&g("backoff")), 1.0);
    assert_eq!(h.sample(&g("ready")), 1.0);
}

#[test]
fn workers_take_gpus_round_robin() {
    assert_eq!(gpu_for(9000, 9000, 0), -1);
    let ids: Vec<i32> = (9000..9005).map(|p| gpu_for(p, 9000, 2)).collect();
    assert_eq!(ids, [0, 1, 0, 1, 0]);
}

#[tokio::test(start_paused = true)]
async fn huge_configured_delays_are_deadlines_that_never_come_not_panics() {
    let mut s = settings(4, 10, no_autoscale());
    s.max_batch_delay = Duration::MAX;
    s.startup_timeout = Duration::MAX;
    s.response_timeout = Duration::MAX;
    let mut h = harness(s, &[]);
    assert_eq!(h.pool.scale(1, 1, true).await, 1);
    // A partial batch waits for more (forever); a full one goes.
    let replies: Vec<ReplyRx> = (0..4).map(|i| h.submit(&format!("r{i}"))).collect();
    let call = h.call().await;
    assert_eq!(call.ids.len(), 4);
    call.answer.send(Outcome::Ok).unwrap();
    for rx in replies {
        assert_eq!(answer(rx).await.0, 200);
    }
}

/// A backend in async mode: the test sees each message sent and decides which reply parts come
/// back, in any order.
struct AsyncLoader {
    sent: mpsc::UnboundedSender<Vec<String>>,
    parts: Mutex<Option<mpsc::UnboundedReceiver<Vec<crate::backend::Part>>>>,
}

struct AsyncFake {
    sent: mpsc::UnboundedSender<Vec<String>>,
    parts: mpsc::UnboundedReceiver<Vec<crate::backend::Part>>,
}

#[async_trait]
impl BackendLoader for AsyncLoader {
    fn runtime(&self) -> &str {
        "fake-async"
    }
    async fn load(&self, _spec: &WorkerSpec) -> Result<Box<dyn Backend>, BackendError> {
        let parts = self.parts.lock().unwrap().take().expect("one worker");
        Ok(Box::new(AsyncFake {
            sent: self.sent.clone(),
            parts,
        }))
    }
}

#[async_trait]
impl Backend for AsyncFake {
    async fn infer(
        &mut self,
        _batch: &[InferRequest],
        _sink: &dyn StreamSink,
    ) -> Result<Vec<InferResponse>, BackendError> {
        panic!("an async backend is never given a classic batch")
    }
    fn is_async(&self) -> bool {
        true
    }
    fn can_step(&self) -> bool {
        true
    }
    async fn send(&mut self, batch: &[InferRequest]) -> Result<(), BackendError> {
        let _ = self.sent.send(batch.iter().map(|r| r.id.clone()).collect());
        Ok(())
    }
    async fn recv(&mut self) -> Result<Vec<crate::backend::Part>, BackendError> {
        self.parts
            .recv()
            .await
            .ok_or_else(|| BackendError::Died("socket closed".into()))
    }
    fn can_cancel(&self) -> bool {
        true
    }
    /// Shows as a message of ids `cancel:<id>`.
    async fn cancel(&mut self, ids: &[String]) -> Result<(), BackendError> {
        let _ = self
            .sent
            .send(ids.iter().map(|id| format!("cancel:{id}")).collect());
        Ok(())
    }
}

fn part(id: &str, body: &str, last: bool) -> crate::backend::Part {
    crate::backend::Part {
        id: id.into(),
        response: InferResponse::ok("text/plain", body.to_string()),
        last,
    }
}

struct AsyncHarness {
    pool: Pool,
    sent: mpsc::UnboundedReceiver<Vec<String>>,
    parts: mpsc::UnboundedSender<Vec<crate::backend::Part>>,
}

async fn async_harness(queue: usize, batch_size: u32, timeout: Duration) -> AsyncHarness {
    mode_harness(BatchMode::Async, queue, batch_size, timeout).await
}

async fn mode_harness(
    mode: BatchMode,
    queue: usize,
    batch_size: u32,
    timeout: Duration,
) -> AsyncHarness {
    let (sent_tx, sent) = mpsc::unbounded_channel();
    let (parts, parts_rx) = mpsc::unbounded_channel();
    let loader = Arc::new(AsyncLoader {
        sent: sent_tx,
        parts: Mutex::new(Some(parts_rx)),
    });
    let mut s = settings(batch_size, queue, no_autoscale());
    s.mode = mode;
    s.response_timeout = timeout;
    let pool = make_pool(loader, s, &Arc::new(Metrics::for_tests()));
    assert_eq!(pool.scale(1, 1, true).await, 1);
    AsyncHarness { pool, sent, parts }
}

impl AsyncHarness {
    fn submit(&self, id: &str) -> ReplyRx {
        let (job, rx) = request(id);
        self.pool.submit(job).expect("queued");
        rx
    }
    async fn sent(&mut self) -> Vec<String> {
        self.sent
            .recv()
            .await
            .expect("a message reaches the backend")
    }
}

#[tokio::test(start_paused = true)]
async fn async_mode_sends_while_others_are_in_flight_and_answers_by_id() {
    let mut h = async_harness(10, 1, Duration::from_secs(3600)).await;
    let (a, b, c) = (h.submit("a"), h.submit("b"), h.submit("c"));
    // All three reach the one worker before any is answered, one message each (batchSize 1).
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.extend(h.sent().await);
    }
    assert_eq!(seen, ["a", "b", "c"]);
    // Replies come back in the order the backend finished them.
    h.parts.send(vec![part("c", "C", true)]).unwrap();
    assert_eq!(answer(c).await, (200, "C".to_string()));
    h.parts
        .send(vec![part("a", "A", true), part("b", "B", true)])
        .unwrap();
    assert_eq!(answer(a).await, (200, "A".to_string()));
    assert_eq!(answer(b).await, (200, "B".to_string()));
    let s = h.pool.describe().await;
    assert_eq!(statuses(&s), [WorkerStatus::Ready]);
}

#[tokio::test(start_paused = true)]
async fn async_mode_streams_parts_and_duplicate_ids_stay_apart() {
    let mut h = async_harness(10, 4, Duration::from_secs(3600)).await;
    let a1 = h.submit("same");
    let _ = h.sent().await;
    let a2 = h.submit("same");
    assert_eq!(h.sent().await, ["same#2"]);
    h.parts
        .send(vec![part("same#2", "x1", false), part("same", "y", true)])
        .unwrap();
    assert_eq!(answer(a1).await, (200, "y".to_string()));
    let Reply::Stream(first, mut rest) = a2.await.unwrap() else {
        panic!("a stream")
    };
    assert!(!first.last);
    assert_eq!(&first.response.body[..], b"x1");
    h.parts.send(vec![part("same#2", "x2", true)]).unwrap();
    let last = rest.recv().await.unwrap();
    assert!(last.last);
    assert_eq!(&last.response.body[..], b"x2");
}

#[tokio::test(start_paused = true)]
async fn async_mode_times_out_one_request_and_a_crash_fails_only_those_in_flight() {
    let mut h = async_harness(10, 1, Duration::from_secs(5)).await;
    let slow = h.submit("slow");
    let _ = h.sent().await;
    // No part for 5 s: only that request answers 408; a late reply is ignored.
    let (status, body) = answer(slow).await;
    assert_eq!(status, 408, "{body}");
    h.parts.send(vec![part("slow", "late", true)]).unwrap();
    let ok = h.submit("ok");
    let _ = h.sent().await;
    h.parts.send(vec![part("ok", "fine", true)]).unwrap();
    assert_eq!(answer(ok).await, (200, "fine".to_string()));
    // The backend dies with two in flight: both answer 503, and the slot goes to backoff.
    let (x, y) = (h.submit("x"), h.submit("y"));
    let _ = h.sent().await;
    let _ = h.sent().await;
    drop(h.parts);
    for rx in [x, y] {
        let (status, body) = answer(rx).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("Worker died"), "{body}");
    }
}

#[tokio::test(start_paused = true)]
async fn async_mode_cancels_requests_whose_client_went_away_and_waits_for_their_answer() {
    let mut h = async_harness(10, 1, Duration::from_secs(3600)).await;
    let (streamed, waiting, kept) = (h.submit("streamed"), h.submit("waiting"), h.submit("kept"));
    for _ in 0..3 {
        let _ = h.sent().await;
    }
    // A stream whose reader goes away: noticed at its next part.
    h.parts.send(vec![part("streamed", "t1", false)]).unwrap();
    let Reply::Stream(_, rest) = streamed.await.unwrap() else {
        panic!("a stream")
    };
    drop(rest);
    h.parts.send(vec![part("streamed", "t2", false)]).unwrap();
    assert_eq!(h.sent().await, ["cancel:streamed"]);
    // A client waiting for a whole reply goes away: the next sweep finds it (the paused clock
    // moves on to it).
    drop(waiting);
    assert_eq!(h.sent().await, ["cancel:waiting"]);
    // Each is cancelled once; both stay in flight until their final answers; the third request,
    // whose client is still there, is never cancelled.
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.parts
        .send(vec![
            part("streamed", "", true),
            part("waiting", "", true),
            part("kept", "K", true),
        ])
        .unwrap();
    assert_eq!(answer(kept).await, (200, "K".to_string()));
    assert!(
        h.sent.try_recv().is_err(),
        "nothing more reached the backend"
    );
    let s = h.pool.describe().await;
    assert_eq!(statuses(&s), [WorkerStatus::Ready]);
}

#[tokio::test(start_paused = true)]
async fn async_mode_on_a_backend_without_one_serves_batches_of_batch_size_in_turn() {
    let mut s = settings(2, 10, no_autoscale());
    s.mode = BatchMode::Async;
    let mut h = harness(s, &[]);
    assert_eq!(h.pool.scale(1, 1, true).await, 1);
    let (a, b, c) = (h.submit("a"), h.submit("b"), h.submit("c"));
    let first = h.call().await;
    assert_eq!(first.ids, ["a", "b"]);
    first.answer.send(Outcome::Ok).unwrap();
    let second = h.call().await;
    assert_eq!(second.ids, ["c"]);
    second.answer.send(Outcome::Ok).unwrap();
    for (rx, id) in [(a, "a"), (b, "b"), (c, "c")] {
        assert_eq!(answer(rx).await, (200, format!("ok {id}")));
    }
}

#[tokio::test(start_paused = true)]
async fn continuous_batching_keeps_running_jobs_and_refills_freed_slots() {
    let mut h = mode_harness(BatchMode::Continuous, 10, 2, Duration::from_secs(3600)).await;
    let (a, b, c) = (h.submit("a"), h.submit("b"), h.submit("c"));
    // batchSize 2: a and b start; c waits for a free slot.
    assert_eq!(h.sent().await, ["a", "b"]);
    h.parts
        .send(vec![part("a", "a1", false), part("b", "B", true)])
        .unwrap();
    assert_eq!(answer(b).await, (200, "B".to_string()));
    // Next step: a again (cached in the worker) and c in b's freed slot.
    assert_eq!(h.sent().await, ["a", "c"]);
    h.parts
        .send(vec![part("a", "A", true), part("c", "C", true)])
        .unwrap();
    let Reply::Stream(first, mut rest) = a.await.unwrap() else {
        panic!("a streamed")
    };
    assert_eq!(&first.response.body[..], b"a1");
    assert_eq!(&rest.recv().await.unwrap().response.body[..], b"A");
    assert_eq!(answer(c).await, (200, "C".to_string()));
}

// ---- sequence batching through the supervisor ----

fn seq_settings(batch_size: u32, max_sequences: u32, max_queue: u32) -> PoolSettings {
    let mut s = settings(batch_size, 100, no_autoscale());
    s.sequence = Some(SequenceSettings {
        max_sequences,
        max_idle: Duration::from_millis(1000),
        timeout: None,
        max_queue,
    });
    s
}

impl Harness {
    fn submit_seq(&self, id: &str, seq: &str) -> ReplyRx {
        let req = InferRequest {
            id: id.into(),
            headers: vec![(SEQUENCE_ID_HEADER.into(), seq.into())],
            ..Default::default()
        };
        let (job, rx) = Job::new(req, Timings::new(std::time::Instant::now()));
        self.pool.submit(job).expect("queued");
        rx
    }
}

/// (status, body, the reply's sequence id header).
async fn seq_answer(rx: ReplyRx) -> (u16, String, Option<String>) {
    match rx.await.expect("every job is answered") {
        Reply::Whole(p) => (
            p.response.status,
            String::from_utf8(p.response.body.to_vec()).unwrap(),
            p.response
                .headers
                .iter()
                .find(|(k, _)| k == SEQUENCE_ID_HEADER)
                .map(|(_, v)| v.clone()),
        ),
        Reply::Stream(..) => panic!("no streaming here"),
    }
}

#[tokio::test(start_paused = true)]
async fn sequence_batching_pins_each_session_to_one_worker_and_serves_it_in_order() {
    let mut h = harness(seq_settings(2, 4, 10), &[]);
    assert_eq!(h.pool.scale(2, 2, true).await, 2);
    let mut rx = Vec::new();
    for i in 1..=3 {
        rx.push(h.submit_seq(&format!("a{i}"), "A"));
        rx.push(h.submit_seq(&format!("b{i}"), "B"));
    }
    let mut worker_of: HashMap<String, u32> = HashMap::new();
    let mut served: Vec<String> = Vec::new();
    for _ in 0..6 {
        let call = h.call().await;
        // Never two jobs of one session in a batch: each builds on the previous answer.
        assert_eq!(call.ids.len(), 1, "{:?}", call.ids);
        let id = call.ids[0].clone();
        let session = id[..1].to_string();
        let w = *worker_of.entry(session.clone()).or_insert(call.worker);
        assert_eq!(w, call.worker, "{id} left its session's worker");
        served.push(id);
        call.answer.send(Outcome::Ok).unwrap();
    }
    assert_ne!(worker_of["a"], worker_of["b"], "two sessions, two workers");
    let order = |s: char| -> Vec<String> {
        served
            .iter()
            .filter(|i| i.starts_with(s))
            .cloned()
            .collect()
    };
    assert_eq!(order('a'), ["a1", "a2", "a3"]);
    assert_eq!(order('b'), ["b1", "b2", "b3"]);
    for (i, r) in rx.into_iter().enumerate() {
        let (status, _, seq) = seq_answer(r).await;
        assert_eq!(status, 200);
        let want = if i % 2 == 0 { "A" } else { "B" };
        assert_eq!(seq.as_deref(), Some(want), "every reply names its session");
    }
}

#[tokio::test(start_paused = true)]
async fn sequence_batching_closes_idle_sessions_on_time_and_refuses_their_id() {
    let mut h = harness(seq_settings(1, 1, 1), &[]);
    h.pool.scale(1, 1, true).await;
    let a = h.submit_seq("a1", "A");
    let call = h.call().await;
    let answered_at = Instant::now();
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(a).await.0, 200);
    // maxNumSequence 1: while A is open a second session is refused with TorchServe's 503.
    let (status, body, _) = seq_answer(h.submit_seq("b1", "B")).await;
    assert_eq!(status, 503, "{body}");
    // The supervisor wakes by itself at sequenceMaxIdleMSec after the answer (paused clock:
    // sleeping past it lets every timer due by then fire).
    tokio::time::sleep_until(answered_at + Duration::from_millis(1001)).await;
    let (status, body, _) = seq_answer(h.submit_seq("a2", "A")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("BadRequestException") && body.contains("idle"),
        "{body}"
    );
    // The slot is free for a new session.
    let b = h.submit_seq("b2", "B");
    h.call().await.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(b).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn sequence_batching_per_sequence_queue_limit_answers_503() {
    let mut h = harness(seq_settings(1, 4, 2), &[]);
    h.pool.scale(1, 1, true).await;
    let first = h.submit_seq("a1", "A");
    let call = h.call().await;
    // a1 runs; a2 and a3 wait (maxSequenceJobQueueSize 2); a4 is one too many.
    let (a2, a3) = (h.submit_seq("a2", "A"), h.submit_seq("a3", "A"));
    let (status, body, _) = seq_answer(h.submit_seq("a4", "A")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("has no worker to serve inference request"),
        "{body}"
    );
    call.answer.send(Outcome::Ok).unwrap();
    for (rx, next) in [(first, "a2"), (a2, "a3")] {
        assert_eq!(seq_answer(rx).await.0, 200);
        let c = h.call().await;
        assert_eq!(c.ids, [next]);
        c.answer.send(Outcome::Ok).unwrap();
    }
    assert_eq!(seq_answer(a3).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn a_worker_crash_fails_only_the_sequences_it_held() {
    let mut h = harness(seq_settings(1, 4, 4), &[]);
    assert_eq!(h.pool.scale(2, 2, true).await, 2);
    let (a1, b1) = (h.submit_seq("a1", "A"), h.submit_seq("b1", "B"));
    let (c1, c2) = (h.call().await, h.call().await);
    let (a_call, b_call) = if c1.ids == ["a1"] { (c1, c2) } else { (c2, c1) };
    assert_ne!(a_call.worker, b_call.worker);
    let (a2, b2) = (h.submit_seq("a2", "A"), h.submit_seq("b2", "B"));
    // A's worker dies mid-request: a1 (running) and a2 (waiting for that worker) fail.
    a_call.answer.send(Outcome::Die).unwrap();
    for rx in [a1, a2] {
        let (status, body, _) = seq_answer(rx).await;
        assert_eq!(status, 503, "{body}");
    }
    // B goes on, on its own worker.
    b_call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(b1).await.0, 200);
    let c = h.call().await;
    assert_eq!(
        (c.worker, c.ids.clone()),
        (b_call.worker, vec!["b2".to_string()])
    );
    c.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(b2).await.0, 200);
    // A's id is refused: its state died with the worker.
    let (status, body, _) = seq_answer(h.submit_seq("a3", "A")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("lost when its worker stopped"), "{body}");
}

#[tokio::test(start_paused = true)]
async fn scaling_down_keeps_workers_that_hold_sessions() {
    let rule = AutoscaleRule {
        interval: Duration::from_millis(100),
        queue_per_worker: 1,
        up_samples: 2,
        down_samples: 3,
    };
    let mut s = seq_settings(1, 4, 4);
    s.autoscale = rule;
    let mut h = harness(s, &[]);
    assert_eq!(h.pool.scale(2, 2, true).await, 2);
    let a = h.submit_seq("a1", "A");
    let call = h.call().await;
    let holder = call.worker;
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(a).await.0, 200);
    let idle_from = Instant::now();
    // Autoscaling may go down to zero: the idle worker without a session goes...
    h.pool.scale(0, 2, false).await;
    let st = h.until(|s| s.workers.len() == 1).await;
    assert_eq!(st.workers[0].id, holder, "the session's worker is kept");
    // ...and the session's worker stays while the session is open (1 s idle limit), serving it.
    tokio::time::sleep_until(idle_from + Duration::from_millis(900)).await;
    let st = h.pool.describe().await;
    assert_eq!(st.workers.len(), 1);
    let a = h.submit_seq("a2", "A");
    let call = h.call().await;
    assert_eq!(call.worker, holder);
    call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(a).await.0, 200);
    // Once the session has expired, the worker is idle like any other and is stopped.
    h.until(|s| s.workers.is_empty()).await;
    // An explicit scale-down stops a worker without sessions before one with, even an older
    // one: X's session on the older worker expires, B's on the newer one stays open.
    h.pool.scale(2, 2, true).await;
    let x = h.submit_seq("x1", "X");
    let x_call = h.call().await;
    let b = h.submit_seq("b1", "B");
    let b_call = h.call().await;
    assert!(b_call.worker > x_call.worker, "B went to the newer worker");
    let holder = b_call.worker;
    x_call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(x).await.0, 200);
    let x_idle_from = Instant::now();
    tokio::time::sleep(Duration::from_millis(600)).await;
    b_call.answer.send(Outcome::Ok).unwrap();
    assert_eq!(seq_answer(b).await.0, 200);
    tokio::time::sleep_until(x_idle_from + Duration::from_millis(1001)).await;
    h.pool.scale(1, 1, true).await;
    let st = h.until(|s| s.workers.len() == 1).await;
    assert_eq!(st.workers[0].id, holder);
}
