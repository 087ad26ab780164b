//! Batching policies: which queued jobs go to which worker, and when.
//!
//! The supervisor owns the workers; a policy owns the waiting jobs and decides. The supervisor
//! calls [`BatchPolicy::dispatch`] after every step with a view of each worker that can serve
//! and acts on what it returns; it calls it again at the returned deadline if nothing else
//! happens first. Policies never see processes or clocks of their own (`now` is passed in), so
//! each is unit-tested by feeding jobs and views and asserting what is handed out.
//!
//! TorchServe has one aggregator class per policy wired into its worker threads
//! (BatchAggregator, AsyncBatchAggregator, ContinuousBatching, SequenceBatching). Here they are
//! one interface, shaped so the other three fit:
//! - async (many requests in flight per worker, replies interleaved by request id): a worker's
//!   [`WorkerView::capacity`] is the in-flight limit; the policy hands out up to `free` jobs
//!   whenever a worker has room, and each reply releases one job
//!   ([`BatchPolicy::on_released`]).
//! - continuous (jobs stay in the worker's batch while replies carry ts_stream_next=true):
//!   capacity is batch_size; a worker releases the jobs that finished at each step and the
//!   policy refills exactly those free slots from the queue at the next dispatch.
//! - sequence (sessions pinned to one worker): the policy keeps a queue per session and a
//!   session -> worker map; it gives a worker only jobs of sessions pinned to it (or pins a new
//!   session to the least loaded worker) and forgets the pins of a worker that is gone
//!   ([`BatchPolicy::on_worker_gone`]).
//!
//! [`Classic`], [`InFlight`] (async, and continuous with batch_size as the room) and
//! [`Sequences`] (sequence batching, alone or with continuous batching) are implemented.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Job, PoolError, SequenceSettings};
use super::{SEQUENCE_ID_HEADER, SEQUENCE_START_HEADER};

/// `t + d`, or a century from `t` when `d` is too large to add (a configured delay or timeout may
/// be any u64): a deadline that never comes rather than a panic in the scheduler.
pub fn later(t: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    t.checked_add(d.min(CENTURY)).unwrap_or(t)
}

/// A worker that can take work now, as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerView {
    pub id: u32,
    /// Jobs handed to this worker and not released yet.
    pub in_flight: usize,
    /// Jobs it may hold at once (the policy's [`BatchPolicy::capacity`]).
    pub capacity: usize,
}

impl WorkerView {
    /// Room for more jobs.
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.in_flight)
    }
}

/// Work handed to one worker.
pub struct Assignment {
    pub worker: u32,
    pub jobs: Vec<Job>,
}

/// The interface every batching policy implements.
pub trait BatchPolicy: Send {
    /// The policy's name (describe, logs).
    fn name(&self) -> &'static str;
    /// Jobs a worker may hold at once.
    fn capacity(&self) -> usize;
    /// Jobs waiting (what the queue-capacity limit and the queue-depth gauge count).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether [`BatchPolicy::dispatch`] has deadlines of its own even with nothing queued.
    fn has_timers(&self) -> bool {
        false
    }
    /// Adds a job that was admitted to the queue at `now`.
    fn push(&mut self, job: Job, now: Instant);
    /// Hands out work to the `workers` that can serve, appending to `out`. Returns when to be
    /// called again if nothing changes before (a batching deadline), or None.
    fn dispatch(
        &mut self,
        now: Instant,
        workers: &[WorkerView],
        out: &mut Vec<Assignment>,
    ) -> Option<Instant>;
    /// A worker answered `n` of its jobs.
    fn on_released(&mut self, _worker: u32, _n: usize) {}
    /// Sequence batching: jobs of these sessions were answered (one entry per job), and the
    /// handler ended these sessions (TorchServe's `ts_request_sequence_end` reply header).
    fn on_answered(&mut self, _done: &[Arc<str>], _ended: &[String], _now: Instant) {}
    /// A worker is gone (stopped or died); whatever the policy pinned to it is released.
    fn on_worker_gone(&mut self, _worker: u32) {}
    /// Whether stopping this worker would lose state the policy pinned to it (open sessions):
    /// scaling down stops such workers last, and autoscaling not at all.
    fn holds_state(&self, _worker: u32) -> bool {
        false
    }
    /// Removes every waiting job (close), oldest first.
    fn drain(&mut self) -> Vec<Job>;
}

/// TorchServe's classic batching: an idle worker takes up to `batch_size` jobs; it takes a
/// partial batch once `max_batch_delay` has passed since batching began, which is when there
/// was both a waiting job and an idle worker (TorchServe's worker polls for the first job, then
/// waits up to max_batch_delay for the rest). A worker takes a new batch only when it has
/// answered the previous one.
pub struct Classic {
    batch_size: usize,
    max_batch_delay: Duration,
    queue: VecDeque<Job>,
    /// When the current partial batch began collecting.
    collecting_since: Option<Instant>,
}

impl Classic {
    pub fn new(batch_size: u32, max_batch_delay: Duration, capacity_hint: usize) -> Classic {
        Classic {
            batch_size: batch_size.max(1) as usize,
            max_batch_delay,
            queue: VecDeque::with_capacity(capacity_hint.min(1024)),
            collecting_since: None,
        }
    }
}

impl BatchPolicy for Classic {
    fn name(&self) -> &'static str {
        "classic"
    }

    fn capacity(&self) -> usize {
        self.batch_size
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, job: Job, _now: Instant) {
        self.queue.push_back(job);
    }

    fn dispatch(
        &mut self,
        now: Instant,
        workers: &[WorkerView],
        out: &mut Vec<Assignment>,
    ) -> Option<Instant> {
        let mut idle = workers.iter().filter(|w| w.in_flight == 0);
        loop {
            if self.queue.is_empty() {
                self.collecting_since = None;
                return None;
            }
            let Some(worker) = idle.next() else {
                // Batching begins only when a worker is free to take the batch.
                self.collecting_since = None;
                return None;
            };
            if self.queue.len() < self.batch_size {
                let since = *self.collecting_since.get_or_insert(now);
                let deadline = later(since, self.max_batch_delay);
                if now < deadline {
                    return Some(deadline);
                }
            }
            let n = self.queue.len().min(self.batch_size);
            out.push(Assignment {
                worker: worker.id,
                jobs: self.queue.drain(..n).collect(),
            });
            self.collecting_since = None;
        }
    }

    fn drain(&mut self) -> Vec<Job> {
        self.collecting_since = None;
        self.queue.drain(..).collect()
    }
}

/// TorchServe's AsyncBatchAggregator (`asyncCommunication: true`): a job goes to a worker as
/// soon as one has room, without waiting for earlier jobs to be answered, so one worker holds
/// many requests at once (an engine such as vLLM batches them itself). Each job goes to the
/// worker with the fewest in flight; nothing waits for a batching delay, because the worker is
/// not idle-waiting for a full batch. TorchServe sends every queued job at once; here a worker
/// holds at most `capacity` (the queue size), so a runaway client cannot grow a worker's
/// backlog past what the queue itself would hold.
pub struct InFlight {
    capacity: usize,
    queue: VecDeque<Job>,
}

impl InFlight {
    pub fn new(capacity: usize) -> InFlight {
        InFlight {
            capacity: capacity.max(1),
            queue: VecDeque::with_capacity(capacity.min(1024)),
        }
    }
}

impl BatchPolicy for InFlight {
    fn name(&self) -> &'static str {
        "async"
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, job: Job, _now: Instant) {
        self.queue.push_back(job);
    }

    fn dispatch(
        &mut self,
        _now: Instant,
        workers: &[WorkerView],
        out: &mut Vec<Assignment>,
    ) -> Option<Instant> {
        // Jobs handed out now per worker, so that the least loaded one is judged with them.
        let mut given: Vec<usize> = vec![0; workers.len()];
        for _ in 0..self.queue.len() {
            let best = workers
                .iter()
                .enumerate()
                .filter(|(i, w)| w.in_flight + given[*i] < w.capacity)
                .min_by_key(|(i, w)| w.in_flight + given[*i]);
            let Some((i, _)) = best else { break };
            given[i] += 1;
        }
        for (w, n) in workers.iter().zip(given) {
            if n > 0 {
                out.push(Assignment {
                    worker: w.id,
                    jobs: self.queue.drain(..n).collect(),
                });
            }
        }
        None
    }

    fn drain(&mut self) -> Vec<Job> {
        self.queue.drain(..).collect()
    }
}

/// Longest sequence id accepted from a client, in bytes: ids are kept while their session is
/// open (and for a while after it expired), so their size is bounded like every input.
pub const MAX_SEQUENCE_ID_BYTES: usize = 256;

/// Ids of sessions that expired or were lost with their worker, remembered so that a client
/// still using one is told so rather than silently given a fresh, empty session. Bounded: the
/// oldest are forgotten first.
const REMEMBERED_GONE: usize = 4096;

/// One open session (TorchServe's JobGroup).
struct Session {
    /// Jobs waiting, each with when it was queued (cross-session order is oldest first).
    queue: VecDeque<(Job, Instant)>,
    /// The worker holding the session's state; None until its first job is handed out.
    worker: Option<u32>,
    /// Jobs handed to the worker and not answered yet.
    in_flight: usize,
    /// Latest activity (a job queued or answered): idle expiry counts from here.
    last_active: Instant,
    /// `sequenceTimeoutMSec` after the session started, if set.
    expires: Option<Instant>,
}

/// Why a session id is no longer served.
#[derive(Clone, Copy)]
enum Gone {
    Idle,
    Timeout,
    WorkerLost,
}

/// TorchServe's SequenceBatching and SequenceContinuousBatching (`sequenceBatching: true`):
/// requests carrying the same `ts_request_sequence_id` form a session whose state lives in one
/// worker, so every job of a session goes to the worker its first job went to, and in order.
///
/// - A request without the header starts a session: the policy gives it an id
///   (`ts-seq-<uuid>`, as TorchServe) and marks it with `ts_request_sequence_start: true`; a
///   request with an unknown id also starts one under that id (TorchServe does the same, and
///   its sequence-batching test relies on it), unless the id belongs to a session that expired
///   or was lost: that request is refused (400) so the client knows its state is gone.
/// - At most `maxNumSequence` sessions are open and at most `maxSequenceJobQueueSize` jobs of a
///   session wait; past either, the request gets TorchServe's 503.
/// - Plain mode: a worker takes a batch when idle, as in classic batching, with at most one job
///   per session, and a session's next job waits until the previous one is answered, so
///   replies build on each other in order. Continuous mode: a worker holds up to
///   2 x batchSize jobs (TorchServe's hard-coded figure) and a session's next job may join
///   while an earlier one is still streaming (that is how the stateful example cancels a
///   stream), still one new job per session per step.
/// - A session with nothing waiting or running for `sequenceMaxIdleMSec`, or older than
///   `sequenceTimeoutMSec`, is closed; a handler ends one with the `ts_request_sequence_end`
///   reply header. A worker that stops takes its sessions with it: their waiting jobs get 503.
///
/// Unlike TorchServe there is no batching delay (a worker's batch is whatever is ready when it
/// is free) and no polling threads: the supervisor's dispatch and deadlines do the work.
pub struct Sequences {
    cfg: SequenceSettings,
    model: String,
    continuous: bool,
    batch_size: usize,
    sessions: HashMap<Arc<str>, Session>,
    /// Open sessions pinned to each worker (new sessions go to the worker with the fewest).
    pins: HashMap<u32, usize>,
    queued: usize,
    gone: HashMap<Arc<str>, Gone>,
    gone_order: VecDeque<Arc<str>>,
}

impl Sequences {
    pub fn new(cfg: SequenceSettings, model: &str, batch_size: u32, continuous: bool) -> Sequences {
        Sequences {
            cfg,
            model: model.to_string(),
            continuous,
            batch_size: batch_size.max(1) as usize,
            sessions: HashMap::new(),
            pins: HashMap::new(),
            queued: 0,
            gone: HashMap::new(),
            gone_order: VecDeque::new(),
        }
    }

    /// Open sessions (describe, tests).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn forget(&mut self, id: &Arc<str>, why: Option<Gone>) -> Option<Session> {
        let s = self.sessions.remove(id)?;
        self.queued -= s.queue.len();
        if let Some(w) = s.worker {
            if let Some(n) = self.pins.get_mut(&w) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(why) = why {
            if self.gone.insert(id.clone(), why).is_none() {
                self.gone_order.push_back(id.clone());
            }
            while self.gone_order.len() > REMEMBERED_GONE {
                if let Some(old) = self.gone_order.pop_front() {
                    self.gone.remove(&old);
                }
            }
        }
        Some(s)
    }

    /// Closes sessions that are idle past `sequenceMaxIdleMSec` or past `sequenceTimeoutMSec`
    /// with nothing running; returns the next moment one may expire.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for (id, s) in &self.sessions {
            if s.in_flight > 0 || !s.queue.is_empty() {
                continue;
            }
            let idle_at = later(s.last_active, self.cfg.max_idle);
            let (at, why) = match s.expires {
                Some(t) if t < idle_at => (t, Gone::Timeout),
                _ => (idle_at, Gone::Idle),
            };
            if at <= now {
                expired.push((id.clone(), why));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        for (id, why) in expired {
            tracing::debug!(model = %self.model, sequence = %id, "sequence closed: idle or timed out");
            self.forget(&id, Some(why));
        }
        next
    }

    /// The session id of a request: its header, or a new one (marked as a start).
    fn session_id(job: &mut Job) -> Result<Arc<str>, PoolError> {
        let headers = &mut job.request.headers;
        let given = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(SEQUENCE_ID_HEADER))
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty());
        let Some(id) = given else {
            let id = format!("ts-seq-{}", crate::logging::new_request_id());
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(SEQUENCE_ID_HEADER));
            headers.push((SEQUENCE_ID_HEADER.to_string(), id.clone()));
            headers.push((SEQUENCE_START_HEADER.to_string(), "true".to_string()));
            return Ok(id.into());
        };
        if id.len() > MAX_SEQUENCE_ID_BYTES || id.chars().any(|c| c.is_control()) {
            return Err(PoolError::Sequence(format!(
                "{SEQUENCE_ID_HEADER} must be at most {MAX_SEQUENCE_ID_BYTES} bytes without \
                 control characters"
            )));
        }
        Ok(id.into())
    }

    fn refuse(job: Job, e: PoolError) {
        job.fail(&e);
    }
}

impl BatchPolicy for Sequences {
    fn name(&self) -> &'static str {
        if self.continuous {
            "sequence+continuous"
        } else {
            "sequence"
        }
    }

    fn capacity(&self) -> usize {
        if self.continuous {
            2 * self.batch_size
        } else {
            self.batch_size
        }
    }

    fn len(&self) -> usize {
        self.queued
    }

    fn has_timers(&self) -> bool {
        !self.sessions.is_empty()
    }

    fn push(&mut self, mut job: Job, now: Instant) {
        let id = match Sequences::session_id(&mut job) {
            Ok(id) => id,
            Err(e) => return Sequences::refuse(job, e),
        };
        let full = || PoolError::QueueFull(self.model.clone());
        if let Some(why) = self.gone.get(&id) {
            let why = match why {
                Gone::Idle => "was idle longer than sequenceMaxIdleMSec",
                Gone::Timeout => "is older than sequenceTimeoutMSec",
                Gone::WorkerLost => "was lost when its worker stopped",
            };
            let e = PoolError::Sequence(format!(
                "sequence {id:?} {why} and is closed; start a new sequence (send no \
                 {SEQUENCE_ID_HEADER} header)"
            ));
            return Sequences::refuse(job, e);
        }
        if let Some(s) = self.sessions.get(&id) {
            // Expired but not yet collected (the supervisor wakes at the deadline; this is the
            // same rule when a request arrives first).
            if s.in_flight == 0 && s.queue.is_empty() {
                let idle = later(s.last_active, self.cfg.max_idle) <= now;
                let timed_out = s.expires.is_some_and(|t| t <= now);
                if idle || timed_out {
                    let why = if timed_out { Gone::Timeout } else { Gone::Idle };
                    self.forget(&id, Some(why));
                    return self.push(job, now);
                }
            }
            if s.queue.len() >= self.cfg.max_queue as usize {
                tracing::warn!(model = %self.model, sequence = %id, "maxSequenceJobQueueSize reached");
                return Sequences::refuse(job, full());
            }
        } else {
            if self.sessions.len() >= self.cfg.max_sequences as usize {
                tracing::warn!(model = %self.model, sequence = %id, "maxNumSequence reached");
                return Sequences::refuse(job, full());
            }
            let expires = self.cfg.timeout.map(|t| later(now, t));
            self.sessions.insert(
                id.clone(),
                Session {
                    queue: VecDeque::new(),
                    worker: None,
                    in_flight: 0,
                    last_active: now,
                    expires,
                },
            );
        }
        job.sequence = Some(id.clone());
        if let Some(s) = self.sessions.get_mut(&id) {
            s.queue.push_back((job, now));
            s.last_active = now;
            self.queued += 1;
        }
    }

    fn dispatch(
        &mut self,
        now: Instant,
        workers: &[WorkerView],
        out: &mut Vec<Assignment>,
    ) -> Option<Instant> {
        let next = self.expire(now);
        if self.queued == 0 {
            return next;
        }
        // Room per worker: plain mode fills a worker only when it is idle (a classic batch).
        let mut room: Vec<usize> = workers
            .iter()
            .map(|w| {
                if self.continuous || w.in_flight == 0 {
                    w.free()
                } else {
                    0
                }
            })
            .collect();
        let mut ready: Vec<(Instant, Arc<str>)> = self
            .sessions
            .iter()
            .filter(|(_, s)| self.continuous || s.in_flight == 0)
            .filter_map(|(id, s)| s.queue.front().map(|(_, t)| (*t, id.clone())))
            .collect();
        ready.sort();
        let mut given: Vec<Vec<Job>> = workers.iter().map(|_| Vec::new()).collect();
        for (_, id) in ready {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            let target = match s.worker {
                Some(w) => workers.iter().position(|v| v.id == w),
                None => (0..workers.len())
                    .filter(|&i| room[i] > 0)
                    .min_by_key(|&i| {
                        let pinned = self.pins.get(&workers[i].id).copied().unwrap_or(0);
                        (pinned, std::cmp::Reverse(room[i]))
                    }),
            };
            let Some(i) = target.filter(|&i| room[i] > 0) else {
                continue;
            };
            let Some((job, _)) = s.queue.pop_front() else {
                continue;
            };
            if s.worker.is_none() {
                s.worker = Some(workers[i].id);
                *self.pins.entry(workers[i].id).or_insert(0) += 1;
            }
            s.in_flight += 1;
            self.queued -= 1;
            room[i] -= 1;
            given[i].push(job);
        }
        for (w, jobs) in workers.iter().zip(given) {
            if !jobs.is_empty() {
                out.push(Assignment { worker: w.id, jobs });
            }
        }
        // Idle workers may have been left out only because nothing was ready for them; a
        // session still waiting waits for its own worker's answer, which triggers a dispatch.
        next
    }

    fn on_answered(&mut self, done: &[Arc<str>], ended: &[String], now: Instant) {
        for id in done {
            if let Some(s) = self.sessions.get_mut(id) {
                s.in_flight = s.in_flight.saturating_sub(1);
                s.last_active = now;
            }
        }
        for list in ended {
            for id in list.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let id: Arc<str> = id.into();
                if let Some(s) = self.forget(&id, None) {
                    tracing::debug!(model = %self.model, sequence = %id, "sequence ended by the handler");
                    let e = PoolError::Sequence(format!(
                        "sequence {id:?} was ended by the model before this request was served"
                    ));
                    for (job, _) in s.queue {
                        job.fail(&e);
                    }
                }
            }
        }
    }

    fn holds_state(&self, worker: u32) -> bool {
        self.pins.get(&worker).is_some_and(|&n| n > 0)
    }

    fn on_worker_gone(&mut self, worker: u32) {
        let lost: Vec<Arc<str>> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.worker == Some(worker))
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            if let Some(s) = self.forget(&id, Some(Gone::WorkerLost)) {
                let e = PoolError::WorkerDied(format!(
                    "the worker holding sequence {id:?} stopped; its state is lost"
                ));
                for (job, _) in s.queue {
                    job.fail(&e);
                }
            }
        }
        self.pins.remove(&worker);
    }

    fn drain(&mut self) -> Vec<Job> {
        let mut all: Vec<(Instant, Job)> = Vec::with_capacity(self.queued);
        for (_, s) in self.sessions.drain() {
            all.extend(s.queue.into_iter().map(|(j, t)| (t, j)));
        }
        all.sort_by_key(|(t, _)| *t);
        self.queued = 0;
        self.pins.clear();
        all.into_iter().map(|(_, j)| j).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::InferRequest;
    use crate::metrics::Timings;

    fn job(id: &str) -> Job {
        let req = InferRequest {
            id: id.into(),
            ..Default::default()
        };
        Job::new(req, Timings::new(std::time::Instant::now())).0
    }

    fn idle(id: u32, cap: usize) -> WorkerView {
        WorkerView {
            id,
            in_flight: 0,
            capacity: cap,
        }
    }

    fn ids(a: &Assignment) -> Vec<String> {
        a.jobs.iter().map(|j| j.request.id.clone()).collect()
    }

    #[test]
    fn batch_size_one_dispatches_each_job_at_once() {
        let mut p = Classic::new(1, Duration::from_millis(100), 10);
        let t = Instant::now();
        p.push(job("a"), t);
        p.push(job("b"), t);
        let mut out = Vec::new();
        let wake = p.dispatch(t, &[idle(1, 1), idle(2, 1)], &mut out);
        assert_eq!(wake, None);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].worker, ids(&out[0])), (1, vec!["a".to_string()]));
        assert_eq!((out[1].worker, ids(&out[1])), (2, vec!["b".to_string()]));
        assert!(p.is_empty());
    }

    #[test]
    fn a_partial_batch_waits_for_max_batch_delay_then_goes() {
        let mut p = Classic::new(4, Duration::from_millis(100), 10);
        let t = Instant::now();
        p.push(job("a"), t);
        let mut out = Vec::new();
        let wake = p.dispatch(t, &[idle(1, 4)], &mut out);
        assert!(out.is_empty());
        assert_eq!(wake, Some(t + Duration::from_millis(100)));
        // A second job does not restart the delay.
        let t2 = t + Duration::from_millis(60);
        p.push(job("b"), t2);
        assert_eq!(
            p.dispatch(t2, &[idle(1, 4)], &mut out),
            Some(t + Duration::from_millis(100))
        );
        assert!(out.is_empty());
        let t3 = t + Duration::from_millis(100);
        assert_eq!(p.dispatch(t3, &[idle(1, 4)], &mut out), None);
        assert_eq!(out.len(), 1);
        assert_eq!(ids(&out[0]), ["a", "b"]);
    }

    #[test]
    fn a_full_batch_goes_at_once_and_the_rest_waits() {
        let mut p = Classic::new(2, Duration::from_secs(10), 10);
        let t = Instant::now();
        for id in ["a", "b", "c"] {
            p.push(job(id), t);
        }
        let mut out = Vec::new();
        let wake = p.dispatch(t, &[idle(7, 2), idle(8, 2)], &mut out);
        // Worker 7 gets a full batch; worker 8 starts collecting the next.
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].worker, ids(&out[0])),
            (7, vec!["a".into(), "b".into()])
        );
        assert_eq!(wake, Some(t + Duration::from_secs(10)));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn busy_workers_get_nothing_and_batching_starts_when_one_frees() {
        let mut p = Classic::new(2, Duration::from_millis(50), 10);
        let t = Instant::now();
        p.push(job("a"), t);
        let busy = WorkerView {
            id: 1,
            in_flight: 1,
            capacity: 2,
        };
        let mut out = Vec::new();
        // Classic never tops up a worker's batch, even with room: it has not answered yet.
        assert_eq!(p.dispatch(t, &[busy], &mut out), None);
        assert!(out.is_empty());
        // The delay counts from when a worker became free, not from the job's arrival.
        let later = t + Duration::from_secs(5);
        assert_eq!(
            p.dispatch(later, &[idle(1, 2)], &mut out),
            Some(later + Duration::from_millis(50))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn zero_delay_sends_partial_batches_immediately() {
        let mut p = Classic::new(8, Duration::ZERO, 10);
        let t = Instant::now();
        p.push(job("a"), t);
        let mut out = Vec::new();
        assert_eq!(p.dispatch(t, &[idle(1, 8)], &mut out), None);
        assert_eq!(ids(&out[0]), ["a"]);
    }

    #[test]
    fn drain_returns_everything_in_order() {
        let mut p = Classic::new(2, Duration::from_secs(1), 10);
        let t = Instant::now();
        for id in ["a", "b", "c"] {
            p.push(job(id), t);
        }
        let got: Vec<String> = p
            .drain()
            .into_iter()
            .map(|j| j.request.id.clone())
            .collect();
        assert_eq!(got, ["a", "b", "c"]);
        assert!(p.is_empty());
    }

    fn view(id: u32, in_flight: usize, capacity: usize) -> WorkerView {
        WorkerView {
            id,
            in_flight,
            capacity,
        }
    }

    #[test]
    fn async_hands_jobs_to_busy_workers_with_room_at_once() {
        let mut p = InFlight::new(3);
        let t = Instant::now();
        for id in ["a", "b", "c", "d"] {
            p.push(job(id), t);
        }
        let mut out = Vec::new();
        // Worker 1 already holds 2 (room for 1), worker 2 is idle (room for 3): no batching
        // delay, and the least loaded worker gets each job.
        assert_eq!(
            p.dispatch(t, &[view(1, 2, 3), view(2, 0, 3)], &mut out),
            None
        );
        let got: Vec<(u32, Vec<String>)> = out.iter().map(|a| (a.worker, ids(a))).collect();
        assert_eq!(
            got,
            vec![
                (1, vec!["a".to_string()]),
                (2, vec!["b".to_string(), "c".to_string(), "d".to_string()])
            ]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn async_keeps_jobs_while_every_worker_is_full() {
        let mut p = InFlight::new(2);
        let t = Instant::now();
        p.push(job("a"), t);
        let mut out = Vec::new();
        assert_eq!(p.dispatch(t, &[view(1, 2, 2)], &mut out), None);
        assert!(out.is_empty());
        assert_eq!(p.len(), 1);
        // One reply frees one slot: the waiting job goes at the next dispatch.
        p.on_released(1, 1);
        p.dispatch(t, &[view(1, 1, 2)], &mut out);
        assert_eq!(ids(&out[0]), ["a"]);
        // No worker at all: nothing is handed out, nothing is lost.
        p.push(job("b"), t);
        out.clear();
        assert_eq!(p.dispatch(t, &[], &mut out), None);
        assert!(out.is_empty());
        assert_eq!(p.drain().len(), 1);
    }

    #[test]
    fn async_spreads_jobs_evenly_over_idle_workers() {
        let mut p = InFlight::new(100);
        let t = Instant::now();
        for i in 0..6 {
            p.push(job(&i.to_string()), t);
        }
        let mut out = Vec::new();
        p.dispatch(
            t,
            &[view(1, 0, 100), view(2, 0, 100), view(3, 1, 100)],
            &mut out,
        );
        let sizes: Vec<(u32, usize)> = out.iter().map(|a| (a.worker, a.jobs.len())).collect();
        // Each job goes to the least loaded worker (the first on a tie): 3, 2 and 1+1 in flight.
        assert_eq!(sizes, vec![(1, 3), (2, 2), (3, 1)]);
    }

    // ---- sequence batching ----

    use crate::worker::{Reply, ReplyRx, SEQUENCE_END_HEADER};

    fn seq_cfg(max_sequences: u32, max_queue: u32) -> SequenceSettings {
        SequenceSettings {
            max_sequences,
            max_idle: Duration::from_millis(1000),
            timeout: None,
            max_queue,
        }
    }

    /// A job of session `seq` (None: a request that starts a new session).
    fn seq_job(id: &str, seq: Option<&str>) -> (Job, ReplyRx) {
        let mut req = InferRequest {
            id: id.into(),
            ..Default::default()
        };
        if let Some(s) = seq {
            req.headers.push((SEQUENCE_ID_HEADER.into(), s.into()));
        }
        Job::new(req, Timings::new(std::time::Instant::now()))
    }

    /// (status, body, headers) of a job's answer, which must have arrived already.
    fn answered(mut rx: ReplyRx) -> (u16, String, Vec<(String, String)>) {
        match rx.try_recv().expect("the job was answered") {
            Reply::Whole(p) => (
                p.response.status,
                String::from_utf8_lossy(&p.response.body).into_owned(),
                p.response.headers,
            ),
            Reply::Stream(..) => panic!("not a stream"),
        }
    }

    fn header<'a>(h: &'a [(String, String)], k: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    /// Hands out with every worker idle; returns (worker, request ids).
    fn hand_out(p: &mut Sequences, t: Instant, workers: &[WorkerView]) -> Vec<(u32, Vec<String>)> {
        let mut out = Vec::new();
        p.dispatch(t, workers, &mut out);
        out.iter().map(|a| (a.worker, ids(a))).collect()
    }

    /// Answers a handed-out job as a worker would.
    fn answer_job(p: &mut Sequences, job: Job, t: Instant, ended: Option<&str>) {
        let done = vec![job.sequence.clone().expect("a session job")];
        let mut r = crate::backend::InferResponse::ok("text/plain", "ok");
        let ended: Vec<String> = ended.map(String::from).into_iter().collect();
        if let Some(e) = ended.first() {
            r.headers.push((SEQUENCE_END_HEADER.into(), e.clone()));
        }
        job.finish(r);
        p.on_answered(&done, &ended, t);
    }

    #[test]
    fn a_request_without_a_sequence_id_starts_a_session_and_gets_its_id_back() {
        let mut p = Sequences::new(seq_cfg(4, 4), "m", 1, false);
        let t = Instant::now();
        let (j, rx) = seq_job("a", None);
        p.push(j, t);
        let mut out = Vec::new();
        p.dispatch(t, &[idle(1, 1)], &mut out);
        let job = out.remove(0).jobs.remove(0);
        let h = &job.request.headers;
        let id = header(h, SEQUENCE_ID_HEADER).expect("an id").to_string();
        assert!(id.starts_with("ts-seq-"), "{id}");
        assert_eq!(header(h, SEQUENCE_START_HEADER), Some("true"));
        answer_job(&mut p, job, t, None);
        let (status, _, headers) = answered(rx);
        assert_eq!(status, 200);
        assert_eq!(header(&headers, SEQUENCE_ID_HEADER), Some(id.as_str()));
        // The next request with that id continues the session: no start mark.
        let (j, _rx) = seq_job("b", Some(&id));
        p.push(j, t);
        p.dispatch(t, &[idle(1, 1)], &mut out);
        let h = &out[0].jobs[0].request.headers;
        assert_eq!(header(h, SEQUENCE_START_HEADER), None);
        assert_eq!(p.sessions(), 1);
    }

    #[test]
    fn sessions_are_pinned_to_one_worker_and_served_one_job_at_a_time() {
        let mut p = Sequences::new(seq_cfg(4, 10), "m", 4, false);
        let t = Instant::now();
        let mut rxs = Vec::new();
        for (id, s) in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")] {
            let (j, rx) = seq_job(id, Some(s));
            p.push(j, t);
            rxs.push(rx);
        }
        let workers = [idle(1, 4), idle(2, 4)];
        let mut out = Vec::new();
        p.dispatch(t, &workers, &mut out);
        // One job per session (its next waits for the answer), each session on its own worker.
        let got: Vec<(u32, Vec<String>)> = out.iter().map(|a| (a.worker, ids(a))).collect();
        assert_eq!(got, vec![(1, vec!["a1".into()]), (2, vec!["b1".into()])]);
        assert_eq!(p.len(), 2);
        // Nothing more while the first jobs are running, even with another worker idle.
        assert!(hand_out(&mut p, t, &[idle(3, 4)]).is_empty());
        let jobs: Vec<Job> = out.drain(..).flat_map(|a| a.jobs).collect();
        for job in jobs {
            answer_job(&mut p, job, t, None);
        }
        // A's second job goes to worker 1 and B's to worker 2, whatever else is idle.
        let got = hand_out(&mut p, t, &[idle(3, 4), idle(2, 4), idle(1, 4)]);
        assert_eq!(got, vec![(2, vec!["b2".into()]), (1, vec!["a2".into()])]);
    }

    #[test]
    fn a_busy_pinned_worker_makes_its_sessions_wait() {
        let mut p = Sequences::new(seq_cfg(4, 10), "m", 2, false);
        let t = Instant::now();
        let (j, _a) = seq_job("a1", Some("A"));
        p.push(j, t);
        assert_eq!(
            hand_out(&mut p, t, &[idle(1, 2)]),
            vec![(1, vec!["a1".into()])]
        );
        // A's worker is answering another batch: A's next job waits, even if A is done.
        let mut out = Vec::new();
        p.dispatch(t, &[idle(1, 2)], &mut out);
        let (j, _b) = seq_job("a2", Some("A"));
        p.on_answered(&["A".into()], &[], t);
        p.push(j, t);
        assert!(hand_out(&mut p, t, &[view(1, 1, 2), idle(2, 2)]).is_empty());
        assert_eq!(
            hand_out(&mut p, t, &[idle(1, 2)]),
            vec![(1, vec!["a2".into()])]
        );
    }

    #[test]
    fn max_num_sequence_and_the_per_sequence_queue_limit_answer_torchserve_503() {
        let mut p = Sequences::new(seq_cfg(2, 2), "m", 1, false);
        let t = Instant::now();
        let mut keep = Vec::new();
        for (id, s) in [("a1", "A"), ("a2", "A"), ("b1", "B")] {
            let (j, rx) = seq_job(id, Some(s));
            p.push(j, t);
            keep.push(rx);
        }
        // A third session is over maxNumSequence 2.
        let (j, rx) = seq_job("c1", Some("C"));
        p.push(j, t);
        let (status, body, _) = answered(rx);
        assert_eq!(status, 503);
        assert!(body.contains("ServiceUnavailableException"), "{body}");
        assert!(
            body.contains("has no worker to serve inference request"),
            "{body}"
        );
        // A third waiting job of A is over maxSequenceJobQueueSize 2.
        let (j, rx) = seq_job("a3", Some("A"));
        p.push(j, t);
        assert_eq!(answered(rx).0, 503);
        assert_eq!(p.len(), 3);
        assert_eq!(p.sessions(), 2);
    }

    #[test]
    fn idle_sessions_close_after_sequence_max_idle_and_their_id_is_refused() {
        let mut p = Sequences::new(seq_cfg(1, 1), "m", 1, false);
        let t = Instant::now();
        let (j, _rx) = seq_job("a1", Some("A"));
        p.push(j, t);
        let mut out = Vec::new();
        p.dispatch(t, &[idle(1, 1)], &mut out);
        let job = out.remove(0).jobs.remove(0);
        // Running: no idle deadline.
        assert_eq!(p.dispatch(t, &[], &mut out), None);
        let t1 = t + Duration::from_millis(300);
        answer_job(&mut p, job, t1, None);
        // Idle from the answer on.
        let due = t1 + Duration::from_millis(1000);
        assert_eq!(p.dispatch(t1, &[idle(1, 1)], &mut out), Some(due));
        assert_eq!(
            p.dispatch(due - Duration::from_millis(1), &[], &mut out),
            Some(due)
        );
        assert_eq!(p.sessions(), 1);
        assert_eq!(p.dispatch(due, &[], &mut out), None);
        assert_eq!(p.sessions(), 0);
        let (j, rx) = seq_job("a2", Some("A"));
        p.push(j, due);
        let (status, body, _) = answered(rx);
        assert_eq!(status, 400);
        assert!(body.contains("sequenceMaxIdleMSec"), "{body}");
        // The freed slot takes a new session (maxNumSequence is 1).
        let (j, _rx) = seq_job("b1", Some("B"));
        p.push(j, due);
        assert_eq!(p.sessions(), 1);
    }

    #[test]
    fn sequence_timeout_closes_a_session_however_busy() {
        let mut cfg = seq_cfg(2, 2);
        cfg.timeout = Some(Duration::from_millis(500));
        let mut p = Sequences::new(cfg, "m", 1, false);
        let t = Instant::now();
        let (j, _rx) = seq_job("a1", Some("A"));
        p.push(j, t);
        let mut out = Vec::new();
        p.dispatch(t, &[idle(1, 1)], &mut out);
        let job = out.remove(0).jobs.remove(0);
        answer_job(&mut p, job, t + Duration::from_millis(100), None);
        let t2 = t + Duration::from_millis(500);
        let (j, rx) = seq_job("a2", Some("A"));
        p.push(j, t2);
        let (status, body, _) = answered(rx);
        assert_eq!(status, 400);
        assert!(body.contains("sequenceTimeoutMSec"), "{body}");
    }

    #[test]
    fn a_gone_worker_fails_only_its_sessions_waiting_jobs() {
        let mut p = Sequences::new(seq_cfg(4, 4), "m", 1, false);
        let t = Instant::now();
        let mut rx = HashMap::new();
        for (id, s) in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B")] {
            let (j, r) = seq_job(id, Some(s));
            p.push(j, t);
            rx.insert(id, r);
        }
        let mut out = Vec::new();
        p.dispatch(t, &[idle(1, 1), idle(2, 1)], &mut out);
        let got: Vec<(u32, Vec<String>)> = out.iter().map(|a| (a.worker, ids(a))).collect();
        assert_eq!(got, vec![(1, vec!["a1".into()]), (2, vec!["b1".into()])]);
        // Worker 1 dies (its running job is the runner's to answer): A's waiting job gets 503.
        p.on_worker_gone(1);
        let (status, body, _) = answered(rx.remove("a2").unwrap());
        assert_eq!(status, 503);
        assert!(body.contains("its state is lost"), "{body}");
        // B is untouched and goes on on worker 2.
        assert!(rx.get_mut("b2").unwrap().try_recv().is_err());
        let jobs: Vec<Job> = out.drain(..).flat_map(|a| a.jobs).collect();
        for j in jobs.into_iter().filter(|j| j.request.id == "b1") {
            answer_job(&mut p, j, t, None);
        }
        assert_eq!(
            hand_out(&mut p, t, &[idle(2, 1)]),
            vec![(2, vec!["b2".into()])]
        );
        // A's id is refused from now on: its state went with the worker.
        let (j, r) = seq_job("a3", Some("A"));
        p.push(j, t);
        let (status, body, _) = answered(r);
        assert_eq!(status, 400);
        assert!(body.contains("lost when its worker stopped"), "{body}");
    }

    #[test]
    fn continuous_mode_lets_a_session_send_its_next_job_while_one_streams() {
        let mut p = Sequences::new(seq_cfg(2, 10), "m", 1, true);
        assert_eq!(p.capacity(), 2);
        let t = Instant::now();
        for id in ["s1", "s2", "s3"] {
            let (j, _) = seq_job(id, Some("A"));
            p.push(j, t);
        }
        // One new job of a session per step, to its pinned worker, while earlier ones run.
        assert_eq!(
            hand_out(&mut p, t, &[idle(1, 2), idle(2, 2)]),
            vec![(1, vec!["s1".into()])]
        );
        assert_eq!(
            hand_out(&mut p, t, &[view(1, 1, 2), idle(2, 2)]),
            vec![(1, vec!["s2".into()])]
        );
        // Worker 1 is full (2 x batchSize): s3 waits.
        assert!(hand_out(&mut p, t, &[view(1, 2, 2), idle(2, 2)]).is_empty());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn the_sequence_end_reply_header_closes_the_session_and_frees_its_slot() {
        let mut p = Sequences::new(seq_cfg(1, 2), "m", 1, false);
        let t = Instant::now();
        let (j, _rx) = seq_job("a1", Some("A"));
        p.push(j, t);
        let (j, rx2) = seq_job("a2", Some("A"));
        p.push(j, t);
        let mut out = Vec::new();
        p.dispatch(t, &[idle(1, 1)], &mut out);
        let job = out.remove(0).jobs.remove(0);
        answer_job(&mut p, job, t, Some(" A ;other"));
        assert_eq!(p.sessions(), 0);
        assert_eq!(p.len(), 0);
        // The job that waited behind the end is answered, not lost.
        let (status, body, _) = answered(rx2);
        assert_eq!(status, 400);
        assert!(body.contains("ended by the model"), "{body}");
        // An ended id is not remembered: the client may start over with it.
        let (j, _rx) = seq_job("a3", Some("A"));
        p.push(j, t);
        assert_eq!(p.sessions(), 1);
    }

    #[test]
    fn hostile_sequence_ids_are_refused_with_400() {
        let mut p = Sequences::new(seq_cfg(4, 4), "m", 1, false);
        let t = Instant::now();
        for bad in [
            "x".repeat(MAX_SEQUENCE_ID_BYTES + 1),
            "a\u{7f}b".into(),
            "a\nb".into(),
        ] {
            let (j, rx) = seq_job("r", Some(&bad));
            p.push(j, t);
            let (status, body, _) = answered(rx);
            assert_eq!(status, 400, "{bad:?}");
            assert!(body.contains("at most 256 bytes"), "{body}");
        }
        assert_eq!(p.sessions(), 0);
        let ok = "x".repeat(MAX_SEQUENCE_ID_BYTES);
        let (j, _rx) = seq_job("r", Some(&ok));
        p.push(j, t);
        assert_eq!(p.sessions(), 1);
    }

    #[test]
    fn drain_answers_every_waiting_job_of_every_session_oldest_first() {
        let mut p = Sequences::new(seq_cfg(4, 4), "m", 1, false);
        let t = Instant::now();
        for (i, (id, s)) in [("a1", "A"), ("b1", "B"), ("a2", "A")].iter().enumerate() {
            let (j, _rx) = seq_job(id, Some(s));
            p.push(j, t + Duration::from_millis(i as u64));
        }
        let got: Vec<String> = p
            .drain()
            .into_iter()
            .map(|j| j.request.id.clone())
            .collect();
        assert_eq!(got, ["a1", "b1", "a2"]);
        assert!(p.is_empty());
        assert!(!p.has_timers());
    }
}
