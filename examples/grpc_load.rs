//! Load client for bench/grpc.sh: the same closed-loop load (C clients, each sending its next
//! request when the previous answer arrived, for D seconds) against oxserve's gRPC `Predictions`
//! and against its HTTP `POST /predictions`, with the same body, from the same process, so that the
//! two paths are compared under equal load (ghz is not available here; wrk speaks HTTP/1 only).
//!
//!     grpc_load <grpc host:port> <http host:port> [model] [clients] [seconds] [ca.pem]
//!
//! Each gRPC client has its own HTTP/2 connection, as each HTTP client has its own keep-alive
//! connection; a last run multiplexes all gRPC clients over one connection. With `ca.pem`, the
//! gRPC connections are TLS (`enable_grpc_ssl=true`), verified against that certificate, made with
//! the same tokio-rustls (ring) the server uses.

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

/// Opens TLS connections for tonic's channel (tonic is built without its own TLS here).
#[derive(Clone)]
struct TlsConnect {
    config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    addr: std::net::SocketAddr,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<TlsIo, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let (config, addr) = (self.config.clone(), self.addr);
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

fn tls_config(ca: &str) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("read ca.pem") {
        roots.add(cert.expect("a PEM certificate")).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

async fn channel(
    addr: &str,
    tls: Option<&std::sync::Arc<tokio_rustls::rustls::ClientConfig>>,
) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    match tls {
        None => endpoint.connect().await.expect("connect"),
        Some(config) => endpoint
            .connect_with_connector(TlsConnect {
                config: config.clone(),
                addr: addr.parse().expect("grpc address as ip:port"),
            })
            .await
            .expect("connect over TLS"),
    }
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
    let tls = args.get(6).map(|ca| tls_config(ca));
    let grpc_kind = if tls.is_some() { "gRPC+TLS" } else { "gRPC" };
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
        channels.push(channel(&grpc, tls.as_ref()).await);
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
    run.print(&format!("{grpc_kind} Predictions, conn per client"));

    // gRPC: every client on one multiplexed HTTP/2 connection.
    let shared = channel(&grpc, tls.as_ref()).await;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut run = drive(clients, |_| {
        grpc_client(
            InferenceApIsServiceClient::new(shared.clone()),
            model.clone(),
            until,
        )
    })
    .await;
    run.print(&format!("{grpc_kind} Predictions, one connection"));
}
