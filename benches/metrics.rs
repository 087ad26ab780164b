//! Cost of the metrics on the request path, of the scrape path, and of the dashboard's sampler.
//!
//! cargo bench --bench metrics

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use oxserve::metrics::{Metrics, Timings};

/// Every metric update one successful request causes, as the server does them.
fn one_request(m: &Metrics, mm: &oxserve::metrics::ModelMetrics, t: &Timings) {
    // Worker, per batch of one: batch size, backend time, handler gauges, worker thread time.
    mm.batch_size.observe(1.0);
    mm.backend_duration.observe(0.0004);
    mm.handler_time.set(0.4);
    mm.prediction_time.set(0.4);
    mm.queue_depth.set(0.0);
    m.host.worker_thread_time.set(0.0);
    // API, per request: ts_* counters, histograms, QueueTime, per-model status class.
    mm.record_request(t, 200, false);
    // Listener middleware: Requests2XX.
    m.host.count_response(200);
}

fn timings() -> Timings {
    let now = Instant::now();
    let mut t = Timings::new(now);
    t.enqueued = Some(now);
    t.batch_start = Some(now + Duration::from_micros(50));
    t.responded = Some(now + Duration::from_micros(500));
    t
}

fn request_path(c: &mut Criterion) {
    let m = Arc::new(Metrics::for_tests());
    let mm = m.model("bench", "1.0");
    let t = timings();
    c.bench_function("request_metrics_1_thread", |b| {
        b.iter(|| one_request(&m, &mm, &t))
    });

    // Two threads updating the same model's series at once (the contended case).
    c.bench_function("request_metrics_2_threads_contending", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let (m, mm) = (m.clone(), mm.clone());
                    s.spawn(move || {
                        for _ in 0..iters {
                            one_request(&m, &mm, &t);
                        }
                    });
                }
            });
            // Per request: two threads did `iters` each in this wall time.
            start.elapsed() / 2
        })
    });
}

fn scrape_path(c: &mut Criterion) {
    let m = Metrics::for_tests();
    let t = timings();
    for i in 0..200 {
        let mm = m.model(&format!("model_{i:03}"), "1.0");
        mm.record_request(&t, 200, false);
        mm.record_request(&t, 200, true);
        mm.batch_size.observe(1.0);
        mm.backend_duration.observe(0.001);
        m.worker_load_time(&format!("W-{}-model_{i:03}_1.0", 9000 + i))
            .set(100.0);
    }
    let len = m.render(None).len();
    println!("full exposition with 200 model versions: {len} bytes");
    c.bench_function("render_all_200_models", |b| b.iter(|| m.render(None)));
    let names = vec![
        "Requests2XX".to_string(),
        "ts_inference_requests_total".to_string(),
    ];
    c.bench_function("render_name_filter_2_families_200_models", |b| {
        b.iter(|| m.render(Some(&names)))
    });
    let small = vec!["Requests2XX".to_string(), "CPUUtilization".to_string()];
    c.bench_function("render_name_filter_2_host_families_200_models", |b| {
        b.iter(|| m.render(Some(&small)))
    });
}

/// The dashboard's sampler: one sample of the registry with 50 registered models under traffic
/// (runs once a second in the server, off the request path).
fn dashboard_sample(c: &mut Criterion) {
    let m = Metrics::for_tests();
    let t = timings();
    let models: Vec<_> = (0..50)
        .map(|i| m.model(&format!("model_{i:02}"), "1.0"))
        .collect();
    let mut h = oxserve::dashboard::history::History::new();
    let mut now = 0.0;
    c.bench_function("dashboard_sample_50_models", |b| {
        b.iter(|| {
            for mm in &models {
                mm.record_request(&t, 200, false);
            }
            now += 1.0;
            h.sample(&m, now)
        })
    });
}

/// What the reply stream records per chunk of an OpenAI token stream: the chunk counter, the
/// inter-token histogram, and the check for a `usage` (a substring scan; no parse). And once per
/// stream, the last event's usage parse.
fn streaming_path(c: &mut Criterion) {
    let m = Metrics::for_tests();
    let mm = m.model("bench", "1.0");
    let token = br#"data: {"id":"cmpl-0123456789","object":"chat.completion.chunk","created":1764370000,"model":"llm","choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}

"#;
    let last = br#"data: {"id":"cmpl-0123456789","object":"chat.completion.chunk","created":1764370000,"model":"llm","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":64,"total_tokens":76}}

data: [DONE]

"#;
    let gap = Some(Duration::from_millis(12));
    c.bench_function("stream_chunk_metrics", |b| {
        b.iter(|| {
            mm.record_chunk(gap);
            std::hint::black_box(oxserve::metrics::Usage::from_chunk(std::hint::black_box(
                token,
            )))
        })
    });
    c.bench_function("stream_last_chunk_usage", |b| {
        b.iter(|| {
            mm.record_chunk(gap);
            let u = oxserve::metrics::Usage::from_chunk(std::hint::black_box(last));
            if let Some(u) = u {
                mm.record_usage(u);
            }
        })
    });
}

criterion_group!(
    benches,
    request_path,
    scrape_path,
    dashboard_sample,
    streaming_path
);
criterion_main!(benches);
