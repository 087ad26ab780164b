//! The log file writer: one background thread owns a set of files; callers hand it finished lines
//! through a bounded channel and never wait for the disk.
//!
//! Rollover follows TorchServe's log4j2 defaults: a file rolls over when it would pass its size
//! limit (100 MB for the server logs) or when the UTC day changes, and the old file becomes
//! `<name>.<dd-MMM>.log.gz` next to it (`access_log.28-Nov.log.gz`). Where TorchServe would reuse a
//! name on a second rollover the same day, oxserve adds a counter (`access_log.28-Nov.2.log.gz`) so
//! that nothing is overwritten, and it keeps only the newest `keep` rolled files per log, so the
//! folder has a bound (log4j2's `max=5` does not apply to date-only patterns, so TorchServe's logs
//! grow without one). Compression runs on a thread of its own so a 100 MB gzip never stalls the
//! writer.
//!
//! When the queue is full (the disk is slower than the traffic), a line is dropped rather than
//! blocking the request that produced it; the file then says how many were dropped. The queue is
//! bounded in lines and in bytes, so long lines cannot make it hold gigabytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lines waiting for the writer thread before new ones are dropped: over a second of traffic at
/// 50,000 requests/s, some 6 MB at typical lengths.
const CAPACITY: usize = 64 * 1024;

/// Bytes of queued lines before new ones are dropped (65,536 lines of up to 64 KiB each would
/// otherwise be 4 GiB).
const CAPACITY_BYTES: usize = 32 << 20;

/// Formats the notice written into a file after `n` of its lines were dropped.
pub type DropNotice = fn(n: u64) -> String;

/// One file the writer owns.
pub struct FileSpec {
    pub path: PathBuf,
    /// Roll over once the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rolled files kept (the oldest beyond this are deleted).
    pub keep: usize,
    /// What to write after lines were dropped; None for files a parser reads line by line and that
    /// must hold nothing but their own lines (the metric logs).
    pub notice: Option<DropNotice>,
}

enum Msg {
    Line(usize, String),
    Flush(SyncSender<()>),
}

/// When the writer thread writes what it was sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// Once lines keep coming, in drains 20 ms apart: the server's own logs (access, model,
    /// ts_log), where no reader waits for a line and a wake-up per line would cost the request
    /// path.
    Batched,
    /// At once unless traffic is busy (a drain of 32 lines or more): the metric logs, which
    /// TorchServe's tests (and log-tailing collectors) read right after a reply.
    Prompt,
}

impl Pace {
    /// A drain of at least this many lines keeps the writer in its 20 ms rhythm.
    fn busy_lines(self) -> usize {
        match self {
            Pace::Batched => 1,
            Pace::Prompt => 32,
        }
    }
}

/// The sending side; cheap to call from any thread, never blocks.
pub struct Writer {
    tx: SyncSender<Msg>,
    dropped: Arc<[AtomicU64]>,
    /// Bytes sent and not yet written.
    queued: Arc<AtomicUsize>,
}

impl Writer {
    /// Creates the folders, opens the files (errors here are start-up errors) and starts the thread.
    pub fn spawn(name: &str, files: Vec<FileSpec>, pace: Pace) -> io::Result<Writer> {
        let mut open = Vec::with_capacity(files.len());
        for spec in files {
            if let Some(dir) = spec.path.parent() {
                fs::create_dir_all(dir).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            open.push(RollingFile::open(spec).map_err(|(path, e)| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?);
        }
        let dropped: Arc<[AtomicU64]> = open.iter().map(|_| AtomicU64::new(0)).collect();
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        let counts = dropped.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let in_queue = queued.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(rx, open, &counts, &in_queue, pace.busy_lines()))?;
        Ok(Writer {
            tx,
            dropped,
            queued,
        })
    }

    /// Queues a finished line (ending in `\n`) for file `file`; drops it if the queue is full.
    pub fn write(&self, file: usize, line: String) {
        let len = line.len();
        let before = self.queued.fetch_add(len, Ordering::Relaxed);
        let sent = before + len <= CAPACITY_BYTES
            && match self.tx.try_send(Msg::Line(file, line)) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            };
        if !sent {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            if let Some(n) = self.dropped.get(file) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits (at most `limit`) until every line queued so far is in the files.
    pub fn flush(&self, limit: Duration) {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        // A blocking send here is fine: flush is called at shutdown and in tests, never per request.
        if self.tx.send(Msg::Flush(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(limit);
        }
    }
}

/// How long the writer sleeps between drains while lines keep coming.
const BUSY_POLL: Duration = Duration::from_millis(20);

/// The writer thread. Idle, it blocks on the queue, so the first line after a quiet spell wakes
/// it. After a drain of `busy_lines` or more ([`Pace`]) it sleeps before the next drain instead of
/// waiting on the queue, so a sender never has to wake it (a futex wake and a context switch per
/// line cost a quarter of the request rate on two cores) and each drain writes many lines with
/// one write(2); after a smaller one it waits on the queue again, so the next line is written at
/// once (a client that reads model_metrics.log right after its reply, as TorchServe's tests do,
/// finds the request's lines there).
fn run(
    rx: Receiver<Msg>,
    mut files: Vec<RollingFile>,
    dropped: &[AtomicU64],
    queued: &AtomicUsize,
    busy_lines: usize,
) {
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        loop {
            let mut got = 0usize;
            while let Some(msg) = next {
                got += 1;
                match msg {
                    Msg::Line(i, line) => {
                        if let Some(f) = files.get_mut(i) {
                            f.write(line.as_bytes());
                        }
                        queued.fetch_sub(line.len(), Ordering::Relaxed);
                    }
                    Msg::Flush(done) => waiting.push(done),
                }
                next = rx.try_recv().ok();
            }
            for (f, count) in files.iter_mut().zip(dropped) {
                let n = count.swap(0, Ordering::Relaxed);
                if n > 0 {
                    if let Some(notice) = f.spec.notice {
                        f.write(notice(n).as_bytes());
                    }
                }
                f.flush();
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            if got < busy_lines {
                break;
            }
            std::thread::sleep(BUSY_POLL);
            next = rx.try_recv().ok();
        }
    }
    for f in &mut files {
        f.flush();
    }
}

/// Seconds since the Unix epoch now.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// One log file with size and daily rollover.
struct RollingFile {
    spec: FileSpec,
    out: Option<BufWriter<File>>,
    size: u64,
    /// The UTC day (days since the epoch) of the lines in the current file.
    day: u64,
}

impl RollingFile {
    fn open(spec: FileSpec) -> Result<RollingFile, (PathBuf, io::Error)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.path)
            .map_err(|e| (spec.path.clone(), e))?;
        let meta = file.metadata().ok();
        let size = meta.as_ref().map_or(0, |m| m.len());
        // A file left by an earlier run rolls over under the day it was last written.
        let day = meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or_else(now_secs, |d| d.as_secs())
            / 86_400;
        Ok(RollingFile {
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            spec,
            size,
            day,
        })
    }

    fn write(&mut self, line: &[u8]) {
        self.write_at(line, now_secs());
    }

    /// Writes `line` at Unix time `now` (a parameter so that tests can cross midnight).
    fn write_at(&mut self, line: &[u8], now: u64) {
        let today = now / 86_400;
        if self.size > 0
            && (self.size + line.len() as u64 > self.spec.max_bytes || today != self.day)
        {
            self.roll();
        }
        self.day = today;
        if self.out.is_none() {
            self.reopen();
        }
        if let Some(out) = &mut self.out {
            if out.write_all(line).is_ok() {
                self.size += line.len() as u64;
            }
        }
    }

    fn flush(&mut self) {
        if let Some(out) = &mut self.out {
            let _ = out.flush();
        }
    }

    fn reopen(&mut self) {
        self.out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.path)
            .ok()
            .map(|f| BufWriter::with_capacity(64 * 1024, f));
        self.size = 0;
    }

    /// Moves the current file aside under its day's name, compresses it in the background and
    /// starts a new one.
    fn roll(&mut self) {
        self.flush();
        self.out = None;
        let dir = self
            .spec
            .path
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let stem = stem(&self.spec.path);
        let date = day_month(self.day);
        let (mut n, mut plain) = (1, dir.join(format!("{stem}.{date}.log")));
        while plain.exists() || gz_of(&plain).exists() {
            n += 1;
            plain = dir.join(format!("{stem}.{date}.{n}.log"));
        }
        if fs::rename(&self.spec.path, &plain).is_ok() {
            let keep = self.spec.keep;
            let spawned = std::thread::Builder::new()
                .name("oxserve-log-gzip".into())
                .spawn(move || {
                    // One rolled file at a time: rollovers close together (a burst of lines
                    // past a small limit) ran their threads at once, and one's prune could
                    // delete a file another was still writing.
                    let _one = GZIP.lock().unwrap_or_else(|e| e.into_inner());
                    compress(&plain);
                    prune(&dir, &stem, keep);
                });
            if spawned.is_err() {
                // No thread: leave the rolled file uncompressed rather than lose it.
            }
        }
        self.reopen();
    }
}

/// `access_log` of `logs/access_log.log`.
fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.strip_suffix(".log").unwrap_or(&name).to_string()
}

fn gz_of(plain: &Path) -> PathBuf {
    let mut s = plain.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// log4j2's `%d{dd-MMM}` of a UTC day number: `28-Nov`.
fn day_month(day: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (_, month, dom, ..) = crate::timefmt::civil_utc(day * 86_400);
    format!("{dom:02}-{}", MONTHS[(month - 1).clamp(0, 11) as usize])
}

/// Serializes the background compressions and prunes of every writer (see `RollingFile::roll`).
static GZIP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Gzips `plain` into `plain.gz` and removes `plain` (kept if compression fails). The `.gz` keeps
/// the time of the file's last line, so that prune orders rolled files by when they were
/// written, not by when their compression ended.
fn compress(plain: &Path) {
    let gz = gz_of(plain);
    let result = (|| -> io::Result<()> {
        let mut input = File::open(plain)?;
        let written = input.metadata()?.modified()?;
        let out = File::create(&gz)?;
        let mut enc =
            flate2::write::GzEncoder::new(BufWriter::new(out), flate2::Compression::fast());
        io::copy(&mut input, &mut enc)?;
        let out = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
        out.set_modified(written)
    })();
    match result {
        Ok(()) => {
            let _ = fs::remove_file(plain);
        }
        Err(_) => {
            let _ = fs::remove_file(&gz);
        }
    }
}

/// Deletes the oldest rolled files of `stem` beyond `keep`.
fn prune(dir: &Path, stem: &str, keep: usize) {
    let prefix = format!("{stem}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut rolled: Vec<(SystemTime, u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".log.gz")
        })
        .filter_map(|e| {
            let seq = rollover_number(&e.file_name().to_string_lossy(), &prefix);
            Some((e.metadata().ok()?.modified().ok()?, seq, e.path()))
        })
        .collect();
    if rolled.len() <= keep {
        return;
    }
    // Oldest first: by the time of the last line, then (rollovers within the file system's clock
    // tick share it) by the day's counter, which a name's order gets wrong past 9 (".10" < ".2").
    rolled.sort();
    for (_, _, path) in &rolled[..rolled.len() - keep] {
        let _ = fs::remove_file(path);
    }
}

/// The day's rollover counter of a rolled file's name: 1 for `access_log.28-Nov.log.gz`, 2 for
/// `access_log.28-Nov.2.log.gz`.
fn rollover_number(name: &str, prefix: &str) -> u64 {
    let middle = name
        .strip_prefix(prefix)
        .and_then(|n| n.strip_suffix(".log.gz"))
        .unwrap_or("");
    middle
        .rsplit_once('.')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A writer of one file that says how many lines it dropped as `dropped <n>` lines.
    fn counting_writer(path: &Path) -> Writer {
        Writer::spawn(
            "test-writer",
            vec![FileSpec {
                path: path.to_path_buf(),
                max_bytes: u64::MAX,
                keep: 1,
                notice: Some(|n| format!("dropped {n}\n")),
            }],
            Pace::Batched,
        )
        .unwrap()
    }

    /// The lines of `path` that start with `prefix`, and the drops its notices count.
    fn written_and_dropped(path: &Path, prefix: &str) -> (usize, usize) {
        let text = fs::read_to_string(path).unwrap();
        let written = text.lines().filter(|l| l.starts_with(prefix)).count();
        let dropped = text
            .lines()
            .filter_map(|l| l.strip_prefix("dropped ")?.parse::<usize>().ok())
            .sum();
        (written, dropped)
    }

    fn rolled(dir: &Path, stem: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{stem}.")) && n.ends_with(".log.gz"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rolls_over_by_size_into_dated_gzip_files_and_keeps_a_bounded_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access_log.log");
        let w = Writer::spawn(
            "test-writer",
            vec![FileSpec {
                path: path.clone(),
                max_bytes: 1000,
                keep: 3,
                notice: None,
            }],
            Pace::Batched,
        )
        .unwrap();
        let line = "x".repeat(99) + "\n";
        for _ in 0..25 {
            w.write(0, line.clone());
        }
        w.flush(Duration::from_secs(30));
        // 25 lines of 100 bytes, 1000 bytes per file: two rolled files, 5 lines current.
        assert_eq!(fs::metadata(&path).unwrap().len(), 500);
        let plain_left = |dir: &Path| {
            fs::read_dir(dir).unwrap().any(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.starts_with("access_log.") && n.ends_with(".log") && n != "access_log.log"
            })
        };
        wait_for("two gzip files, compressed", || {
            rolled(dir.path(), "access_log").len() == 2 && !plain_left(dir.path())
        });
        let names = rolled(dir.path(), "access_log");
        // Same day: the second rollover is numbered, not written over the first.
        let first = names.iter().find(|n| n.matches('.').count() == 3).unwrap();
        let date = &first["access_log.".len()..first.len() - ".log.gz".len()];
        assert!(
            names.contains(&format!("access_log.{date}.2.log.gz")),
            "{names:?}"
        );
        let mut text = String::new();
        let gz = File::open(dir.path().join(first)).unwrap();
        io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz), &mut text).unwrap();
        assert_eq!(text, line.repeat(10));
        for _ in 0..100 {
            w.write(0, line.clone());
        }
        w.flush(Duration::from_secs(30));
        wait_for("pruned to 3 and all compressed", || {
            !plain_left(dir.path()) && rolled(dir.path(), "access_log").len() == 3
        });
    }

    #[test]
    fn prune_keeps_the_newest_rollovers_even_when_their_times_tie() {
        let dir = tempfile::tempdir().unwrap();
        let same = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for n in 1..=12 {
            let name = if n == 1 {
                "access_log.29-Nov.log.gz".to_string()
            } else {
                format!("access_log.29-Nov.{n}.log.gz")
            };
            File::create(dir.path().join(name))
                .unwrap()
                .set_modified(same)
                .unwrap();
        }
        // An older day's file, and a file of another log that prune leaves alone.
        File::create(dir.path().join("access_log.28-Nov.3.log.gz"))
            .unwrap()
            .set_modified(same - Duration::from_secs(86_400))
            .unwrap();
        File::create(dir.path().join("ts_log.29-Nov.log.gz")).unwrap();
        prune(dir.path(), "access_log", 3);
        assert_eq!(
            rolled(dir.path(), "access_log"),
            [
                "access_log.29-Nov.10.log.gz",
                "access_log.29-Nov.11.log.gz",
                "access_log.29-Nov.12.log.gz"
            ]
        );
        assert_eq!(rolled(dir.path(), "ts_log").len(), 1);
        assert_eq!(
            rollover_number("access_log.29-Nov.log.gz", "access_log."),
            1
        );
        assert_eq!(
            rollover_number("access_log.29-Nov.7.log.gz", "access_log."),
            7
        );
    }

    #[test]
    fn a_full_queue_drops_lines_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model_log.log");
        let w = counting_writer(&path);
        // Far more than the queue holds, faster than any disk: some must be dropped, none blocks.
        for i in 0..(CAPACITY * 8) {
            w.write(0, format!("line {i}\n"));
        }
        w.flush(Duration::from_secs(30));
        let (written, dropped) = written_and_dropped(&path, "line ");
        assert_eq!(
            written + dropped,
            CAPACITY * 8,
            "every line is written or counted"
        );
    }

    #[test]
    fn a_new_utc_day_rolls_the_file_over_under_the_old_day() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ts_log.log");
        let mut f = RollingFile::open(FileSpec {
            path: path.clone(),
            max_bytes: u64::MAX,
            keep: 5,
            notice: None,
        })
        .map_err(|(_, e)| e)
        .unwrap();
        let nov_28 = 1_764_369_000; // 2025-11-28T22:30:00Z
        f.write_at(b"late on the 28th\n", nov_28);
        f.write_at(b"still the 28th\n", nov_28 + 5_000);
        f.write_at(b"the 29th\n", nov_28 + 6_000);
        f.flush();
        assert_eq!(fs::read_to_string(&path).unwrap(), "the 29th\n");
        let gz = dir.path().join("ts_log.28-Nov.log.gz");
        wait_for("the 28th compressed", || {
            gz.exists() && !dir.path().join("ts_log.28-Nov.log").exists()
        });
        let mut text = String::new();
        io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(File::open(&gz).unwrap()),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "late on the 28th\nstill the 28th\n");
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model_log.log");
        let w = counting_writer(&path);
        // 64 lines of 1 MiB: twice what the queue may hold at once.
        let big = "z".repeat((1 << 20) - 1) + "\n";
        for _ in 0..64 {
            w.write(0, big.clone());
            assert!(w.queued.load(Ordering::Relaxed) <= CAPACITY_BYTES);
        }
        w.flush(Duration::from_secs(60));
        let (written, dropped) = written_and_dropped(&path, "z");
        assert_eq!(written + dropped, 64);
        assert_eq!(w.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn day_names_are_log4j_dd_mmm() {
        assert_eq!(day_month(1_764_369_000 / 86_400), "28-Nov");
        assert_eq!(day_month(0), "01-Jan");
    }
}
