//! Load client for bench/grpc.sh: the same closed-loop load (C clients, each sending its next
//! request when the previous answer arrived, for D seconds) against oxserve's gRPC `Predictions`
//! and against its HTTP `POST /predictions`, with the same body, from the same process, so that the
//! two paths are compared under equal load (ghz is not available here; wrk speaks HTTP/1 only).
//!
//!     grpc_load <grpc host:port> <http host:port> [model] [clients] [seconds]
//!
//! Each gRPC client has its own HTTP/2 connection, as each HTTP client has its own keep-alive
//! connection; a last run multiplexes all gRPC clients over one connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use oxserve::grpc::pb::inference::inference_ap_is_service_client::InferenceApIsServiceClient;
use oxserve::grpc::pb::inference::PredictionsRequest;
use tonic::transport::Channel;

/// Plain text (no content type on either path), so the demo model does the same work for both.
const BODY: &[u8] = b"I love this";

struct Run {
    requests: usize,
    errors: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Run {
    fn print(&mut self, what: &str) {
        self.latencies.sort();
        let at = |q: f64| {
            let i = ((self.latencies.len() as f64 * q) as usize).min(self.latencies.len() - 1);
            self.latencies[i].as_secs_f64() * 1000.0
        };
        println!(
            "{what:<34} {:>10.0} req/s   p50 {:.3} ms   p99 {:.3} ms   errors {}",
            self.requests as f64 / self.elapsed.as_secs_f64(),
            at(0.50),
            at(0.99),
            self.errors
        );
    }
}

async fn drive<F, Fut>(clients: usize, make: F) -> Run
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = (usize, usize, Vec<Duration>)> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|i| tokio::spawn(make(i))).collect();
    let mut run = Run {
        requests: 0,
        errors: 0,
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        let (n, e, l) = t.await.unwrap();
        run.requests += n;
        run.errors += e;
        run.latencies.extend(l);
    }
    run.elapsed = start.elapsed();
    run
}

async fn grpc_client(
    mut client: InferenceApIsServiceClient<Channel>,
    model: String,
    until: Instant,
) -> (usize, usize, Vec<Duration>) {
    let (mut n, mut errors, mut lat) = (0, 0, Vec::new());
    while Instant::now() < until {
        let req = PredictionsRequest {
            model_name: model.clone(),
            model_version: String::new(),
            input: BTreeMap::from([("body".to_string(), BODY.to_vec())]),
            sequence_id: None,
        };
        let t = Instant::now();
        match client.predictions(req).await {
            Ok(_) => n += 1,
            Err(_) => errors += 1,
        }
        lat.push(t.elapsed());
    }
    (n, errors, lat)
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: grpc_load <grpc host:port> <http host:port> [model] [clients] [seconds]");
        std::process::exit(2);
    }
    let grpc = args[1].clone();
    let http = args[2].clone();
    let model = args.get(3).cloned().unwrap_or_else(|| "demo".into());
    let clients: usize = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(32);
    let secs: u64 = args.get(5).and_then(|v| v.parse().ok()).unwrap_or(10);
    println!(
        "{clients} clients, {secs} s each, body {} bytes, model {model}",
        BODY.len()
    );

    // HTTP/1.1: one keep-alive connection per client.
    let url = format!("http://{http}/predictions/{model}");
    let until = Instant::now() + Duration::from_secs(secs);
    let mut run = drive(clients, |_| {
        let url = url.clone();
        async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let (mut n, mut errors, mut lat) = (0, 0, Vec::new());
            while Instant::now() < until {
                let t = Instant::now();
                let ok = match client.post(&url).body(BODY).send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    n += 1
                } else {
                    errors += 1
                }
                lat.push(t.elapsed());
            }
            (n, errors, lat)
        }
    })
    .await;
    run.print("HTTP/1.1 POST /predictions");

    // gRPC: one HTTP/2 connection per client.
    let mut channels = Vec::new();
    for _ in 0..clients {
        channels.push(channel(&grpc).await);
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let mut run = drive(clients, |i| {
        grpc_client(
            InferenceApIsServiceClient::new(channels[i].clone()),
            model.clone(),
            until,
        )
    })
    .await;
    run.print("gRPC Predictions, conn per client");

    // gRPC: every client on one multiplexed HTTP/2 connection.
    let shared = channel(&grpc).await;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut run = drive(clients, |_| {
        grpc_client(
            InferenceApIsServiceClient::new(shared.clone()),
            model.clone(),
            until,
        )
    })
    .await;
    run.print("gRPC Predictions, one connection");
}
