//! The supervisor: one task per model version that owns the queue, the worker slots and their
//! life cycle.
//!
//! It loops: wait for a message (a command from a [`super::Pool`] handle or an event from a
//! worker task) or for its next deadline (a batch delay, a restart, an autoscaling sample, a
//! scale waiter's timeout); handle everything that is pending; then make one step: start due
//! restarts, sample the autoscaler, let the batching policy hand out work, answer waiters, and
//! publish its state (the watch that describe and /ping read, and the gauges). Nothing else
//! writes that state, so what is reported is what the supervisor holds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
// The tokio clock, so that tests can run the scheduler on a paused clock.
use tokio::time::Instant;

use super::autoscale::{Autoscaler, Sample, Step};
use super::policy::{later, Assignment, BatchPolicy, Classic, InFlight, Sequences, WorkerView};
use super::runner::{Batch, Event, Failure, Runner, FIRST_BACKOFF, MAX_BACKOFF};
use super::{
    gpu_for, BatchMode, Command, Job, Msg, PoolError, PoolSettings, PoolStatus, WorkerInfo,
};
use super::{WorkerStatus, WorkerStatus as St};
use crate::backend::{BackendLoader, ModelSpec, WorkerSpec};
use crate::metrics::{ModelMetrics, WorkerState};

/// Messages handled per step at most, so deadlines are not starved under a flood of submits.
const MAX_MESSAGES_PER_STEP: usize = 256;

/// What [`Supervisor::new`] is built from.
pub(super) struct Parts {
    pub loader: Arc<dyn BackendLoader>,
    pub spec: Arc<ModelSpec>,
    pub settings: PoolSettings,
    pub metrics: Arc<ModelMetrics>,
    pub next_port: Arc<AtomicU32>,
    pub tx: mpsc::UnboundedSender<Msg>,
    pub status: watch::Sender<PoolStatus>,
}

/// One worker slot: a stable id and name that outlive restarts of its backend.
struct Slot {
    id: u32,
    gpu: i32,
    name: String,
    start_time: SystemTime,
    status: WorkerStatus,
    pid: Option<u32>,
    /// Where batches go; None when no task runs or once the worker is told to stop (dropping
    /// the sender is the stop signal: the task finishes its batch, then exits).
    tx: Option<mpsc::UnboundedSender<Batch>>,
    in_flight: usize,
    /// Told to stop (scale down or close): removed once its task exits.
    retiring: bool,
    /// Delay before the next restart; doubles per failure, back to the first once it served.
    backoff: Duration,
    restart_at: Option<Instant>,
    loaded_at: Option<Instant>,
    /// Continuous batching: the worker released jobs and waits for this step's refill, which
    /// it gets as its next batch (empty if nothing waits), so no step runs half empty while
    /// jobs wait in the queue.
    refill_due: bool,
    /// When this worker last failed and has not served since (ms since the epoch): TorchServe's
    /// auto-recovery lines name it.
    recovery_start: Option<u128>,
}

/// A scale request waiting for its workers to settle (or, without `wait`, for the next publish:
/// its deadline is then the moment it arrived).
struct Waiter {
    done: oneshot::Sender<usize>,
    deadline: Instant,
}

pub(super) struct Supervisor {
    loader: Arc<dyn BackendLoader>,
    spec: Arc<ModelSpec>,
    settings: PoolSettings,
    metrics: Arc<ModelMetrics>,
    next_port: Arc<AtomicU32>,
    tx: mpsc::UnboundedSender<Msg>,
    status: watch::Sender<PoolStatus>,
    policy: Box<dyn BatchPolicy>,
    slots: Vec<Slot>,
    min: u32,
    max: u32,
    closed: Option<String>,
    load_error: Option<String>,
    waiters: Vec<Waiter>,
    describers: Vec<oneshot::Sender<PoolStatus>>,
    autoscaler: Autoscaler,
    next_sample: Option<Instant>,
    batch_deadline: Option<Instant>,
    /// Gauge values last written, so unchanged gauges are not rewritten (log mode logs writes).
    shown_workers: [usize; 5],
    shown_queue: Option<usize>,
    /// Last value written to oxserve_requests_running (requests inside workers).
    shown_running: Option<usize>,
    views: Vec<WorkerView>,
    assignments: Vec<Assignment>,
    /// Shared with the worker tasks: response timeouts since the last answered batch.
    failed_inferences: Arc<AtomicU32>,
}

impl Supervisor {
    pub(super) fn new(p: Parts) -> Supervisor {
        let s = &p.settings;
        p.metrics.queue_capacity.set(s.queue_capacity as f64);
        let policy: Box<dyn BatchPolicy> = match (s.sequence, s.mode) {
            (Some(seq), mode) => Box::new(Sequences::new(
                seq,
                &p.spec.model_name,
                s.batch_size,
                mode == BatchMode::Continuous,
            )),
            (None, BatchMode::Classic) => Box::new(Classic::new(
                s.batch_size,
                s.max_batch_delay,
                s.queue_capacity,
            )),
            (None, BatchMode::Async) => Box::new(InFlight::new(s.queue_capacity)),
            // Continuous batching refills a worker's free slots (batchSize in all) as soon as
            // it releases finished jobs: the same hand-out rule with batchSize as the room.
            (None, BatchMode::Continuous) => Box::new(InFlight::new(s.batch_size.max(1) as usize)),
        };
        Supervisor {
            loader: p.loader,
            spec: p.spec,
            settings: p.settings,
            metrics: p.metrics,
            next_port: p.next_port,
            tx: p.tx,
            status: p.status,
            policy,
            slots: Vec::new(),
            min: 0,
            max: 0,
            closed: None,
            load_error: None,
            waiters: Vec::new(),
            describers: Vec::new(),
            autoscaler: Autoscaler::default(),
            next_sample: None,
            batch_deadline: None,
            // What `Metrics::model` starts every series at; writing only changes also keeps a
            // supervisor that never runs a worker (a registration refused as a duplicate) from
            // overwriting the live version's gauges.
            shown_workers: [0; 5],
            shown_queue: Some(0),
            shown_running: Some(0),
            views: Vec::new(),
            assignments: Vec::new(),
            failed_inferences: Arc::new(AtomicU32::new(0)),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        self.publish();
        loop {
            let wake = self.next_wake();
            let first = match wake {
                Some(at) => tokio::select! {
                    m = rx.recv() => Some(m),
                    _ = tokio::time::sleep_until(at) => None,
                },
                None => Some(rx.recv().await),
            };
            match first {
                // Cannot happen while this task holds a sender; treat it as a close.
                Some(None) => {
                    self.close("the model version was dropped".into());
                    self.step(Instant::now());
                }
                Some(Some(msg)) => {
                    // One clock reading per turn serves its messages and its step: they are
                    // microseconds apart, and reading the clock per message showed in the
                    // request path's profile.
                    let now = Instant::now();
                    self.handle(msg, now);
                    for _ in 0..MAX_MESSAGES_PER_STEP {
                        match rx.try_recv() {
                            Ok(m) => self.handle(m, now),
                            Err(_) => break,
                        }
                    }
                    self.step(now);
                }
                None => self.step(Instant::now()),
            }
            if self.closed.is_some() && self.slots.is_empty() {
                break;
            }
        }
        self.status.send_modify(|s| s.stopped = true);
        tracing::debug!(
            model = %self.spec.model_name,
            version = %self.spec.model_version,
            "scheduler stopped"
        );
    }

    /// The earliest deadline the loop must wake for.
    fn next_wake(&self) -> Option<Instant> {
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let waiters = self.waiters.iter().map(|w| w.deadline);
        restarts
            .chain(waiters)
            .chain(self.next_sample)
            .chain(self.batch_deadline)
            .min()
    }

    fn handle(&mut self, msg: Msg, now: Instant) {
        match msg {
            Msg::Command(Command::Submit(job)) => self.submit(*job, now),
            Msg::Command(Command::Scale {
                min,
                max,
                wait,
                done,
            }) => self.scale(min, max, wait, done, now),
            Msg::Command(Command::Describe(tx)) => self.describers.push(tx),
            Msg::Command(Command::Close(reason)) => self.close(reason),
            Msg::Worker(e) => self.on_event(e, now),
        }
    }

    fn submit(&mut self, job: Job, now: Instant) {
        if let Some(reason) = &self.closed {
            return job.fail(&PoolError::Closed(reason.clone()));
        }
        if self.policy.len() >= self.settings.queue_capacity {
            return job.fail(&PoolError::QueueFull(self.spec.model_name.clone()));
        }
        self.policy.push(job, now);
    }

    /// Workers counted against min/max: every one not told to stop.
    fn active(&self) -> usize {
        self.slots.iter().filter(|s| !s.retiring).count()
    }

    fn scale(
        &mut self,
        min: u32,
        max: u32,
        wait: bool,
        done: oneshot::Sender<usize>,
        now: Instant,
    ) {
        if self.closed.is_some() {
            let _ = done.send(0);
            return;
        }
        let (min, max) = (min.min(super::MAX_WORKERS), max.min(super::MAX_WORKERS));
        self.min = min;
        self.max = max;
        self.metrics.workers_min.set(f64::from(min));
        self.metrics.workers_max.set(f64::from(max));
        self.autoscaler.reset();
        self.next_sample = (min < max).then(|| now + self.settings.autoscale.interval);
        let active = self.active() as u32;
        if active > max {
            let n = self.retire_some(active - max, false);
            self.metrics.scaled(false, false, n);
        }
        if active < min {
            for _ in active..min {
                self.add_worker(now);
            }
            self.metrics.scaled(true, false, min - active);
        }
        // Answered after this step's publish, like every reply: the caller may read the
        // published state as soon as it has the answer (start-up marks /ping ready then).
        self.waiters.push(Waiter {
            done,
            deadline: if wait {
                later(now, self.settings.startup_timeout)
            } else {
                now
            },
        });
    }

    /// Tells up to `n` workers to stop: those not serving first (waiting to restart, loading,
    /// idle), then those holding sessions (sequence batching), then the newest. With
    /// `idle_only` (autoscaling), only live idle ones that hold no session. Returns how many.
    fn retire_some(&mut self, n: u32, idle_only: bool) -> u32 {
        let policy = &self.policy;
        let mut order: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !self.slots[i].retiring)
            .filter(|&i| {
                let s = &self.slots[i];
                !idle_only
                    || (s.status == St::Ready && s.in_flight == 0 && !policy.holds_state(s.id))
            })
            .collect();
        order.sort_by_key(|&i| {
            let s = &self.slots[i];
            (
                s.in_flight > 0,
                policy.holds_state(s.id),
                std::cmp::Reverse(s.id),
            )
        });
        order.truncate(n as usize);
        let ids: Vec<u32> = order.iter().map(|&i| self.slots[i].id).collect();
        for id in &ids {
            self.retire(*id);
        }
        ids.len() as u32
    }

    fn retire(&mut self, id: u32) {
        let Some(i) = self.slots.iter().position(|s| s.id == id) else {
            return;
        };
        let slot = &mut self.slots[i];
        slot.retiring = true;
        slot.restart_at = None;
        if slot.tx.take().is_some() {
            slot.status = St::Stopping;
        } else {
            // Waiting to restart: no task to stop.
            self.remove(i);
        }
    }

    fn remove(&mut self, i: usize) {
        let slot = self.slots.remove(i);
        self.policy.on_worker_gone(slot.id);
        self.spec.metrics.forget_worker(&slot.name);
        tracing::info!(worker = %slot.name, "worker stopped");
    }

    fn add_worker(&mut self, now: Instant) {
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        let first = self.spec.settings.initial_worker_port;
        let gpus = self.spec.settings.number_of_gpu.unwrap_or(0);
        let slot = Slot {
            id: port,
            gpu: gpu_for(port, first, gpus),
            name: format!(
                "W-{port}-{}_{}",
                self.spec.model_name, self.spec.model_version
            ),
            start_time: SystemTime::now(),
            status: St::Starting,
            pid: None,
            tx: None,
            in_flight: 0,
            retiring: false,
            backoff: FIRST_BACKOFF,
            restart_at: None,
            loaded_at: None,
            refill_due: false,
            recovery_start: None,
        };
        self.slots.push(slot);
        let i = self.slots.len() - 1;
        self.start(i, now);
    }

    /// Starts a task (a fresh backend) for slot `i`.
    fn start(&mut self, i: usize, _now: Instant) {
        let slot = &mut self.slots[i];
        let spec = WorkerSpec {
            id: slot.id,
            name: slot.name.clone(),
            gpu_id: slot.gpu,
            model: self.spec.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let runner = Runner {
            slot: slot.id,
            mode: self.settings.mode,
            spec,
            loader: self.loader.clone(),
            metrics: self.metrics.clone(),
            events: self.tx.clone(),
            failed_inferences: self.failed_inferences.clone(),
        };
        slot.tx = Some(tx);
        slot.status = St::Starting;
        slot.pid = None;
        slot.restart_at = None;
        slot.loaded_at = None;
        slot.in_flight = 0;
        slot.refill_due = false;
        tokio::spawn(runner.run(rx));
    }

    fn close(&mut self, reason: String) {
        if self.closed.is_some() {
            return;
        }
        let e = PoolError::Closed(reason.clone());
        for job in self.policy.drain() {
            job.fail(&e);
        }
        self.closed = Some(reason);
        self.next_sample = None;
        self.batch_deadline = None;
        let ids: Vec<u32> = self.slots.iter().map(|s| s.id).collect();
        for id in ids {
            self.retire(id);
        }
        for w in self.waiters.drain(..) {
            let _ = w.done.send(0);
        }
    }

    fn on_event(&mut self, e: Event, now: Instant) {
        match e {
            Event::Loaded { slot, pid } => {
                let Some(s) = self.slots.iter_mut().find(|s| s.id == slot) else {
                    return;
                };
                s.pid = Some(pid);
                s.loaded_at = Some(now);
                if s.recovery_start.take().is_some() {
                    tracing::info!(worker = %s.name, "Auto recovery succeeded, reset recoveryStartTS");
                }
                s.status = if s.retiring { St::Stopping } else { St::Ready };
                self.load_error = None;
            }
            Event::Released { slot, n, seq } => {
                self.policy.on_released(slot, n);
                if !seq.done.is_empty() || !seq.ended.is_empty() {
                    self.policy.on_answered(&seq.done, &seq.ended, now);
                }
                let Some(s) = self.slots.iter_mut().find(|s| s.id == slot) else {
                    return;
                };
                s.in_flight = s.in_flight.saturating_sub(n);
                // It served: the next failure restarts it quickly again.
                s.backoff = FIRST_BACKOFF;
                self.failed_inferences.store(0, Ordering::Relaxed);
                s.refill_due = self.settings.mode == BatchMode::Continuous;
                s.status = match (s.retiring, s.in_flight) {
                    (true, _) => St::Stopping,
                    (false, 0) => St::Ready,
                    (false, _) => St::Busy,
                };
            }
            Event::Exited { slot, failure } => {
                let Some(i) = self.slots.iter().position(|s| s.id == slot) else {
                    return;
                };
                self.policy.on_worker_gone(slot);
                let s = &mut self.slots[i];
                s.tx = None;
                s.pid = None;
                s.in_flight = 0;
                let failure = match failure {
                    Some(f) if !s.retiring && self.closed.is_none() => f,
                    _ => return self.remove(i),
                };
                let stayed_up = s
                    .loaded_at
                    .is_some_and(|t| now.saturating_duration_since(t) >= MAX_BACKOFF);
                let delay = if stayed_up { FIRST_BACKOFF } else { s.backoff };
                s.backoff = (delay * 2).min(MAX_BACKOFF);
                s.restart_at = Some(now + delay);
                s.status = St::Backoff;
                // TorchServe's lines for a lost worker and its recovery, which its
                // test_auto_recover and operators' alerts grep.
                tracing::info!(worker = %s.name, "{} Worker disconnected. WORKER_STOPPED", s.name);
                if s.recovery_start.is_none() {
                    let ms = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_millis();
                    s.recovery_start = Some(ms);
                    tracing::info!(worker = %s.name, "Auto recovery start timestamp: {ms}");
                } else {
                    tracing::warn!(worker = %s.name, "Auto recovery failed again");
                }
                tracing::info!(
                    worker = %s.name,
                    "Retry worker: {} in {} seconds.",
                    s.name,
                    delay.as_secs_f64()
                );
                match failure {
                    Failure::Load(why) => {
                        // Two lines, as TorchServe logs the exception under the message: its
                        // tests (test_startup_timeout) and operators read the line after
                        // "Backend worker error" for the cause.
                        tracing::error!(
                            worker = %s.name,
                            "Backend worker error; retrying in {delay:?}\norg.pytorch.serve.wlm.WorkerInitializationException: {}",
                            without_worker_output(&why)
                        );
                        self.load_error = Some(why);
                    }
                    Failure::Died(why) => {
                        tracing::warn!(
                            worker = %s.name,
                            "worker restarting in {delay:?}: {}",
                            without_worker_output(&why)
                        );
                    }
                }
            }
        }
    }

    /// One step after the pending messages: restarts, autoscaling, dispatch, publish, waiters.
    fn step(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].restart_at.is_some_and(|t| t <= now) {
                self.start(i, now);
            }
        }
        if self.next_sample.is_some_and(|t| t <= now) {
            self.next_sample = Some(now + self.settings.autoscale.interval);
            self.autoscale(now);
        }
        self.dispatch(now);
        for s in self.slots.iter_mut().filter(|s| s.refill_due) {
            s.refill_due = false;
            if let Some(tx) = &s.tx {
                let _ = tx.send(Vec::new());
            }
        }
        // Publish first: a scale waiter or describer reads the published state as soon as it
        // is answered (a synchronous registration checks the load error), maybe on another
        // thread before this step ends.
        self.publish();
        self.answer_waiters(now);
        if !self.describers.is_empty() {
            let status = self.status.borrow().clone();
            for d in self.describers.drain(..) {
                let _ = d.send(status.clone());
            }
        }
    }

    fn autoscale(&mut self, now: Instant) {
        let mut sample = Sample {
            queued: self.policy.len(),
            workers: self.active() as u32,
            min: self.min,
            max: self.max,
            ..Sample::default()
        };
        for s in self.slots.iter().filter(|s| !s.retiring) {
            match s.status {
                St::Ready | St::Busy => {
                    sample.live += 1;
                    if s.in_flight == 0 {
                        sample.idle += 1;
                    }
                }
                // A worker on its way (loading, or waiting to restart after a crash) is not
                // judged: more workers would not help it.
                St::Starting | St::Backoff => sample.starting += 1,
                St::Stopping => {}
            }
        }
        match self.autoscaler.sample(&self.settings.autoscale, sample) {
            Some(Step::Up) => {
                tracing::info!(
                    model = %self.spec.model_name,
                    "autoscaling up: {} waiting for {} workers",
                    sample.queued,
                    sample.live
                );
                self.add_worker(now);
                self.metrics.scaled(true, true, 1);
            }
            Some(Step::Down) if self.retire_some(1, true) == 1 => {
                tracing::info!(model = %self.spec.model_name, "autoscaling down: idle workers");
                self.metrics.scaled(false, true, 1);
            }
            Some(Step::Down) | None => {}
        }
    }

    fn dispatch(&mut self, now: Instant) {
        // An empty queue needs no dispatch, except by a policy with timers of its own (sequence
        // batching closes idle sessions).
        if self.policy.is_empty() && !self.policy.has_timers() {
            self.batch_deadline = None;
            return;
        }
        let capacity = self.policy.capacity();
        self.views.clear();
        self.views.extend(
            self.slots
                .iter()
                .filter(|s| s.status.live() && s.tx.is_some())
                .map(|s| WorkerView {
                    id: s.id,
                    in_flight: s.in_flight,
                    capacity,
                }),
        );
        self.batch_deadline = self
            .policy
            .dispatch(now, &self.views, &mut self.assignments);
        for a in self.assignments.drain(..) {
            let Some(s) = self.slots.iter_mut().find(|s| s.id == a.worker) else {
                fail_jobs(a.jobs, &PoolError::WorkerDied("the worker is gone".into()));
                continue;
            };
            let n = a.jobs.len();
            let sent = match &s.tx {
                Some(tx) => tx.send(a.jobs).map_err(|e| e.0),
                None => Err(a.jobs),
            };
            match sent {
                Ok(()) => {
                    s.in_flight += n;
                    s.status = St::Busy;
                }
                // Its task ended and the exit is not handled yet: a policy that tops up busy
                // workers can hit this; the jobs are answered rather than lost.
                Err(jobs) => fail_jobs(
                    jobs,
                    &PoolError::WorkerDied("the worker exited before it took the batch".into()),
                ),
            }
        }
    }

    fn answer_waiters(&mut self, now: Instant) {
        if self.waiters.is_empty() {
            return;
        }
        let settled = self
            .slots
            .iter()
            .all(|s| !matches!(s.status, St::Starting | St::Stopping));
        // A load that failed while nothing serves will not fix itself by waiting.
        let failed = self.load_error.is_some() && !self.slots.iter().any(|s| s.status.live());
        let n = self.active();
        let mut i = 0;
        while i < self.waiters.len() {
            if settled || failed || self.waiters[i].deadline <= now {
                let w = self.waiters.swap_remove(i);
                let _ = w.done.send(n);
            } else {
                i += 1;
            }
        }
    }

    /// Writes the state to the watch and the gauges, changing only what changed.
    fn publish(&mut self) {
        let queue_len = self.policy.len();
        if self.shown_queue != Some(queue_len) {
            self.metrics.queue_depth.set(queue_len as f64);
            self.shown_queue = Some(queue_len);
        }
        // Running vs waiting, the pair LLM operators watch: what the workers hold now.
        let running: usize = self.slots.iter().map(|s| s.in_flight).sum();
        if self.shown_running != Some(running) {
            self.metrics.requests_running.set(running as f64);
            self.shown_running = Some(running);
        }
        let mut counts = [0usize; 5];
        for s in &self.slots {
            counts[s.status.gauge() as usize] += 1;
        }
        for st in WorkerState::ALL {
            let i = st as usize;
            if counts[i] != self.shown_workers[i] {
                self.metrics.set_workers(st, counts[i] as f64);
                self.shown_workers[i] = counts[i];
            }
        }
        let slots = &self.slots;
        let (min, max) = (self.min, self.max);
        let closed = self.closed.is_some();
        let load_error = &self.load_error;
        // Waiters are woken only for changes someone waits for (workers coming, going, failing,
        // min/max, close). The queue length and a worker's flip between ready and busy change
        // with every request: they are written for readers of the latest state, but waking the
        // watch's waiters for them (eight locked `Notify`s) showed as about 0.3 us per request
        // in profiles, and nothing waits for them (describe asks this task, /ping counts live
        // workers).
        self.status.send_if_modified(|st| {
            let mut changed = false;
            let mut set = |changed_now: bool| changed |= changed_now;
            st.queue_len = queue_len;
            set(st.min_workers != min || st.max_workers != max);
            st.min_workers = min;
            st.max_workers = max;
            set(st.closed != closed);
            st.closed = closed;
            if st.load_error != *load_error {
                st.load_error.clone_from(load_error);
                set(true);
            }
            let same_slots = st.workers.len() == slots.len()
                && st.workers.iter().zip(slots).all(|(w, s)| w.id == s.id);
            if !same_slots {
                st.workers = slots.iter().map(info).collect();
                set(true);
            } else {
                for (w, s) in st.workers.iter_mut().zip(slots) {
                    if w.status != s.status || w.pid != s.pid {
                        set(w.pid != s.pid || !(w.status.live() && s.status.live()));
                        w.status = s.status;
                        w.state = s.status.gauge();
                        w.pid = s.pid;
                    }
                }
            }
            changed
        });
    }
}

fn info(s: &Slot) -> WorkerInfo {
    WorkerInfo {
        id: s.id,
        gpu: s.gpu,
        name: s.name.clone(),
        start_time: s.start_time,
        state: s.status.gauge(),
        status: s.status,
        pid: s.pid,
    }
}

fn fail_jobs(jobs: Vec<Job>, e: &PoolError) {
    for job in jobs {
        job.fail(e);
    }
}

/// A failure's reason without the worker's last output line that the Python backend appends
/// (`; last output: AssertionError`): that line is already in the log just above, among the
/// worker's own lines, and repeating it makes the exception's last line appear twice per failure,
/// which TorchServe's test_handler_traceback_logging (and anyone counting failures by grepping the
/// exception name) reads as two failures. Describe and registration errors keep the whole reason.
fn without_worker_output(why: &str) -> &str {
    why.split_once("; last output: ")
        .map_or(why, |(head, _)| head)
}
