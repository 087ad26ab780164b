//! metrics.yaml: which metrics exist, with their type, unit and dimensions.
//!
//! The file format is TorchServe's (`ts_metrics` / `model_metrics`, each with `counter`, `gauge`,
//! `histogram` lists). oxserve adds one optional key per entry, `buckets`, because TorchServe's fixed
//! Prometheus buckets (0.005..10) are useless for millisecond values.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

/// The built-in default: exactly TorchServe's default metric set.
pub const DEFAULT_YAML: &str = include_str!("default_metrics.yaml");

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }

    /// From a `[METRICS]` line's `#type:` value (COUNTER, GAUGE, HISTOGRAM).
    pub fn from_line_type(s: &str) -> Option<Kind> {
        match s.to_ascii_uppercase().as_str() {
            "COUNTER" => Some(Kind::Counter),
            "GAUGE" => Some(Kind::Gauge),
            "HISTOGRAM" => Some(Kind::Histogram),
            _ => None,
        }
    }
}

/// Whether a metric is recorded by the server ("ts") or emitted by handlers ("model").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Frontend,
    Model,
}

/// One declared metric, as metrics.yaml declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub name: String,
    pub kind: Kind,
    pub unit: String,
    pub dimensions: Vec<String>,
    pub origin: Origin,
    pub buckets: Option<Vec<f64>>,
}

/// All declared metrics, in file order.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub metrics: Vec<MetricSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    #[allow(dead_code)]
    dimensions: Option<serde_yaml::Value>,
    #[serde(default)]
    ts_metrics: Option<Section>,
    #[serde(default)]
    model_metrics: Option<Section>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Section {
    #[serde(default)]
    counter: Option<Vec<Entry>>,
    #[serde(default)]
    gauge: Option<Vec<Entry>>,
    #[serde(default)]
    histogram: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    unit: Option<String>,
    #[serde(default)]
    dimensions: Vec<String>,
    #[serde(default)]
    buckets: Option<Vec<f64>>,
}

/// Prometheus' metric name rule.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Prometheus' label name rule.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Names an alias (`*name`) that no anchor (`&name`) defines, with its line and the entry it is
/// in; the YAML parser alone only says "unknown anchor at line N".
fn check_anchors(text: &str, source: &str) -> Result<(), SpecError> {
    let ident = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect()
    };
    let mut anchors = HashSet::new();
    let mut entry = String::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or(line);
        if let Some(name) = code.trim_start().strip_prefix("- name:") {
            entry = name.trim().to_string();
        }
        let mut in_quotes = false;
        for (i, c) in code.char_indices() {
            match c {
                '"' => in_quotes = !in_quotes,
                '&' if !in_quotes => {
                    anchors.insert(ident(&code[i + 1..]));
                }
                '*' if !in_quotes => {
                    let prev = code[..i].chars().last().unwrap_or(' ');
                    let alias = ident(&code[i + 1..]);
                    if matches!(prev, ' ' | '[' | ',' | ':')
                        && !alias.is_empty()
                        && !anchors.contains(&alias)
                    {
                        let at = if entry.is_empty() {
                            String::new()
                        } else {
                            format!(" ({entry})")
                        };
                        return Err(SpecError::UndefinedAnchor {
                            file: source.to_string(),
                            line: n + 1,
                            entry: at,
                            alias,
                        });
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Why a metrics.yaml was refused; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file cannot be read (missing, too large, not UTF-8). Shown, not chained as a source:
    /// its message already holds the reason, and start-up errors are printed with their chain.
    #[error("{0}")]
    Read(crate::config::ReadFileError),
    /// Not YAML of the expected shape.
    #[error("metrics config {file}: {reason}")]
    Yaml { file: String, reason: String },
    /// An alias (`*name`) no anchor defines; `entry` is ` (<metric name>)` when known.
    #[error("metrics config {file}: line {line}{entry}: undefined anchor *{alias}")]
    UndefinedAnchor {
        file: String,
        line: usize,
        entry: String,
        alias: String,
    },
    /// A metric entry that is refused; `at` names the file, section, index and metric.
    #[error("{at}: {reason}")]
    Entry { at: String, reason: String },
}

fn refused(at: &str, reason: impl Into<String>) -> SpecError {
    SpecError::Entry {
        at: at.to_string(),
        reason: reason.into(),
    }
}

impl Spec {
    /// The `model_metrics` section as JSON, in metrics.yaml's shape
    /// (`{"counter": [{"name", "unit", "dimensions"}], "gauge": [...], "histogram": [...]}`):
    /// what the stdlib Python runtime declares in `context.metrics`. The server parses the file
    /// once, so the runtime needs no YAML reader (as for model-config.yaml).
    pub fn handler_metrics_json(&self) -> String {
        let mut section = serde_json::Map::new();
        for s in self.metrics.iter().filter(|s| s.origin == Origin::Model) {
            let entry = serde_json::json!({
                "name": s.name,
                "unit": s.unit,
                "dimensions": s.dimensions,
            });
            section
                .entry(s.kind.as_str())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()))
                .as_array_mut()
                .expect("only arrays are inserted")
                .push(entry);
        }
        serde_json::Value::Object(section).to_string()
    }

    /// TorchServe's default set.
    pub fn builtin() -> Spec {
        Spec::parse(DEFAULT_YAML, "built-in metrics.yaml")
            .expect("the built-in metrics.yaml is valid")
    }

    /// Reads and validates a metrics.yaml file.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text =
            crate::config::read_small_file(path, &format!("metrics config {}", path.display()))
                .map_err(SpecError::Read)?;
        Spec::parse(&text, &path.display().to_string())
    }

    /// Parses and validates metrics.yaml text; `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Spec, SpecError> {
        check_anchors(text, source)?;
        let shape: FileShape = serde_yaml::from_str(text).map_err(|e| SpecError::Yaml {
            file: source.to_string(),
            reason: e.to_string(),
        })?;
        let mut spec = Spec::default();
        let mut seen = HashSet::new();
        let sections = [
            ("ts_metrics", Origin::Frontend, shape.ts_metrics),
            ("model_metrics", Origin::Model, shape.model_metrics),
        ];
        for (section_name, origin, section) in sections {
            let Some(section) = section else { continue };
            let lists = [
                (Kind::Counter, section.counter),
                (Kind::Gauge, section.gauge),
                (Kind::Histogram, section.histogram),
            ];
            for (kind, entries) in lists {
                for (i, entry) in entries.unwrap_or_default().into_iter().enumerate() {
                    let at = format!(
                        "metrics config {source}: {section_name}.{}[{i}]",
                        kind.as_str()
                    );
                    let name = entry.name.ok_or_else(|| refused(&at, "missing name"))?;
                    let at = format!("{at} ({name})");
                    if !valid_metric_name(&name) {
                        return Err(refused(&at, format!("invalid metric name {name:?}")));
                    }
                    let unit = entry.unit.ok_or_else(|| refused(&at, "missing unit"))?;
                    for d in &entry.dimensions {
                        // `__` names are Prometheus' own; `le` is a histogram's bucket label.
                        if !valid_label_name(d)
                            || d.starts_with("__")
                            || (kind == Kind::Histogram && d == "le")
                        {
                            return Err(refused(&at, format!("invalid dimension name {d:?}")));
                        }
                    }
                    let mut dims = HashSet::new();
                    for d in &entry.dimensions {
                        if !dims.insert(d) {
                            return Err(refused(&at, format!("dimension {d:?} is listed twice")));
                        }
                    }
                    if let Some(b) = &entry.buckets {
                        if kind != Kind::Histogram {
                            return Err(refused(&at, "buckets are only for histograms"));
                        }
                        if b.is_empty()
                            || b.iter().any(|v| !v.is_finite())
                            || b.windows(2).any(|w| w[0] >= w[1])
                        {
                            return Err(refused(&at, "buckets must be strictly increasing"));
                        }
                    }
                    if !seen.insert(name.clone()) {
                        return Err(refused(&at, format!("duplicate metric name {name:?}")));
                    }
                    spec.metrics.push(MetricSpec {
                        name,
                        kind,
                        unit,
                        dimensions: entry.dimensions,
                        origin,
                        buckets: entry.buckets,
                    });
                }
            }
        }
        Ok(spec)
    }

    pub fn get(&self, name: &str) -> Option<&MetricSpec> {
        self.metrics.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_is_torchserves_set() {
        let s = Spec::builtin();
        assert_eq!(s.metrics.len(), 21);
        let r = s.get("Requests2XX").unwrap();
        assert_eq!(r.kind, Kind::Counter);
        assert_eq!(r.dimensions, ["Level", "Hostname"]);
        let h = s.get("HandlerTime").unwrap();
        // As the file declares it; the registry adds Hostname to handler families.
        assert_eq!(h.dimensions, ["ModelName", "Level"]);
        assert_eq!(h.unit, "ms");
    }

    #[test]
    fn errors_name_file_entry_and_reason() {
        let dup = "ts_metrics:\n  counter:\n    - name: A\n      unit: Count\n    - name: A\n      unit: Count\n";
        let e = Spec::parse(dup, "m.yaml").unwrap_err().to_string();
        assert!(
            e.contains("m.yaml") && e.contains("duplicate") && e.contains("A"),
            "{e}"
        );
        let nounit = "ts_metrics:\n  gauge:\n    - name: B\n";
        let e = Spec::parse(nounit, "m.yaml").unwrap_err().to_string();
        assert!(e.contains("missing unit") && e.contains("(B)"), "{e}");
        let anchor =
            "model_metrics:\n  gauge:\n    - name: C\n      unit: ms\n      dimensions: [*nope]\n";
        let e = Spec::parse(anchor, "m.yaml").unwrap_err().to_string();
        assert!(
            e.contains("m.yaml") && e.contains("undefined anchor *nope") && e.contains("(C)"),
            "{e}"
        );
        let badname = "ts_metrics:\n  gauge:\n    - name: 9bad\n      unit: ms\n";
        assert!(Spec::parse(badname, "m.yaml")
            .unwrap_err()
            .to_string()
            .contains("invalid metric name"));
        let badlabel =
            "ts_metrics:\n  gauge:\n    - name: ok\n      unit: ms\n      dimensions: [\"a-b\"]\n";
        assert!(Spec::parse(badlabel, "m.yaml")
            .unwrap_err()
            .to_string()
            .contains("invalid dimension"));
        for bad in [
            "model_metrics:\n  histogram:\n    - name: H\n      unit: ms\n      dimensions: [le]\n",
            "model_metrics:\n  gauge:\n    - name: G\n      unit: ms\n      dimensions: [__name__]\n",
        ] {
            let e = Spec::parse(bad, "m.yaml").unwrap_err().to_string();
            assert!(e.contains("invalid dimension"), "{e}");
        }
        let nan =
            "model_metrics:\n  histogram:\n    - name: H\n      unit: ms\n      buckets: [.nan]\n";
        let e = Spec::parse(nan, "m.yaml").unwrap_err().to_string();
        assert!(e.contains("buckets"), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn random_yaml_never_panics(text in "\\PC{0,300}") {
                let _ = Spec::parse(&text, "prop.yaml");
            }

            /// The built-in metrics.yaml with a few characters changed or cut.
            #[test]
            fn mutated_yaml_never_panics(
                edits in proptest::collection::vec((any::<proptest::sample::Index>(), "[ :&*\\-\\[\\]{}a-z0-9\n]"), 1..6),
                cut in any::<proptest::sample::Index>(),
            ) {
                let mut chars: Vec<char> = DEFAULT_YAML.chars().collect();
                for (at, s) in edits {
                    let i = at.index(chars.len());
                    chars.splice(i..=i, s.chars());
                }
                let keep = cut.index(chars.len() + 1);
                let text: String = chars[..keep].iter().collect();
                let _ = Spec::parse(&text, "prop.yaml");
            }
        }
    }
}
