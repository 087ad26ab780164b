//! Streaming load generator for bench/llm_stream.sh and bench/llm_vs_torchserve.sh (`CLIENT=rust`):
//! N chat-completion streams opened at the same moment, every chunk read and timed (rounds, the
//! default: a burst), or N streams kept running for a while, each client opening its next stream
//! as soon as its last one ended (`--duration`: a closed loop at a concurrency of N, the way
//! vLLM's `benchmark_serving.py --max-concurrency N` loads a server). The Rust twin
//! of bench/llm_stream.py: same requests, same `x-request-id` scheme (`bench-<pid>-<round>-<i>`,
//! so the join with oxserve's JSON access log still works), same fields printed (`key=value`
//! on one line, and optionally the same JSON line appended to a file), plus the time between
//! chunks.
//!
//!     stream_load --url http://127.0.0.1:8080 --path /predictions/llm/1.0/v1/chat/completions \
//!         [--model NAME] [--streams 64] [--max-tokens 64] [--rounds 3] \
//!         [--cpu server=PID --cpu worker=PID] [--access-log logs/access_log.log] \
//!         [--label X] [--json out.jsonl] [--dump streams.jsonl] \
//!         [--duration 20 --warmup 3 --spread 0.5]
//!
//! Burst and closed loop answer different questions. In a burst every stream arrives in the same
//! millisecond, so the last one's time to first token includes the frontend's and the worker's
//! work on all the others' requests and first chunks (the worst case of a thundering herd). In
//! the closed loop the streams' lengths differ (`--spread`: each request's `max_tokens` drawn
//! from max_tokens x [1 - spread, 1 + spread]), so after the opening burst (`--warmup` seconds,
//! left out of every figure but CPU and chunks/s) streams start and end at different steps, as
//! they do on a deployment serving N users: a new stream arrives alone while N - 1 others run.
//!
//! Why it exists: the Python client is one asyncio thread that spends 30-34 us of CPU per chunk,
//! more than oxserve's frontend; at 64 streams the 32nd stream's first chunk waited for the client
//! to read the 31 before it, so the client's own time sat inside every TTFT it measured. This one
//! runs on one thread too (a current-thread tokio runtime: on a 2-core machine shared with the
//! server and its worker, a second client thread would only take a core from them), reads with
//! raw sockets and a minimal HTTP/1.1 parser (status line, headers, chunked framing), and stamps
//! each read once with a monotonic clock. Its CPU per chunk is printed
//! (`cpu_us_per_chunk_client`) so a reader can check it stays far below the server's.
//!
//! Times that are compared with the handler's own wall-clock stamps (`x-handler-start`,
//! `x-engine-first-token`, epoch seconds, examples/llm) are converted from the monotonic clock
//! with one wall-clock reading taken at start, so they are as precise as the monotonic clock.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use bytes::{Buf, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

#[derive(Parser)]
#[command(about = "N concurrent token streams against one model (bench/llm_stream.sh)")]
struct Args {
    /// The server's inference address, http://host:port
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "/predictions/llm/1.0/v1/chat/completions")]
    path: String,
    /// The body's `model` field (vLLM's handler needs one)
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 64)]
    streams: usize,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// name=pid, repeatable: that process's CPU time per delivered chunk is reported
    #[arg(long)]
    cpu: Vec<String>,
    /// oxserve's JSON access log, joined by x-request-id
    #[arg(long)]
    access_log: Option<String>,
    #[arg(long, default_value = "")]
    label: String,
    /// Append the summary as one JSON line to this file
    #[arg(long)]
    json: Option<String>,
    /// A round that has not ended after this many seconds fails the run (a stuck server must not
    /// hang the benchmark)
    #[arg(long, default_value_t = 300.0)]
    timeout_s: f64,
    /// Write one JSON line per stream to this file (request id, wall-clock epoch seconds of the
    /// write, of each chunk, and the handler's stamps), for a closer look than percentiles
    #[arg(long)]
    dump: Option<String>,
    /// Closed loop instead of rounds: keep --streams streams running for this many seconds, each
    /// client opening its next stream as soon as its last one ended
    #[arg(long)]
    duration: Option<f64>,
    /// Closed loop: streams started in the first this many seconds (the opening burst) are left
    /// out of the latency figures
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Each request's max_tokens is drawn from max_tokens x [1 - spread, 1 + spread] (a fixed
    /// sequence of pseudo-random numbers: runs are repeatable). Default 0 for rounds, 0.5 for the
    /// closed loop
    #[arg(long)]
    spread: Option<f64>,
}

/// Head and chunks of a response larger than this are refused: a benchmark reply is small, and a
/// broken server must not make the client buffer without end.
const MAX_HEAD: usize = 64 * 1024;
const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// What one stream saw, times on the monotonic clock.
struct Stream {
    rid: String,
    status: u16,
    t0: Instant,
    /// When each chunk was read completely (the read that completed it).
    chunks: Vec<Instant>,
    handler_start: f64,
    engine_first: f64,
}

/// Process CPU time of this client (user + system, nanosecond clock: the rounds are short).
fn own_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_PROCESS_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Another process's user + system CPU seconds, from /proc (as bench/llm_stream.py reads them).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The same percentile as bench/llm_stream.py's `pct` (nearest rank, Python's round half to even).
fn pct(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let i = (p / 100.0 * (v.len() - 1) as f64).round_ties_even() as usize;
    v[i.min(v.len() - 1)]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn connect(addr: &str) -> Result<TcpStream> {
    let sock = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// One stream on its connection: wait for the round's start (if in a round), write the request,
/// read the response to its end.
async fn one(
    mut sock: TcpStream,
    req: Vec<u8>,
    rid: String,
    go: Option<Arc<Barrier>>,
) -> Result<Stream> {
    if let Some(go) = go {
        go.wait().await;
    }
    let t0 = Instant::now();
    sock.write_all(&req).await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);

    // The time of the last read: a chunk's time is the time of the read that completed it (one
    // clock reading per read, not per chunk), and the first chunk often comes with the head.
    let mut now = t0;
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            bail!("{rid}: response head over {MAX_HEAD} bytes");
        }
        if sock.read_buf(&mut buf).await? == 0 {
            bail!("{rid}: connection closed before the response head");
        }
        now = Instant::now();
    };
    let mut s = Stream {
        rid,
        status: 0,
        t0,
        chunks: Vec::with_capacity(128),
        handler_start: f64::NAN,
        engine_first: f64::NAN,
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    s.status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let (mut chunked, mut length) = (false, None);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "content-length" => length = v.parse::<usize>().ok(),
            "x-handler-start" => s.handler_start = v.parse().unwrap_or(f64::NAN),
            "x-engine-first-token" => s.engine_first = v.parse().unwrap_or(f64::NAN),
            _ => {}
        }
    }
    buf.advance(head_end + 4);

    if !chunked {
        let n = length.unwrap_or(0);
        while buf.len() < n {
            if sock.read_buf(&mut buf).await? == 0 {
                bail!("{}: connection closed inside the body", s.rid);
            }
            now = Instant::now();
        }
        s.chunks.push(now);
        return Ok(s);
    }
    // Chunked: parse every chunk wholly in the buffer, then read more.
    loop {
        while let Some(eol) = find(&buf, b"\r\n") {
            let size_text = std::str::from_utf8(&buf[..eol]).unwrap_or("");
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("{}: bad chunk size {size_text:?}", s.rid))?;
            if size > MAX_CHUNK {
                bail!("{}: chunk of {size} bytes", s.rid);
            }
            if size == 0 {
                // The last chunk; no trailers are expected (the reply's last CRLF may still be
                // in flight: the stream is complete either way).
                return Ok(s);
            }
            if buf.len() < eol + 2 + size + 2 {
                break;
            }
            buf.advance(eol + 2 + size + 2);
            s.chunks.push(now);
        }
        if sock.read_buf(&mut buf).await? == 0 {
            bail!("{}: connection closed inside the chunked body", s.rid);
        }
        now = Instant::now();
    }
}

/// What every request of a run has in common, and how its max_tokens varies.
struct Shape {
    addr: String,
    path: String,
    /// The body without max_tokens.
    base: serde_json::Value,
    max_tokens: u32,
    spread: f64,
}

impl Shape {
    /// The whole HTTP request of one stream.
    fn request(&self, rid: &str, draws: &mut Draws) -> Vec<u8> {
        let mut body = self.base.clone();
        let lo = f64::from(self.max_tokens) * (1.0 - self.spread);
        let span = f64::from(self.max_tokens) * 2.0 * self.spread;
        let tokens = if self.spread > 0.0 {
            (lo + span * draws.next()).round().max(1.0) as u32
        } else {
            self.max_tokens
        };
        body["max_tokens"] = tokens.into();
        let body = body.to_string();
        let mut bytes = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nx-request-id: {rid}\r\n\r\n",
            self.path,
            self.addr,
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

/// Repeatable uniform numbers in [0, 1) (xorshift64*): the same run draws the same lengths.
struct Draws(u64);

impl Draws {
    fn new(seed: u64) -> Draws {
        Draws(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One client of the closed loop: a stream at a time, the next as soon as the last one ended,
/// until `stop_at`. A new connection per stream, as the rounds use (the connect is before the
/// stream's start time).
async fn closed_loop(
    shape: Arc<Shape>,
    pid: u32,
    client: usize,
    stop_at: Instant,
) -> Result<Vec<Stream>> {
    let mut draws = Draws::new(1000 + client as u64);
    let mut out = Vec::new();
    let mut n = 0;
    while Instant::now() < stop_at {
        let sock = connect(&shape.addr).await?;
        let rid = format!("bench-{pid}-c{client}-{n}");
        let req = shape.request(&rid, &mut draws);
        out.push(one(sock, req, rid, None).await?);
        n += 1;
    }
    Ok(out)
}

/// The access log's (queue_ms, duration_ms) by request id.
fn read_access_log(path: &str) -> HashMap<String, (f64, f64)> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(rid), Some(d)) = (v["request_id"].as_str(), v["duration_ms"].as_f64()) {
            out.insert(rid.to_string(), (v["queue_ms"].as_f64().unwrap_or(0.0), d));
        }
    }
    out
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.streams == 0 || a.rounds == 0 {
        bail!("--streams and --rounds must be at least 1");
    }
    if !(a.timeout_s.is_finite() && a.timeout_s > 0.0) {
        bail!("--timeout-s must be a positive number of seconds");
    }
    let rest = a
        .url
        .strip_prefix("http://")
        .context("--url must be http://host:port")?;
    let addr = rest.trim_end_matches('/').to_string();
    let mut procs = Vec::new();
    for c in &a.cpu {
        let (k, v) = c.split_once('=').context("--cpu takes name=pid")?;
        procs.push((k.to_string(), v.parse::<u32>().context("--cpu pid")?));
    }
    let mut base = serde_json::json!({
        "messages": [{"role": "user", "content": "tell me a story"}],
        "stream": true,
    });
    if let Some(m) = &a.model {
        base["model"] = m.clone().into();
    }
    let spread = a
        .spread
        .unwrap_or(if a.duration.is_some() { 0.5 } else { 0.0 });
    if !(0.0..=1.0).contains(&spread) {
        bail!("--spread must be from 0 to 1");
    }
    let shape = Arc::new(Shape {
        addr: addr.clone(),
        path: a.path.clone(),
        base,
        max_tokens: a.max_tokens,
        spread,
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Monotonic -> epoch seconds, for the handler's wall-clock stamps.
    let (base_i, base_w) = (
        Instant::now(),
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64(),
    );
    let wall = |t: Instant| base_w + t.duration_since(base_i).as_secs_f64();

    let pid = std::process::id();
    let mut results: Vec<Stream> = Vec::new();
    let mut wall_s = 0.0;
    let mut cpu = vec![0.0; procs.len()];
    let mut client_cpu = 0.0;
    // Streams that started before this are left out of the latency figures (closed loop only).
    let mut measured_from = None;
    let read_cpu = || -> Vec<f64> {
        procs
            .iter()
            .map(|(_, p)| cpu_seconds(*p).unwrap_or(f64::NAN))
            .collect()
    };
    if let Some(duration) = a.duration {
        if !(duration.is_finite() && duration > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
        let run = async {
            let c0 = read_cpu();
            let client0 = own_cpu_seconds();
            let t0 = Instant::now();
            let stop_at = t0 + Duration::from_secs_f64(duration);
            let clients: Vec<_> = (0..a.streams)
                .map(|i| tokio::spawn(closed_loop(shape.clone(), pid, i, stop_at)))
                .collect();
            let mut out = Vec::new();
            for c in clients {
                out.extend(c.await??);
            }
            let secs = t0.elapsed().as_secs_f64();
            let client = own_cpu_seconds() - client0;
            let used: Vec<f64> = read_cpu().iter().zip(&c0).map(|(c, b)| c - b).collect();
            anyhow::Ok((out, t0, secs, client, used))
        };
        let limit = duration + a.timeout_s;
        let (out, t0, secs, client, used) = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs_f64(limit), run).await })
            .map_err(|_| anyhow::anyhow!("the closed loop did not end within {limit} s"))??;
        measured_from = Some(t0 + Duration::from_secs_f64(a.warmup.max(0.0)));
        wall_s = secs;
        client_cpu = client;
        cpu = used;
        results = out;
    } else {
        for r in 0..a.rounds {
            // Every stream connected first (a failed connect ends the run here, before any
            // waits on the others), then the CPU counters are read, then all start together.
            let go = Arc::new(Barrier::new(a.streams + 1));
            let round = async {
                let socks =
                    futures_util::future::try_join_all((0..a.streams).map(|_| connect(&addr)))
                        .await?;
                let mut draws = Draws::new(r as u64);
                let tasks: Vec<_> = socks
                    .into_iter()
                    .enumerate()
                    .map(|(i, sock)| {
                        let rid = format!("bench-{pid}-{r}-{i}");
                        let bytes = shape.request(&rid, &mut draws);
                        tokio::spawn(one(sock, bytes, rid, Some(go.clone())))
                    })
                    .collect();
                let c0 = read_cpu();
                let client0 = own_cpu_seconds();
                let t0 = Instant::now();
                go.wait().await;
                let mut out = Vec::with_capacity(tasks.len());
                for t in tasks {
                    out.push(t.await?);
                }
                let secs = t0.elapsed().as_secs_f64();
                let client = own_cpu_seconds() - client0;
                let used: Vec<f64> = read_cpu().iter().zip(&c0).map(|(c, b)| c - b).collect();
                anyhow::Ok((out, secs, client, used))
            };
            let (out, secs, client, used) = rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs_f64(a.timeout_s), round).await
                })
                .map_err(|_| anyhow::anyhow!("round {r} did not end within {} s", a.timeout_s))??;
            wall_s += secs;
            client_cpu += client;
            for (c, u) in cpu.iter_mut().zip(used) {
                *c += u;
            }
            for o in out {
                results.push(o?);
            }
        }
    }
    for o in &results {
        if o.status != 200 {
            bail!("{}: status {}", o.rid, o.status);
        }
        if o.chunks.is_empty() {
            bail!("{}: no chunk", o.rid);
        }
    }
    let chunks: usize = results.iter().map(|o| o.chunks.len()).sum();
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1000.0;
    // The streams the latency figures are over: all of them in rounds, those started after the
    // warm-up in the closed loop.
    let lat: Vec<&Stream> = results
        .iter()
        .filter(|o| measured_from.is_none_or(|m| o.t0 >= m))
        .collect();
    if lat.is_empty() {
        bail!("no stream started after the warm-up: make --duration longer than --warmup");
    }
    let ttft: Vec<f64> = lat.iter().map(|o| ms(o.t0, o.chunks[0])).collect();
    let mut s: Vec<(String, serde_json::Value)> = Vec::new();
    let mut put = |k: &str, v: serde_json::Value| s.push((k.to_string(), v));
    put("label", a.label.clone().into());
    put("streams", a.streams.into());
    match a.duration {
        Some(d) => {
            put("mode", "closed".into());
            put("duration_s", d.into());
            put("measured_streams", lat.len().into());
        }
        None => {
            put("mode", "burst".into());
            put("rounds", a.rounds.into());
        }
    }
    put("max_tokens", a.max_tokens.into());
    put("spread", spread.into());
    put("chunks", chunks.into());
    put("chunks_per_s", (chunks as f64 / wall_s).into());
    put("ttft_p50_ms", pct(&ttft, 50.0).into());
    put("ttft_p99_ms", pct(&ttft, 99.0).into());
    put("load_avg", load_avg().into());
    for ((k, _), c) in procs.iter().zip(&cpu) {
        put(
            &format!("cpu_us_per_chunk_{k}"),
            (c / chunks as f64 * 1e6).into(),
        );
    }
    put(
        "cpu_us_per_chunk_client",
        (client_cpu / chunks as f64 * 1e6).into(),
    );
    let timed: Vec<&Stream> = lat
        .iter()
        .copied()
        .filter(|o| !o.handler_start.is_nan())
        .collect();
    let engine_ms = |o: &Stream| (o.engine_first - o.handler_start) * 1000.0;
    if !timed.is_empty() {
        let series: [(&str, Vec<f64>); 4] = [
            (
                "to_handler",
                timed
                    .iter()
                    .map(|o| (o.handler_start - wall(o.t0)) * 1000.0)
                    .collect(),
            ),
            ("engine", timed.iter().map(|o| engine_ms(o)).collect()),
            (
                "to_client",
                timed
                    .iter()
                    .map(|o| (wall(o.chunks[0]) - o.engine_first) * 1000.0)
                    .collect(),
            ),
            (
                "added",
                timed
                    .iter()
                    .map(|o| ms(o.t0, o.chunks[0]) - engine_ms(o))
                    .collect(),
            ),
        ];
        for (name, v) in series {
            put(&format!("{name}_p50_ms"), pct(&v, 50.0).into());
            put(&format!("{name}_p99_ms"), pct(&v, 99.0).into());
        }
    }
    if let Some(path) = &a.access_log {
        let log = read_access_log(path);
        let joined: Vec<(&Stream, (f64, f64))> = lat
            .iter()
            .copied()
            .filter_map(|o| log.get(&o.rid).map(|l| (o, *l)))
            .collect();
        if !joined.is_empty() {
            let queue: Vec<f64> = joined.iter().map(|(_, l)| l.0).collect();
            let dur: Vec<f64> = joined.iter().map(|(_, l)| l.1).collect();
            put("ox_queue_p50_ms", pct(&queue, 50.0).into());
            put("ox_first_part_p50_ms", pct(&dur, 50.0).into());
            put("ox_first_part_p99_ms", pct(&dur, 99.0).into());
            // Client TTFT minus oxserve's arrival-to-first-part: this client, the kernel's
            // sockets and oxserve's accept, parse and write of the chunk.
            let outside: Vec<f64> = joined
                .iter()
                .map(|(o, l)| ms(o.t0, o.chunks[0]) - l.1)
                .collect();
            put("outside_ox_p50_ms", pct(&outside, 50.0).into());
            put("outside_ox_p99_ms", pct(&outside, 99.0).into());
            // oxserve's arrival-to-first-part minus its queue and the engine's own TTFT: the
            // worker's side (unix socket both ways, its reader and event loop, the handler's send).
            let side: Vec<f64> = joined
                .iter()
                .filter(|(o, _)| !o.handler_start.is_nan())
                .map(|(o, l)| l.1 - l.0 - engine_ms(o))
                .collect();
            if !side.is_empty() {
                put("worker_side_p50_ms", pct(&side, 50.0).into());
                put("worker_side_p99_ms", pct(&side, 99.0).into());
            }
        }
    }
    // Time between consecutive chunks of a stream (not in the Python client's output).
    let itl: Vec<f64> = lat
        .iter()
        .flat_map(|o| o.chunks.windows(2).map(|w| ms(w[0], w[1])))
        .collect();
    put("itl_p50_ms", pct(&itl, 50.0).into());
    put("itl_p99_ms", pct(&itl, 99.0).into());

    if let Some(path) = &a.dump {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for o in &results {
            let row = serde_json::json!({
                "rid": o.rid,
                "t0": wall(o.t0),
                "chunks": o.chunks.iter().map(|t| wall(*t)).collect::<Vec<f64>>(),
                "handler_start": o.handler_start,
                "engine_first": o.engine_first,
            });
            writeln!(f, "{row}")?;
        }
        f.flush()?;
    }
    let line: Vec<String> = s
        .iter()
        .map(|(k, v)| match v.as_f64() {
            Some(f) if !v.is_u64() && !v.is_i64() => format!("{k}={f:.3}"),
            _ => match v.as_str() {
                Some(t) => format!("{k}={t}"),
                None => format!("{k}={v}"),
            },
        })
        .collect();
    println!("{}", line.join(" "));
    if let Some(path) = &a.json {
        // serde_json's Map sorts its keys; the Python client writes them in this order.
        let fields: Vec<String> = s
            .iter()
            .map(|(k, v)| format!("{}: {}", serde_json::Value::from(k.as_str()), v))
            .collect();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{{{}}}", fields.join(", "))?;
    }
    Ok(())
}
