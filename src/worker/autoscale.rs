//! Autoscaling between min_worker and max_worker on queue pressure (docs/scheduling.md).
//!
//! TorchServe (and Triton) scale only when asked; TorchServe's documentation tells operators to
//! "scale model workers based on observed metrics". Here the supervisor does it itself, with a
//! rule simple enough to predict:
//!
//! Every `interval` the supervisor takes a [`Sample`]. It is
//! - *pressure* when no worker is starting and at least `queue_per_worker` requests wait per
//!   live worker (or any wait while none is live),
//! - *idle* when nothing waits and at least one live worker has nothing to do,
//! - neither otherwise.
//!
//! After `up_samples` pressure samples in a row one worker is added (if below max); after
//! `down_samples` idle samples in a row one idle worker is stopped (if above min). Any other
//! sample resets both streaks, and so does every scale step. Hysteresis comes from the gap
//! between the two conditions (a queue shorter than the threshold, or no idle worker, holds),
//! from the long idle window, and from not judging pressure while a new worker is loading.
//! min == max turns it off.

use std::time::Duration;

/// The autoscaling rule's parameters (config keys `autoscale_*`, per model `autoscale*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoscaleRule {
    /// How often the queue is sampled.
    pub interval: Duration,
    /// Waiting requests per live worker that count as pressure.
    pub queue_per_worker: u32,
    /// Consecutive pressure samples before one worker is added.
    pub up_samples: u32,
    /// Consecutive idle samples before one worker is stopped.
    pub down_samples: u32,
}

impl Default for AutoscaleRule {
    fn default() -> Self {
        AutoscaleRule {
            interval: Duration::from_millis(500),
            queue_per_worker: 1,
            up_samples: 2,
            down_samples: 60,
        }
    }
}

/// What the supervisor sees at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// Requests waiting in the queue.
    pub queued: usize,
    /// Workers that can serve (ready or busy).
    pub live: usize,
    /// Live workers with nothing in flight.
    pub idle: usize,
    /// Workers loading a model.
    pub starting: usize,
    /// Workers counted against min/max (every worker not being stopped).
    pub workers: u32,
    pub min: u32,
    pub max: u32,
}

/// A scaling step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Up,
    Down,
}

/// The rule's memory: the two streaks.
#[derive(Debug, Clone, Default)]
pub struct Autoscaler {
    up_streak: u32,
    down_streak: u32,
}

impl Autoscaler {
    /// Takes one sample; returns the step to make, if any.
    pub fn sample(&mut self, rule: &AutoscaleRule, s: Sample) -> Option<Step> {
        if s.min >= s.max {
            self.reset();
            return None;
        }
        let threshold = rule.queue_per_worker.max(1) as usize * s.live.max(1);
        let pressure = s.starting == 0 && s.queued > 0 && s.queued >= threshold;
        let idle = s.queued == 0 && s.idle > 0;
        if pressure {
            self.up_streak += 1;
            self.down_streak = 0;
        } else if idle {
            self.down_streak += 1;
            self.up_streak = 0;
        } else {
            self.reset();
        }
        if self.up_streak >= rule.up_samples.max(1) && s.workers < s.max {
            self.reset();
            return Some(Step::Up);
        }
        if self.down_streak >= rule.down_samples.max(1) && s.workers > s.min {
            self.reset();
            return Some(Step::Down);
        }
        None
    }

    /// Forgets both streaks (after any scale step, explicit ones included).
    pub fn reset(&mut self) {
        self.up_streak = 0;
        self.down_streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> AutoscaleRule {
        AutoscaleRule {
            interval: Duration::from_millis(500),
            queue_per_worker: 2,
            up_samples: 2,
            down_samples: 3,
        }
    }

    fn busy(queued: usize, live: usize, workers: u32) -> Sample {
        Sample {
            queued,
            live,
            idle: 0,
            starting: 0,
            workers,
            min: 1,
            max: 3,
        }
    }

    fn quiet(idle: usize, workers: u32) -> Sample {
        Sample {
            queued: 0,
            live: workers as usize,
            idle,
            starting: 0,
            workers,
            min: 1,
            max: 3,
        }
    }

    #[test]
    fn sustained_pressure_adds_one_worker_per_window() {
        let mut a = Autoscaler::default();
        assert_eq!(a.sample(&rule(), busy(4, 2, 2)), None);
        assert_eq!(a.sample(&rule(), busy(4, 2, 2)), Some(Step::Up));
        // The streak starts over after a step.
        assert_eq!(a.sample(&rule(), busy(6, 3, 2)), None);
    }

    #[test]
    fn a_queue_below_the_threshold_holds_and_breaks_the_streak() {
        let mut a = Autoscaler::default();
        assert_eq!(a.sample(&rule(), busy(4, 2, 2)), None);
        // 3 waiting for 2 workers is under 2 per worker: neither pressure nor idle.
        assert_eq!(a.sample(&rule(), busy(3, 2, 2)), None);
        assert_eq!(a.sample(&rule(), busy(4, 2, 2)), None);
        assert_eq!(a.sample(&rule(), busy(4, 2, 2)), Some(Step::Up));
    }

    #[test]
    fn no_pressure_is_judged_while_a_worker_is_starting() {
        let mut a = Autoscaler::default();
        let mut s = busy(50, 1, 2);
        s.starting = 1;
        for _ in 0..10 {
            assert_eq!(a.sample(&rule(), s), None);
        }
    }

    #[test]
    fn never_above_max_nor_below_min() {
        let mut a = Autoscaler::default();
        for _ in 0..10 {
            assert_eq!(a.sample(&rule(), busy(100, 3, 3)), None);
        }
        for _ in 0..10 {
            assert_eq!(a.sample(&rule(), quiet(1, 1)), None);
        }
    }

    #[test]
    fn sustained_idleness_removes_one_worker_and_waits_again() {
        let mut a = Autoscaler::default();
        assert_eq!(a.sample(&rule(), quiet(2, 3)), None);
        assert_eq!(a.sample(&rule(), quiet(2, 3)), None);
        assert_eq!(a.sample(&rule(), quiet(2, 3)), Some(Step::Down));
        assert_eq!(a.sample(&rule(), quiet(1, 2)), None);
        // One busy sample (no idle worker, empty queue) breaks the idle streak.
        assert_eq!(a.sample(&rule(), quiet(0, 2)), None);
        assert_eq!(a.sample(&rule(), quiet(1, 2)), None);
        assert_eq!(a.sample(&rule(), quiet(1, 2)), None);
        assert_eq!(a.sample(&rule(), quiet(1, 2)), Some(Step::Down));
    }

    #[test]
    fn min_equal_max_turns_it_off() {
        let mut a = Autoscaler::default();
        let mut s = busy(100, 2, 2);
        s.min = 2;
        s.max = 2;
        for _ in 0..10 {
            assert_eq!(a.sample(&rule(), s), None);
        }
    }

    #[test]
    fn waiting_with_no_live_worker_is_pressure() {
        let mut a = Autoscaler::default();
        assert_eq!(a.sample(&rule(), busy(1, 0, 1)), None);
        assert_eq!(a.sample(&rule(), busy(1, 0, 1)), None, "1 < 2 per worker");
        let mut a = Autoscaler::default();
        a.sample(&rule(), busy(2, 0, 1));
        assert_eq!(a.sample(&rule(), busy(2, 0, 1)), Some(Step::Up));
    }
}
