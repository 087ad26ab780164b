//! Metric families and their series: the storage every recorder writes into and the exposition reads.
//!
//! Series are created once (per model version, per worker, per device) and then updated through
//! cheap handles: an update is one or two relaxed atomic operations, so recording a request's metrics
//! never takes a lock. Families keep their series in a `BTreeMap`, so rendering walks them in a stable
//! order without sorting.
//!
//! Storage knows nothing of where else an update goes: a logged family holds a [`Sink`] (the metric
//! log writer implements it) and tells it of each update.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::spec::Kind;

/// Receives every update of a logged family's series: the metric log files
/// ([`super::log::LogSink`]) in log and legacy modes. `value` is the event (a counter's increment, a
/// gauge's new value, a histogram's observation).
pub trait Sink: Send + Sync + std::fmt::Debug {
    fn record(&self, series: &Series, value: f64, request_id: Option<&str>);

    /// Waits (briefly) until the updates told so far are stored: called at shutdown.
    fn flush(&self) {}
}

/// An f64 updated atomically (bits in an `AtomicU64`).
#[derive(Debug, Default)]
pub struct AtomicF64(AtomicU64);

impl AtomicF64 {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn add(&self, v: f64) {
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + v).to_bits();
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }
}

/// A counter's or gauge's value. Whole, non-negative increments (request counts, microseconds,
/// worker counts) go to an integer with one `fetch_add`, which stays cheap when threads contend; any
/// other change goes to an f64. The value is their sum.
#[derive(Debug, Default)]
pub struct Value {
    whole: AtomicU64,
    rest: AtomicF64,
}

impl Value {
    pub fn get(&self) -> f64 {
        self.whole.load(Ordering::Relaxed) as f64 + self.rest.get()
    }

    /// Sets a gauge. (Counters are only added to; gauges are set, or only added to.)
    pub fn set(&self, v: f64) {
        self.rest.set(v);
        self.whole.store(0, Ordering::Relaxed);
    }

    #[inline]
    pub fn add(&self, v: f64) {
        if v >= 0.0 && v.fract() == 0.0 && v < 9.0e15 {
            self.whole.fetch_add(v as u64, Ordering::Relaxed);
        } else {
            self.rest.add(v);
        }
    }
}

/// The numbers of one series.
#[derive(Debug)]
pub enum Cells {
    Value(Value),
    Histogram {
        /// Non-cumulative counts per bucket; the last one is +Inf.
        counts: Box<[AtomicU64]>,
        sum: AtomicF64,
    },
}

/// One labelled series of a family.
#[derive(Debug)]
pub struct Series {
    pub family: Arc<FamilyMeta>,
    pub label_values: Vec<String>,
    /// `a="x",b="y"` pre-escaped, so rendering copies it.
    pub labels_text: String,
    pub cells: Cells,
    sink: Option<Arc<dyn Sink>>,
}

/// A metric family's definition: the one type for families from metrics.yaml, oxserve's own
/// (`super::families`) and auto-detected handler metrics. Built with [`FamilyDef::new`] and the
/// setters below, so that no call site lines up seven positional arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyDef {
    pub name: String,
    pub kind: Kind,
    /// TorchServe's unit (`ms`, `Percent`), written in metric log lines; "" for oxserve's families.
    pub unit: String,
    pub help: String,
    pub label_names: Vec<String>,
    /// Upper bounds, histograms only (ignored for other kinds).
    pub buckets: Vec<f64>,
    /// Emitted by handlers (`model_metrics` in metrics.yaml, or auto-detected): capped in series,
    /// logged to model_metrics.log.
    pub model_origin: bool,
}

impl FamilyDef {
    pub fn new(name: &str, kind: Kind, help: impl Into<String>) -> FamilyDef {
        FamilyDef {
            name: name.to_string(),
            kind,
            unit: String::new(),
            help: help.into(),
            label_names: Vec::new(),
            buckets: Vec::new(),
            model_origin: false,
        }
    }

    pub fn labels<S: AsRef<str>>(mut self, names: &[S]) -> FamilyDef {
        self.label_names = names.iter().map(|n| n.as_ref().to_string()).collect();
        self
    }

    pub fn unit(mut self, unit: &str) -> FamilyDef {
        self.unit = unit.to_string();
        self
    }

    pub fn buckets(mut self, buckets: &[f64]) -> FamilyDef {
        self.buckets = buckets.to_vec();
        self
    }

    pub fn from_handlers(mut self) -> FamilyDef {
        self.model_origin = true;
        self
    }
}

/// What a family is, shared by its series: its definition (fields reachable directly, through
/// `Deref`) and what the registry decided about its output.
#[derive(Debug)]
pub struct FamilyMeta {
    pub def: FamilyDef,
    /// Rendered `le` values, one per bucket plus `+Inf`.
    pub(crate) le_text: Vec<String>,
    /// Whether the family appears on /metrics (false for logged families in log/legacy mode).
    pub exposed: bool,
}

impl std::ops::Deref for FamilyMeta {
    type Target = FamilyDef;
    fn deref(&self) -> &FamilyDef {
        &self.def
    }
}

/// A family and its series.
#[derive(Debug)]
pub struct Family {
    pub meta: Arc<FamilyMeta>,
    /// Where updates are logged; `None` for families that are not logged (prometheus mode).
    sink: Option<Arc<dyn Sink>>,
    series: RwLock<BTreeMap<Vec<String>, Arc<Series>>>,
}

/// Escapes a label value for the text format (`\`, `"` and newline).
pub fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes HELP text for the text format (`\` and newline): part of it (a unit) may come from a
/// handler's metric line.
pub fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Formats a sample value the way TorchServe prints it (`3.0`, `290371.129`), with Prometheus'
/// spellings for the special values.
pub fn write_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let mut buf = ryu::Buffer::new();
        out.push_str(buf.format_finite(v));
    }
}

impl Family {
    /// A family of `def`, on /metrics if `exposed`, its updates told to `sink` if there is one.
    pub fn new(mut def: FamilyDef, exposed: bool, sink: Option<Arc<dyn Sink>>) -> Family {
        if def.kind != Kind::Histogram {
            def.buckets.clear();
        }
        let mut le_text: Vec<String> = def
            .buckets
            .iter()
            .map(|b| {
                let mut s = String::new();
                write_value(*b, &mut s);
                s
            })
            .collect();
        le_text.push("+Inf".to_string());
        Family {
            meta: Arc::new(FamilyMeta {
                def,
                le_text,
                exposed,
            }),
            sink,
            series: RwLock::new(BTreeMap::new()),
        }
    }

    /// The series with these label values (in label-name order), created on first use.
    pub fn series(&self, values: &[&str]) -> Arc<Series> {
        self.series_within(values, usize::MAX)
            .expect("an uncapped family always has room")
    }

    /// Like [`Family::series`], but creates no series past `max_series` of them: `None` then.
    /// Handler metrics go through here, since their label values are chosen by handler code.
    pub fn series_within(&self, values: &[&str], max_series: usize) -> Option<Arc<Series>> {
        let key: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        if let Some(s) = self.series.read().unwrap().get(&key) {
            return Some(s.clone());
        }
        let mut map = self.series.write().unwrap();
        if map.len() >= max_series && !map.contains_key(&key) {
            return None;
        }
        let series = map
            .entry(key.clone())
            .or_insert_with(|| {
                // Every label ends with a comma, the last one too: TorchServe's Java client writes
                // `Requests2XX{Level="Host",Hostname="vm",} 6.0`, and its tests and users' scripts
                // match that text byte for byte (Prometheus parses both forms).
                let mut labels_text = String::new();
                for (n, v) in self.meta.label_names.iter().zip(&key) {
                    labels_text.push_str(n);
                    labels_text.push_str("=\"");
                    escape_label_value(v, &mut labels_text);
                    labels_text.push_str("\",");
                }
                let cells = match self.meta.kind {
                    Kind::Histogram => Cells::Histogram {
                        counts: (0..=self.meta.buckets.len())
                            .map(|_| AtomicU64::new(0))
                            .collect(),
                        sum: AtomicF64::default(),
                    },
                    _ => Cells::Value(Value::default()),
                };
                Arc::new(Series {
                    family: self.meta.clone(),
                    label_values: key,
                    labels_text,
                    cells,
                    sink: self.sink.clone(),
                })
            })
            .clone();
        Some(series)
    }

    /// How many series the family holds.
    pub fn len(&self) -> usize {
        self.series.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f` with every series of the family, under the family's read lock (so `f` stays short:
    /// the dashboard's sampler reads values here, once a second).
    pub fn for_each_series(&self, mut f: impl FnMut(&Series)) {
        for s in self.series.read().unwrap().values() {
            f(s);
        }
    }

    /// Drops a series (a retired worker, an unregistered model).
    pub fn remove(&self, values: &[&str]) {
        let key: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        self.series.write().unwrap().remove(&key);
    }

    /// Drops every series whose label `label` has value `value`.
    pub fn remove_where(&self, label: &str, value: &str) {
        if let Some(i) = self.meta.label_names.iter().position(|n| n == label) {
            self.series
                .write()
                .unwrap()
                .retain(|k, _| k.get(i).map(String::as_str) != Some(value));
        }
    }

    /// Appends this family in text format 0.0.4; `only_sample` limits a histogram to one of
    /// `_bucket`, `_sum`, `_count` (TorchServe's sample-name filtering).
    pub fn render(&self, out: &mut String, only_sample: Option<&str>) {
        let m = &self.meta;
        out.push_str("# HELP ");
        out.push_str(&m.name);
        out.push(' ');
        escape_help(&m.help, out);
        out.push('\n');
        let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind.as_str());
        let series = self.series.read().unwrap();
        for s in series.values() {
            match &s.cells {
                Cells::Value(v) => {
                    sample_head(out, &m.name, "", &s.labels_text, None);
                    write_value(v.get(), out);
                    out.push('\n');
                }
                Cells::Histogram { counts, sum } => {
                    let mut cumulative = 0u64;
                    let want = |suffix: &str| only_sample.is_none_or(|o| o == suffix);
                    let bucket_counts: Vec<u64> =
                        counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                    if want("_bucket") {
                        for (c, le) in bucket_counts.iter().zip(&m.le_text) {
                            cumulative += c;
                            sample_head(out, &m.name, "_bucket", &s.labels_text, Some(le));
                            // Counts print as doubles ("1.0"), as TorchServe's Prometheus
                            // client writes every sample: its test_metrics.py matches
                            // `_count{...} \d+\.\d+`. Exact while counts stay below 2^53.
                            write_value(cumulative as f64, out);
                            out.push('\n');
                        }
                    }
                    if want("_sum") {
                        sample_head(out, &m.name, "_sum", &s.labels_text, None);
                        write_value(sum.get(), out);
                        out.push('\n');
                    }
                    if want("_count") {
                        let total: u64 = bucket_counts.iter().sum();
                        sample_head(out, &m.name, "_count", &s.labels_text, None);
                        write_value(total as f64, out);
                        out.push('\n');
                    }
                }
            }
        }
    }
}

fn sample_head(out: &mut String, name: &str, suffix: &str, labels: &str, le: Option<&str>) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        out.push_str(labels);
        if let Some(le) = le {
            out.push_str("le=\"");
            out.push_str(le);
            out.push_str("\",");
        }
        out.push('}');
    }
    out.push(' ');
}

/// What an update does to a series.
#[derive(Clone, Copy)]
enum Op {
    Add,
    Set,
    Observe,
}

impl Series {
    /// Adds to a counter (or gauge).
    #[inline]
    pub fn inc_by(&self, v: f64) {
        self.apply(Op::Add, v, None)
    }

    #[inline]
    pub fn inc(&self) {
        self.inc_by(1.0)
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(&self, v: f64) {
        self.apply(Op::Set, v, None)
    }

    /// Records one observation into a histogram.
    #[inline]
    pub fn observe(&self, v: f64) {
        self.apply(Op::Observe, v, None)
    }

    /// Records a value by the family's kind (counters add, gauges set, histograms observe); in log
    /// mode the line names the request, as TorchServe's model_metrics.log does.
    pub fn record(&self, v: f64, request_id: Option<&str>) {
        let op = match self.family.kind {
            Kind::Counter => Op::Add,
            Kind::Gauge => Op::Set,
            Kind::Histogram => Op::Observe,
        };
        self.apply(op, v, request_id)
    }

    #[inline]
    fn apply(&self, op: Op, v: f64, request_id: Option<&str>) {
        let logged = match (&self.cells, op) {
            (Cells::Value(c), Op::Add) => {
                c.add(v);
                // A counter's event is the increment; a gauge's is its new value.
                if self.family.kind == Kind::Gauge {
                    c.get()
                } else {
                    v
                }
            }
            (Cells::Value(c), _) => {
                c.set(v);
                v
            }
            (Cells::Histogram { counts, sum }, _) => {
                let i = self
                    .family
                    .buckets
                    .iter()
                    .position(|b| v <= *b)
                    .unwrap_or(self.family.buckets.len());
                counts[i].fetch_add(1, Ordering::Relaxed);
                sum.add(v);
                v
            }
        };
        if let Some(sink) = &self.sink {
            sink.record(self, logged, request_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_escaped_labels_and_histograms() {
        let def = FamilyDef::new("h", Kind::Histogram, "help")
            .unit("s")
            .labels(&["m"])
            .buckets(&[0.1, 1.0]);
        let f = Family::new(def, true, None);
        let s = f.series(&["a\"b\\c\nd"]);
        s.observe(0.05);
        s.observe(0.5);
        s.observe(5.0);
        let mut out = String::new();
        f.render(&mut out, None);
        assert!(
            out.contains("h_bucket{m=\"a\\\"b\\\\c\\nd\",le=\"0.1\",} 1.0\n"),
            "{out}"
        );
        assert!(out.contains("le=\"1.0\",} 2.0\n"), "{out}");
        assert!(out.contains("le=\"+Inf\",} 3.0\n"), "{out}");
        assert!(
            out.contains("h_sum{m=\"a\\\"b\\\\c\\nd\",} 5.55\n"),
            "{out}"
        );
        assert!(
            out.contains("h_count{m=\"a\\\"b\\\\c\\nd\",} 3.0\n"),
            "{out}"
        );
        let mut only = String::new();
        f.render(&mut only, Some("_count"));
        assert!(!only.contains("_bucket") && only.contains("_count"));
    }

    /// A sink that keeps what it is told.
    #[derive(Debug, Default)]
    struct Kept(std::sync::Mutex<Vec<(String, f64, Option<String>)>>);

    impl Sink for Kept {
        fn record(&self, series: &Series, value: f64, request_id: Option<&str>) {
            self.0.lock().unwrap().push((
                series.family.name.clone(),
                value,
                request_id.map(str::to_string),
            ));
        }
    }

    #[test]
    fn logged_families_tell_their_sink_each_event() {
        let kept = Arc::new(Kept::default());
        let sink: Arc<dyn Sink> = kept.clone();
        let counter = Family::new(
            FamilyDef::new("c", Kind::Counter, ""),
            false,
            Some(sink.clone()),
        );
        let gauge = Family::new(FamilyDef::new("g", Kind::Gauge, ""), false, Some(sink));
        let quiet = Family::new(FamilyDef::new("q", Kind::Counter, ""), true, None);
        counter.series(&[]).inc_by(2.0);
        counter.series(&[]).record(3.0, Some("r"));
        gauge.series(&[]).set(4.0);
        gauge.series(&[]).inc_by(1.0);
        quiet.series(&[]).inc();
        let events = kept.0.lock().unwrap().clone();
        // A counter's event is the increment; a gauge's is its new value.
        assert_eq!(
            events,
            [
                ("c".to_string(), 2.0, None),
                ("c".to_string(), 3.0, Some("r".to_string())),
                ("g".to_string(), 4.0, None),
                ("g".to_string(), 5.0, None),
            ]
        );
    }

    #[test]
    fn whole_and_fractional_increments_add_up() {
        let v = Value::default();
        v.add(3.0);
        v.add(0.25);
        v.add(-1.0);
        v.add(1_000_000.0);
        assert_eq!(v.get(), 1_000_002.25);
        v.set(7.5);
        assert_eq!(v.get(), 7.5);
    }

    #[test]
    fn values_print_like_torchserve() {
        let mut s = String::new();
        write_value(3.0, &mut s);
        s.push(' ');
        write_value(290371.129, &mut s);
        s.push(' ');
        write_value(f64::INFINITY, &mut s);
        assert_eq!(s, "3.0 290371.129 +Inf");
    }
}
