//! Measures the dashboard history's real heap use: 50 models, every column filled (the LLM
//! families included), one hour of samples. Live bytes are counted by a wrapping global allocator,
//! so the figure is what the allocator holds for the history, not an estimate.
//!
//! cargo run --release --example dashboard_memory

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use oxserve::dashboard::history::{History, COARSE_EVERY, LLM_ITL, LLM_TOKENS, LLM_TTFT};
use oxserve::metrics::spec::Spec;
use oxserve::metrics::{Metrics, Settings, Timings};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn traffic(m: &Metrics, models: &[std::sync::Arc<oxserve::metrics::ModelMetrics>]) {
    let now = Instant::now();
    let mut t = Timings::new(now);
    t.enqueued = Some(now);
    t.batch_start = Some(now + Duration::from_millis(1));
    t.first_chunk = Some(now + Duration::from_millis(2));
    t.responded = Some(now + Duration::from_millis(5));
    for (i, mm) in models.iter().enumerate() {
        mm.record_request(&t, 200, false);
        for (family, kind, v) in [
            (LLM_TTFT, "HISTOGRAM", 0.08),
            (LLM_ITL, "HISTOGRAM", 0.004),
            (LLM_TOKENS, "COUNTER", 32.0),
        ] {
            m.record_backend_line(
                &format!("{family}.s:{v}|#ModelName:model-{i}|#type:{kind}|#hostname:x,1"),
                &format!("model-{i}"),
            );
        }
    }
}

fn main() {
    let m = Metrics::new(
        &Spec::builtin(),
        Settings {
            auto_detect: true,
            hostname: "host".into(),
            ..Settings::for_tests()
        },
    );
    let models: Vec<_> = (0..50)
        .map(|i| m.model(&format!("model-{i}"), "1"))
        .collect();
    traffic(&m, &models); // creates every series before the measurement starts
    let before = LIVE.load(Ordering::Relaxed);
    let mut h = History::new();
    let mut now = 0.0;
    for _ in 0..=COARSE_EVERY {
        traffic(&m, &models);
        now += 1.0;
        h.sample(&m, now);
    }
    let started = Instant::now();
    for _ in 0..3600 {
        now += 1.0;
        h.sample(&m, now);
    }
    let per_sample = started.elapsed() / 3600;
    let live = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "50 models, every column, one hour of samples: {live} bytes live ({:.2} MiB); the history's own count: {} bytes; {per_sample:?} per sample",
        live as f64 / (1024.0 * 1024.0),
        h.heap_bytes()
    );
}
