//! The `[METRICS]` lines handler workers print on stdout.
//!
//! `<name>.<unit>:<value>|#<dim>:<val>,...|#type:<TYPE>|#hostname:<host>,<epoch>[,<request ids>]`
//! (the `[METRICS]` prefix already removed). TorchServe drops lines it cannot parse without a word;
//! the parser here says what is wrong so the registry can count and log it.
//!
//! Handler code writes these lines, so they are outside input: besides the syntax, the parser
//! refuses what would make the exposition invalid or unbounded (a unit outside TorchServe's
//! `[\w\s]+`, a dimension named twice, a reserved `__` label name, more than [`MAX_DIMENSIONS`]
//! dimensions, names or values longer than [`MAX_NAME_LEN`] / [`MAX_VALUE_LEN`]).

use super::spec::{valid_label_name, valid_metric_name, Kind};

/// Most dimensions one line may carry.
pub const MAX_DIMENSIONS: usize = 32;
/// Longest metric name, unit or dimension name.
pub const MAX_NAME_LEN: usize = 200;
/// Longest dimension value.
pub const MAX_VALUE_LEN: usize = 1024;

/// One parsed backend metric line.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricLine {
    pub name: String,
    pub unit: String,
    pub value: f64,
    pub dimensions: Vec<(String, String)>,
    /// `None` when the line carries no `#type:` (TorchServe before 0.8).
    pub kind: Option<Kind>,
    pub hostname: String,
    pub timestamp: Option<u64>,
    pub request_ids: Vec<String>,
}

/// Why a metric line is refused; the registry logs it and counts the line as dropped. Fields hold
/// the offending part of the line as written.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    #[error("no ':<value>' in {0:?}")]
    NoValue(String),
    #[error("no '.<unit>' after the name in {0:?}")]
    NoUnit(String),
    #[error("invalid metric name {0:?}")]
    Name(String),
    #[error("invalid unit {0:?}")]
    Unit(String),
    #[error("value {0:?} is not a number")]
    Value(String),
    #[error("no '|#' dimensions part")]
    NoDimensions,
    #[error("dimension {0:?} has no ':'")]
    DimensionPair(String),
    #[error("invalid dimension name {0:?}")]
    DimensionName(String),
    #[error("dimension {0:?} has a value longer than {MAX_VALUE_LEN} bytes")]
    DimensionValue(String),
    #[error("dimension {0:?} appears twice")]
    Duplicate(String),
    #[error("more than {MAX_DIMENSIONS} dimensions")]
    TooManyDimensions,
    #[error("unknown type {0:?}")]
    Type(String),
    #[error("timestamp {0:?} is not a whole number")]
    Timestamp(String),
    #[error("unexpected part {0:?}")]
    Part(String),
}

/// Parses a line without its `[METRICS]` prefix.
pub fn parse(line: &str) -> Result<MetricLine, LineError> {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut segments = line.split("|#");
    let head = segments.next().unwrap_or_default();
    let (name_unit, value) = head
        .rsplit_once(':')
        .ok_or_else(|| LineError::NoValue(head.into()))?;
    let (name, unit) = name_unit
        .split_once('.')
        .ok_or_else(|| LineError::NoUnit(name_unit.into()))?;
    if !valid_metric_name(name) || name.len() > MAX_NAME_LEN {
        return Err(LineError::Name(name.into()));
    }
    // TorchServe's unit pattern is [\w\s]+; the unit goes into the HELP text.
    if unit.is_empty()
        || unit.len() > MAX_NAME_LEN
        || !unit
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == ' ')
    {
        return Err(LineError::Unit(unit.into()));
    }
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| LineError::Value(value.into()))?;
    let mut out = MetricLine {
        name: name.to_string(),
        unit: unit.to_string(),
        value,
        dimensions: Vec::new(),
        kind: None,
        hostname: String::new(),
        timestamp: None,
        request_ids: Vec::new(),
    };
    let dims = segments.next().ok_or(LineError::NoDimensions)?;
    for pair in dims.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once(':')
            .ok_or_else(|| LineError::DimensionPair(pair.into()))?;
        // `__` names are reserved to Prometheus itself (`__name__`).
        if !valid_label_name(k) || k.starts_with("__") || k.len() > MAX_NAME_LEN {
            return Err(LineError::DimensionName(k.into()));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(LineError::DimensionValue(k.into()));
        }
        if out.dimensions.iter().any(|(name, _)| name == k) {
            return Err(LineError::Duplicate(k.into()));
        }
        if out.dimensions.len() == MAX_DIMENSIONS {
            return Err(LineError::TooManyDimensions);
        }
        out.dimensions.push((k.to_string(), v.to_string()));
    }
    for segment in segments {
        if let Some(t) = segment.strip_prefix("type:") {
            out.kind = Some(Kind::from_line_type(t).ok_or_else(|| LineError::Type(t.into()))?);
        } else if let Some(rest) = segment.strip_prefix("hostname:") {
            let mut parts = rest.split(',');
            out.hostname = parts.next().unwrap_or_default().to_string();
            if let Some(ts) = parts.next() {
                out.timestamp = Some(
                    ts.trim()
                        .parse()
                        .map_err(|_| LineError::Timestamp(ts.into()))?,
                );
            }
            out.request_ids = parts
                .filter(|p| !p.is_empty())
                .map(|p| p.to_string())
                .collect();
        } else {
            return Err(LineError::Part(segment.into()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_torchserve_lines() {
        let l = parse("HandlerTime.ms:82.93|#ModelName:m,Level:Model|#type:GAUGE|#hostname:h,1717105563,req-1").unwrap();
        assert_eq!(l.name, "HandlerTime");
        assert_eq!(l.unit, "ms");
        assert_eq!(l.value, 82.93);
        assert_eq!(
            l.dimensions,
            [
                ("ModelName".into(), "m".into()),
                ("Level".into(), "Model".into())
            ]
        );
        assert_eq!(l.kind, Some(Kind::Gauge));
        assert_eq!(l.hostname, "h");
        assert_eq!(l.timestamp, Some(1717105563));
        assert_eq!(l.request_ids, ["req-1"]);
    }

    #[test]
    fn accepts_exponents_inf_nan_and_spaces() {
        assert_eq!(parse("A.Count:1e-3|#|#hostname:h,1").unwrap().value, 0.001);
        assert!(parse("A.Count:inf|#|#hostname:h,1")
            .unwrap()
            .value
            .is_infinite());
        assert!(parse("A.Count:nan|#|#hostname:h,1").unwrap().value.is_nan());
        let l = parse("A.Count:2|#Region:us east 1|#type:COUNTER|#hostname:h,1,a,b").unwrap();
        assert_eq!(l.dimensions[0].1, "us east 1");
        assert_eq!(l.request_ids, ["a", "b"]);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(parse("garbage").is_err());
        assert!(parse("A.Count:x|#|#hostname:h,1")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
        assert!(parse("9A.Count:1|#|#hostname:h,1")
            .unwrap_err()
            .to_string()
            .contains("invalid metric name"));
        assert!(parse("A.Count:1|#|#type:SUMMARY|#hostname:h,1").is_err());
        for (line, why) in [
            ("A.Count:1|#a:1,a:2|#hostname:h,1", "appears twice"),
            (
                "A.Count:1|#__name__:x|#hostname:h,1",
                "invalid dimension name",
            ),
            ("A.Co\\unt:1|#|#hostname:h,1", "invalid unit"),
            ("A.:1|#|#hostname:h,1", "invalid unit"),
        ] {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.contains(why), "{line}: {e}");
        }
        let many: Vec<String> = (0..=MAX_DIMENSIONS).map(|i| format!("d{i}:v")).collect();
        let e = parse(&format!("A.Count:1|#{}|#hostname:h,1", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than"), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const VALID: &str =
            "HandlerTime.ms:82.93|#ModelName:m,Level:Model|#type:GAUGE|#hostname:h,1717105563,req-1";

        fn check(line: &str) {
            if let Ok(l) = parse(line) {
                assert!(l.dimensions.len() <= MAX_DIMENSIONS);
                assert!(l.name.len() <= MAX_NAME_LEN && l.unit.len() <= MAX_NAME_LEN);
                for (i, (k, v)) in l.dimensions.iter().enumerate() {
                    assert!(valid_label_name(k) && !k.starts_with("__"));
                    assert!(v.len() <= MAX_VALUE_LEN);
                    assert!(l.dimensions[..i].iter().all(|(other, _)| other != k));
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn random_lines_never_panic(line in "\\PC{0,200}") {
                check(&line);
            }

            #[test]
            fn structured_lines_never_panic(
                name in "[A-Za-z_:][A-Za-z0-9_:]{0,10}|\\PC{0,10}",
                unit in "[A-Za-z ]{0,6}|\\PC{0,6}",
                value in "[0-9eE.+-]{0,8}|inf|nan|\\PC{0,5}",
                dims in proptest::collection::vec(("[a-z_]{0,4}|\\PC{0,4}", "\\PC{0,8}"), 0..40),
                tail in "\\PC{0,30}",
            ) {
                let dims: Vec<String> = dims.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                check(&format!("{name}.{unit}:{value}|#{}|#type:GAUGE|#hostname:h,1{tail}", dims.join(",")));
            }

            #[test]
            fn mutated_lines_never_panic(edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<char>()), 1..6)) {
                let mut chars: Vec<char> = VALID.chars().collect();
                for (at, c) in edits {
                    let i = at.index(chars.len());
                    chars[i] = c;
                }
                check(&chars.into_iter().collect::<String>());
            }
        }
    }
}
