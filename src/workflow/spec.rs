//! A workflow archive's contents: `WAR-INF/MANIFEST.json` (what torch-workflow-archiver writes)
//! and the spec YAML it names (`models:` with their settings, `dag:` edges), turned into a
//! validated DAG.
//!
//! The rules are TorchServe's (frontend/.../ensemble/WorkFlow.java, Dag.java): a `dag` node named
//! like an entry of `models` is that model, registered as `<workflow>__<node>`; any other node is
//! a function of the archive's handler file, registered as a model of its own whose handler is
//! `<handler file>:<node>`. Workflow-level settings (`min-workers`, `batch-size`, `timeout-ms`...)
//! are the defaults of every model; function nodes always get 1 worker, batch size 1 and no batch
//! delay. The DAG has exactly one start node, no self loop and no cycle.
//!
//! Differences from TorchServe: a spec value of the wrong type (`batch-size: "4"`) is a 400 with
//! the key named, where TorchServe's casts fail with a 500; a DAG has at most [`MAX_NODES`] nodes;
//! node names must be usable as model names (and function nodes as Python function names), so a
//! name that could never load is refused at once rather than when its worker fails.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;

/// Most nodes one workflow's DAG may have: each is a model with its own worker(s).
pub const MAX_NODES: usize = 64;
/// Longest node name (the model name `<workflow>__<node>` has the registry's own limit too).
const MAX_NODE_NAME: usize = 100;

/// Why `WAR-INF/MANIFEST.json` is refused (TorchServe's WorkflowArchive.validate words).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("WAR-INF/MANIFEST.json is not valid: {0}")]
    Json(serde_json::Error),
    #[error("Missing Workflow entry in manifest file.")]
    NoWorkflow,
    #[error("Workflow name is not defined.")]
    NoName,
    #[error("Workflow archive version is not defined.")]
    NoVersion,
    #[error("Workflow archive createdOn is not defined.")]
    NoCreatedOn,
    #[error("Workflow spec file is not defined.")]
    NoSpecFile,
}

/// Why a workflow spec is refused. Values are shown as YAML read them (`String("4")`); the
/// DAG's words (self loop, start node) are TorchServe's.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("Failed to parse yaml: {0}")]
    Yaml(serde_yaml::Error),
    #[error("the workflow spec must be a YAML mapping with `models` and `dag`")]
    NotMapping,
    #[error("`models` must be a mapping")]
    ModelsNotMapping,
    #[error("{what} must be a name, got {value:?}")]
    NotName { what: String, value: Value },
    /// `at` is the setting's place (`"models: "`, `"models: m: "`).
    #[error("{at}{key} must be a non-negative whole number, got {value:?}")]
    NotCount {
        at: String,
        key: String,
        value: Value,
    },
    #[error("models: {0} must be a mapping with a url")]
    ModelNotMapping(String),
    #[error("models: {0}: url must be a non-empty string")]
    EmptyUrl(String),
    #[error("models: {model}: unknown setting {key:?}")]
    UnknownSetting { model: String, key: String },
    #[error("models: {0} has no url")]
    NoUrl(String),
    #[error("models: {model}: min-workers {min} is more than max-workers {max}")]
    MinAboveMax { model: String, min: u32, max: u32 },
    #[error("the workflow spec has no `dag`")]
    NoDag,
    #[error("`dag` must be a mapping of node: [next nodes]")]
    DagNotMapping,
    /// The name shortened to [`MAX_NODE_NAME`] characters.
    #[error("invalid node name {0:?}: it must start with a letter, digit or '_', hold only letters, digits, '_', '-' and '.', and be at most {MAX_NODE_NAME} characters")]
    NodeName(String),
    #[error("the DAG has more than {MAX_NODES} nodes")]
    TooManyNodes,
    #[error("node {0} is not in `models`, so it is a function of the workflow handler, but the archive names no handler")]
    NoHandler(String),
    #[error("node {0} is not in `models`, so it is a function of the workflow handler, and {0:?} is not a Python function name")]
    NotPython(String),
    #[error("dag: {0} must be a list of node names")]
    NotList(String),
    #[error("Self loop exception: {0}")]
    SelfLoop(String),
    #[error("DAG should have only one start node, it has {0}")]
    Starts(usize),
    #[error("Not a valid DAG: it has a cycle")]
    Cycle,
}

/// `WAR-INF/MANIFEST.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarManifest {
    pub created_on: Option<String>,
    pub archiver_version: Option<String>,
    pub workflow: Option<WarWorkflow>,
}

/// The manifest's `workflow` object.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarWorkflow {
    pub workflow_name: Option<String>,
    pub spec_file: Option<String>,
    pub handler: Option<String>,
}

impl WarManifest {
    /// Parses and checks the fields TorchServe's WorkflowArchive.validate requires.
    pub fn parse(text: &str) -> Result<WarManifest, ManifestError> {
        let m: WarManifest = serde_json::from_str(text).map_err(ManifestError::Json)?;
        let Some(w) = &m.workflow else {
            return Err(ManifestError::NoWorkflow);
        };
        if w.workflow_name.as_deref().unwrap_or("").is_empty() {
            return Err(ManifestError::NoName);
        }
        if m.archiver_version.is_none() {
            return Err(ManifestError::NoVersion);
        }
        if m.created_on.is_none() {
            return Err(ManifestError::NoCreatedOn);
        }
        if w.spec_file.as_deref().unwrap_or("").is_empty() {
            return Err(ManifestError::NoSpecFile);
        }
        Ok(m)
    }
}

/// Worker and retry settings of one model node (or the workflow's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub min_workers: u32,
    pub max_workers: u32,
    pub batch_size: u32,
    pub max_batch_delay_ms: u32,
    pub retry_attempts: u32,
    pub timeout_ms: u32,
}

impl Default for Settings {
    /// TorchServe's defaults (WorkFlow.java).
    fn default() -> Settings {
        Settings {
            min_workers: 1,
            max_workers: 1,
            batch_size: 1,
            max_batch_delay_ms: 50,
            retry_attempts: 1,
            timeout_ms: 10_000,
        }
    }
}

impl Settings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }

    /// Applies the known keys of a YAML map; unknown keys are left to the caller.
    fn apply(&mut self, key: &str, value: &Value, at: &str) -> Result<bool, SpecError> {
        let slot = match key {
            "min-workers" => &mut self.min_workers,
            "max-workers" => &mut self.max_workers,
            "batch-size" => &mut self.batch_size,
            "max-batch-delay" => &mut self.max_batch_delay_ms,
            "retry-attempts" => &mut self.retry_attempts,
            "timeout-ms" => &mut self.timeout_ms,
            _ => return Ok(false),
        };
        *slot = value
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| SpecError::NotCount {
                at: at.to_string(),
                key: key.to_string(),
                value: value.clone(),
            })?;
        Ok(true)
    }
}

/// What a node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A model archive (`url` as the spec gives it: a file of the model store or a URL).
    Model { url: String },
    /// A function of the workflow's handler file.
    Function,
}

/// One node of the DAG.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub settings: Settings,
    /// Indexes of the nodes this one feeds.
    pub children: Vec<usize>,
    /// Indexes of the nodes feeding this one.
    pub parents: Vec<usize>,
}

/// A parsed, validated workflow spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The workflow-level settings (describe shows them).
    pub defaults: Settings,
    /// In the order the `dag` names them.
    pub nodes: Vec<Node>,
    pub start: usize,
    /// The `dag` as TorchServe's describe prints it (Java's Map.toString): `{a=[b, c]}`.
    pub dag_text: String,
}

fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        && name.len() <= MAX_NODE_NAME
}

fn python_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn as_name(v: &Value, what: &str) -> Result<String, SpecError> {
    match v {
        Value::String(s) => Ok(s.trim().to_string()),
        // YAML reads `1` or `true` as numbers and booleans; TorchServe's names are strings.
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(SpecError::NotName {
            what: what.to_string(),
            value: other.clone(),
        }),
    }
}

/// Parses the spec YAML. `has_handler`: whether the archive names a handler file (function
/// nodes need one).
pub fn parse(text: &str, has_handler: bool) -> Result<Spec, SpecError> {
    let root: Value = serde_yaml::from_str(text).map_err(SpecError::Yaml)?;
    let root = root.as_mapping().ok_or(SpecError::NotMapping)?;
    let mut defaults = Settings::default();
    // Model entries in spec order, resolved against the defaults once all are read (TorchServe
    // applies the defaults read so far; a spec lists them first in practice, and applying all of
    // them does not depend on key order).
    let mut raw_models: Vec<(String, &serde_yaml::Mapping)> = Vec::new();
    if let Some(models) = root.get("models") {
        let models = match models {
            Value::Null => None,
            Value::Mapping(m) => Some(m),
            _ => return Err(SpecError::ModelsNotMapping),
        };
        for (k, v) in models.into_iter().flatten() {
            let key = as_name(k, "a key of `models`")?;
            if defaults.apply(&key, v, "models: ")? {
                continue;
            }
            let m = v
                .as_mapping()
                .ok_or_else(|| SpecError::ModelNotMapping(key.clone()))?;
            raw_models.push((key, m));
        }
    }
    let mut models: HashMap<String, (String, Settings)> = HashMap::new();
    for (name, m) in raw_models {
        let mut settings = defaults;
        let mut url = None;
        for (k, v) in m {
            let key = as_name(k, "a model setting")?;
            if key == "url" {
                url = Some(
                    v.as_str()
                        .filter(|u| !u.is_empty())
                        .ok_or_else(|| SpecError::EmptyUrl(name.clone()))?,
                );
            } else if !settings.apply(&key, v, &format!("models: {name}: "))? {
                return Err(SpecError::UnknownSetting { model: name, key });
            }
        }
        let url = url.ok_or_else(|| SpecError::NoUrl(name.clone()))?;
        if settings.min_workers > settings.max_workers {
            return Err(SpecError::MinAboveMax {
                model: name,
                min: settings.min_workers,
                max: settings.max_workers,
            });
        }
        models.insert(name, (url.to_string(), settings));
    }

    let dag = match root.get("dag") {
        Some(Value::Mapping(m)) if !m.is_empty() => m,
        Some(Value::Mapping(_)) | None | Some(Value::Null) => return Err(SpecError::NoDag),
        Some(_) => return Err(SpecError::DagNotMapping),
    };
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut dag_text = Vec::new();
    let mut node_of = |name: &str, nodes: &mut Vec<Node>| -> Result<usize, SpecError> {
        if let Some(&i) = index.get(name) {
            return Ok(i);
        }
        if !valid_node_name(name) {
            let shown: String = name.chars().take(MAX_NODE_NAME).collect();
            return Err(SpecError::NodeName(shown));
        }
        if nodes.len() == MAX_NODES {
            return Err(SpecError::TooManyNodes);
        }
        let (kind, settings) = match models.get(name) {
            Some((url, s)) => (Kind::Model { url: url.clone() }, *s),
            None => {
                if !has_handler {
                    return Err(SpecError::NoHandler(name.to_string()));
                }
                if !python_identifier(name) {
                    return Err(SpecError::NotPython(name.to_string()));
                }
                // TorchServe's function nodes: 1 worker, batch 1, no delay; the workflow's
                // retries and timeout.
                let s = Settings {
                    min_workers: 1,
                    max_workers: 1,
                    batch_size: 1,
                    max_batch_delay_ms: 0,
                    ..defaults
                };
                (Kind::Function, s)
            }
        };
        nodes.push(Node {
            name: name.to_string(),
            kind,
            settings,
            children: Vec::new(),
            parents: Vec::new(),
        });
        index.insert(name.to_string(), nodes.len() - 1);
        Ok(nodes.len() - 1)
    };
    for (k, v) in dag {
        let from_name = as_name(k, "a node of `dag`")?;
        let from = node_of(&from_name, &mut nodes)?;
        let targets: Vec<&Value> = match v {
            Value::Null => Vec::new(),
            Value::Sequence(s) => s.iter().collect(),
            _ => return Err(SpecError::NotList(from_name)),
        };
        let mut shown = Vec::new();
        for t in targets {
            let to_name = as_name(t, &format!("an entry of dag: {from_name}"))?;
            shown.push(to_name.clone());
            if to_name.is_empty() {
                continue;
            }
            if to_name == from_name {
                return Err(SpecError::SelfLoop(from_name));
            }
            let to = node_of(&to_name, &mut nodes)?;
            if !nodes[from].children.contains(&to) {
                nodes[from].children.push(to);
                nodes[to].parents.push(from);
            }
        }
        dag_text.push(format!("{from_name}=[{}]", shown.join(", ")));
    }
    let starts: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].parents.is_empty())
        .collect();
    if starts.len() != 1 {
        return Err(SpecError::Starts(starts.len()));
    }
    // Kahn's algorithm: every node is reached exactly when the graph has no cycle.
    let mut indegree: Vec<usize> = nodes.iter().map(|n| n.parents.len()).collect();
    let mut ready = vec![starts[0]];
    let mut seen = 0;
    while let Some(i) = ready.pop() {
        seen += 1;
        for &c in &nodes[i].children {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    if seen != nodes.len() {
        return Err(SpecError::Cycle);
    }
    Ok(Spec {
        defaults,
        nodes,
        start: starts[0],
        dag_text: format!("{{{}}}", dag_text.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE: &str = "models:\n    min-workers: 1\n    max-workers: 1\n    batch-size: 1\n    max-batch-delay: 50\n    retry-attempts: 1\n    timeout-ms: 300000\n\n    densenet:\n      url: wf_densenet.mar\n\ndag:\n  pre_processing: [densenet]\n";

    #[test]
    fn the_suite_spec_is_a_function_then_a_model() {
        let s = parse(SUITE, true).unwrap();
        assert_eq!(s.dag_text, "{pre_processing=[densenet]}");
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nodes[s.start].name, "pre_processing");
        assert_eq!(s.nodes[s.start].kind, Kind::Function);
        assert_eq!(s.nodes[s.start].settings.max_batch_delay_ms, 0);
        assert_eq!(s.nodes[s.start].settings.timeout_ms, 300_000);
        assert_eq!(
            s.nodes[1].kind,
            Kind::Model {
                url: "wf_densenet.mar".into()
            }
        );
        assert_eq!(s.nodes[1].settings.max_batch_delay_ms, 50);
        assert_eq!(s.nodes[1].parents, vec![0]);
    }

    #[test]
    fn parallel_branches_join() {
        let s = parse(
            "models:\n  a: {url: a.mar, batch-size: 4}\n  b: {url: b.mar}\ndag:\n  pre: [a, b]\n  a: [post]\n  b: [post]\n",
            true,
        )
        .unwrap();
        assert_eq!(s.dag_text, "{pre=[a, b], a=[post], b=[post]}");
        let post = s.nodes.iter().position(|n| n.name == "post").unwrap();
        assert_eq!(s.nodes[post].parents.len(), 2);
        assert_eq!(s.nodes[1].settings.batch_size, 4);
    }

    #[test]
    fn cycles_self_loops_and_two_starts_are_refused() {
        for (spec, want) in [
            ("dag:\n  a: [b]\n  b: [a]\n", "start node"),
            ("dag:\n  s: [a]\n  a: [b]\n  b: [a]\n", "cycle"),
            ("dag:\n  a: [a]\n", "Self loop"),
            ("dag:\n  a: [c]\n  b: [c]\n", "only one start node"),
            ("models: {}\n", "no `dag`"),
            ("dag: [a, b]\n", "mapping"),
            (
                "models:\n  batch-size: \"4\"\ndag:\n  a: []\n",
                "batch-size",
            ),
            (
                "models:\n  m: {url: m.mar, min-workers: 3}\ndag:\n  m: []\n",
                "min-workers",
            ),
            (
                "models:\n  m: {url: m.mar, wat: 1}\ndag:\n  m: []\n",
                "unknown setting",
            ),
            ("models:\n  m: {}\ndag:\n  m: []\n", "no url"),
            ("dag:\n  \"../x\": []\n", "invalid node name"),
            ("dag:\n  not-python: []\n", "Python function name"),
            ("{{{", "Failed to parse yaml"),
        ] {
            let e = parse(spec, true).unwrap_err().to_string();
            assert!(e.contains(want), "{spec:?}: {e}");
        }
        let e = parse("dag:\n  f: []\n", false).unwrap_err().to_string();
        assert!(e.contains("names no handler"), "{e}");
    }

    #[test]
    fn the_node_count_is_bounded() {
        let chain: Vec<String> = (0..MAX_NODES)
            .map(|i| format!("  n{i}: [n{}]\n", i + 1))
            .collect();
        let e = parse(&format!("dag:\n{}", chain.concat()), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 64 nodes"), "{e}");
        let ok: Vec<String> = (0..MAX_NODES - 1)
            .map(|i| format!("  n{i}: [n{}]\n", i + 1))
            .collect();
        assert_eq!(
            parse(&format!("dag:\n{}", ok.concat()), true)
                .unwrap()
                .nodes
                .len(),
            MAX_NODES
        );
    }

    #[test]
    fn the_manifest_needs_torchserves_fields() {
        let ok = r#"{"createdOn": "x", "archiverVersion": "0.2.15", "workflow": {"workflowName": "w", "specFile": "s.yaml", "handler": "h.py"}}"#;
        assert!(WarManifest::parse(ok).is_ok());
        for (text, want) in [
            (
                r#"{"createdOn": "x", "archiverVersion": "1"}"#,
                "Missing Workflow",
            ),
            (
                r#"{"createdOn": "x", "archiverVersion": "1", "workflow": {"specFile": "s"}}"#,
                "name is not defined",
            ),
            (
                r#"{"archiverVersion": "1", "workflow": {"workflowName": "w", "specFile": "s"}}"#,
                "createdOn",
            ),
            (
                r#"{"createdOn": "x", "workflow": {"workflowName": "w", "specFile": "s"}}"#,
                "version",
            ),
            (
                r#"{"createdOn": "x", "archiverVersion": "1", "workflow": {"workflowName": "w"}}"#,
                "spec file",
            ),
            ("[", "not valid"),
        ] {
            let e = WarManifest::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
