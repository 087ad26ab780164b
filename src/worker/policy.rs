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
//! [`Classic`] and [`InFlight`] (async, and continuous with batch_size as the room) are
//! implemented; sequence is not yet.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::Job;

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
    /// A worker is gone (stopped or died); whatever the policy pinned to it is released.
    fn on_worker_gone(&mut self, _worker: u32) {}
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
}
