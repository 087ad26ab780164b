//! Progress of a registration still loading: downloading, unpacking, starting workers.
//!
//! TorchServe shows nothing while a multi-GB archive downloads or unpacks: describe answers 404
//! until it is done. oxserve logs progress (bytes of total) and answers describe with it, and a
//! registration dropped midway (client gone, SIGTERM during start-up) cancels its unpacking.

use std::io::{self, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a loading registration is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Downloading = 0,
    Unpacking = 1,
    StartingWorkers = 2,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Downloading => "downloading",
            Phase::Unpacking => "unpacking",
            Phase::StartingWorkers => "starting workers",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Downloading,
            1 => Phase::Unpacking,
            _ => Phase::StartingWorkers,
        }
    }
}

/// One registration in progress.
pub struct Loading {
    /// The name describe finds it under (the requested model name, else the archive's stem).
    pub name: String,
    pub url: String,
    phase: AtomicU8,
    done: AtomicU64,
    /// 0 while unknown (a download without Content-Length).
    total: AtomicU64,
    cancelled: AtomicBool,
    started: Instant,
    /// When progress was last logged, and at which tenth.
    logged: Mutex<(Instant, u64)>,
}

/// How often progress is logged at most (besides every 10 %).
const LOG_EVERY: Duration = Duration::from_secs(5);

impl Loading {
    pub fn new(name: String, url: String) -> Loading {
        let now = Instant::now();
        Loading {
            name,
            url,
            phase: AtomicU8::new(Phase::Downloading as u8),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            started: now,
            logged: Mutex::new((now, 0)),
        }
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Starts a phase of `total` bytes (0: unknown).
    pub fn set_phase(&self, phase: Phase, total: u64) {
        self.done.store(0, Ordering::Release);
        self.total.store(total, Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
        *self.logged.lock().unwrap() = (Instant::now(), 0);
    }

    /// Counts `n` more bytes of the current phase, logging now and then.
    pub fn advance(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::AcqRel) + n;
        let total = self.total.load(Ordering::Acquire);
        let tenth = (done * 10).checked_div(total).unwrap_or(0);
        let mut logged = self.logged.lock().unwrap();
        if tenth > logged.1 || logged.0.elapsed() >= LOG_EVERY {
            *logged = (Instant::now(), tenth.max(logged.1));
            drop(logged);
            tracing::info!("{}", self.summary(done, total));
        }
    }

    fn summary(&self, done: u64, total: u64) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let of = if total > 0 {
            format!(
                " of {:.1} MiB ({:.0} %)",
                mib(total),
                done as f64 * 100.0 / total as f64
            )
        } else {
            String::new()
        };
        format!(
            "model {} from {}: {} {:.1} MiB{of}",
            self.name,
            self.url,
            self.phase().name(),
            mib(done)
        )
    }

    /// Stops the unpacking of this registration at its next read.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// The describe entry of a model still loading.
    pub fn describe(&self) -> serde_json::Value {
        let done = self.done.load(Ordering::Acquire);
        let total = self.total.load(Ordering::Acquire);
        serde_json::json!({
            "modelName": self.name,
            "modelUrl": self.url,
            "status": "LOADING",
            "loading": {
                "phase": self.phase().name(),
                "bytes": done,
                "totalBytes": (total > 0).then_some(total),
                "percent": (total > 0).then(|| (done as f64 * 1000.0 / total as f64).round() / 10.0),
                "elapsedSeconds": self.started.elapsed().as_secs(),
            },
            "workers": [],
        })
    }
}

/// A reader that counts what passes through into a [`Loading`] and fails once it is cancelled.
pub struct Counting<R> {
    inner: R,
    loading: Option<Arc<Loading>>,
}

impl<R> Counting<R> {
    pub fn new(inner: R, loading: Option<Arc<Loading>>) -> Counting<R> {
        Counting { inner, loading }
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(l) = &self.loading {
            if l.is_cancelled() {
                return Err(io::Error::other("the registration was cancelled"));
            }
        }
        let n = self.inner.read(buf)?;
        if let Some(l) = &self.loading {
            l.advance(n as u64);
        }
        Ok(n)
    }
}

impl<R: Seek> Seek for Counting<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}
