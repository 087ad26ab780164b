//! Consistency of the deployment assets under `deploy/`: every YAML and JSON file parses, the
//! Kubernetes objects agree with each other and with oxserve's default ports, every Grafana panel
//! has a query, and Prometheus scrapes the metrics port.
//!
//! Uses only std, serde_yaml and serde_json (plus the `serde::Deserialize` trait both are built
//! on), nothing from the oxserve crate.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

const INFERENCE_PORT: u64 = 8080;
const MANAGEMENT_PORT: u64 = 8081;
const METRICS_PORT: u64 = 8082;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Files under `dir` (recursively) whose name ends with one of `exts`, sorted.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if exts.iter().any(|ext| name.ends_with(ext)) {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every non-empty document of a (multi-document) YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = <Value as serde::Deserialize>::deserialize(document)
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

fn json_doc(path: &Path) -> Value {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()))
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("missing string at {pointer} in {v}"))
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("missing array at {pointer} in {v}"))
}

fn labels_at(v: &Value, pointer: &str) -> BTreeMap<String, String> {
    v.pointer(pointer)
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("missing map at {pointer} in {v}"))
        .iter()
        .map(|(k, val)| (k.clone(), val.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// `selector` is a non-empty subset of `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A config.properties as the server reads it (its own parser), checked to be a configuration the
/// server accepts.
fn properties(text: &str) -> HashMap<String, String> {
    let props = oxserve::config::parse_properties(text)
        .unwrap_or_else(|e| panic!("config.properties does not parse: {e}"));
    if let Err(e) = oxserve::config::Config::from_sources(props.clone(), &[], &Default::default()) {
        panic!("the server refuses this config.properties: {e}");
    }
    props
}

/// Host and port of `http://host:port` (trailing slash allowed).
fn host_port(address: &str) -> (String, u64) {
    let rest = address
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(address)
        .trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("address {address:?} has no port"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("address {address:?} has a bad port"));
    (host.to_string(), port)
}

/// The Kubernetes objects of deploy/kubernetes, by kind.
struct Cluster {
    objects: Vec<(PathBuf, Value)>,
}

impl Cluster {
    fn load() -> Cluster {
        let mut objects = Vec::new();
        for path in files(&deploy_dir().join("kubernetes"), &[".yaml", ".yml"]) {
            for doc in yaml_docs(&path) {
                if doc.get("kind").is_some() && doc.get("apiVersion").is_some() {
                    objects.push((path.clone(), doc));
                }
            }
        }
        Cluster { objects }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(_, o)| o["kind"] == kind)
            .map(|(_, o)| o)
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {kind} under deploy/kubernetes"
        );
        found[0]
    }
}

/// Container port numbers by port name of the first container.
fn container_ports(deployment: &Value) -> BTreeMap<String, u64> {
    let container = &array_at(deployment, "/spec/template/spec/containers")[0];
    array_at(container, "/ports")
        .iter()
        .map(|p| {
            (
                str_at(p, "/name").to_string(),
                p["containerPort"]
                    .as_u64()
                    .expect("containerPort is a number"),
            )
        })
        .collect()
}

/// Resolves a port given by name or number against the container ports.
fn resolve_port(port: &Value, ports: &BTreeMap<String, u64>) -> Option<u64> {
    match port {
        Value::String(name) => ports.get(name).copied(),
        Value::Number(n) => n.as_u64().filter(|n| ports.values().any(|p| p == n)),
        _ => None,
    }
}

#[test]
fn every_deploy_file_parses() {
    let dir = deploy_dir();
    let yaml = files(&dir, &[".yaml", ".yml"]);
    let json = files(&dir, &[".json"]);
    assert!(
        yaml.len() >= 10,
        "too few YAML files under {}",
        dir.display()
    );
    assert!(!json.is_empty(), "no JSON files under {}", dir.display());
    for path in &yaml {
        assert!(!yaml_docs(path).is_empty(), "{} is empty", path.display());
    }
    for path in &json {
        json_doc(path);
    }
}

#[test]
fn deployment_uses_oxserve_default_ports_and_probes() {
    let cluster = Cluster::load();
    let deployment = cluster.one("Deployment");
    let ports = container_ports(deployment);
    assert_eq!(ports.get("inference"), Some(&INFERENCE_PORT));
    assert_eq!(ports.get("management"), Some(&MANAGEMENT_PORT));
    assert_eq!(ports.get("metrics"), Some(&METRICS_PORT));

    let container = &array_at(deployment, "/spec/template/spec/containers")[0];
    assert_eq!(str_at(container, "/image"), "oxserve:latest");
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(str_at(readiness, "/path"), "/ping");
    assert_eq!(
        resolve_port(&readiness["port"], &ports),
        Some(INFERENCE_PORT),
        "readiness probe must use the inference port"
    );
    assert!(container.get("livenessProbe").is_some(), "no livenessProbe");

    let selector = labels_at(deployment, "/spec/selector/matchLabels");
    let pod_labels = labels_at(deployment, "/spec/template/metadata/labels");
    assert!(
        selects(&selector, &pod_labels),
        "Deployment selector does not match its pods"
    );
    assert_eq!(
        pod_labels.get("app.kubernetes.io/name").map(String::as_str),
        Some("oxserve")
    );

    let annotations = labels_at(deployment, "/spec/template/metadata/annotations");
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some(METRICS_PORT.to_string().as_str())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
}

#[test]
fn configmap_matches_deployment() {
    let cluster = Cluster::load();
    let deployment = cluster.one("Deployment");
    let ports = container_ports(deployment);
    let with_config: Vec<&Value> = cluster
        .all("ConfigMap")
        .into_iter()
        .filter(|c| c.pointer("/data/config.properties").is_some())
        .collect();
    assert_eq!(
        with_config.len(),
        1,
        "expected one ConfigMap with config.properties"
    );
    let configmap = with_config[0];
    let props = properties(str_at(configmap, "/data/config.properties"));
    for (key, name) in [
        ("inference_address", "inference"),
        ("management_address", "management"),
        ("metrics_address", "metrics"),
    ] {
        let address = props
            .get(key)
            .unwrap_or_else(|| panic!("config.properties lacks {key}"));
        let (host, port) = host_port(address);
        assert_eq!(
            host, "0.0.0.0",
            "{key} must listen on all interfaces in a pod"
        );
        assert_eq!(
            Some(&port),
            ports.get(name),
            "{key} port differs from container port {name}"
        );
    }
    assert_eq!(
        props.get("metrics_mode").map(String::as_str),
        Some("prometheus")
    );
    // gRPC listeners: all interfaces, TorchServe's default ports as container ports.
    for (key, name, port) in [
        ("grpc_inference_address", "grpc-inference", 7070),
        ("grpc_management_address", "grpc-management", 7071),
    ] {
        assert_eq!(props.get(key).map(String::as_str), Some("0.0.0.0"), "{key}");
        assert_eq!(ports.get(name), Some(&port), "container port {name}");
    }

    // The Deployment mounts this ConfigMap at /etc/oxserve and starts with its config.properties.
    let name = str_at(configmap, "/metadata/name");
    let volumes = array_at(deployment, "/spec/template/spec/volumes");
    let volume = volumes
        .iter()
        .find(|v| v.pointer("/configMap/name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no volume refers to ConfigMap {name}"));
    let container = &array_at(deployment, "/spec/template/spec/containers")[0];
    let mounted = array_at(container, "/volumeMounts")
        .iter()
        .any(|m| m["name"] == volume["name"] && m["mountPath"].as_str() == Some("/etc/oxserve"));
    assert!(mounted, "ConfigMap {name} is not mounted at /etc/oxserve");
    let args: Vec<&str> = array_at(container, "/args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--ts-config")
        .expect("container args lack --ts-config");
    assert_eq!(
        args.get(at + 1).copied(),
        Some("/etc/oxserve/config.properties")
    );
}

#[test]
fn service_and_servicemonitor_match_deployment() {
    let cluster = Cluster::load();
    let deployment = cluster.one("Deployment");
    let ports = container_ports(deployment);
    let pod_labels = labels_at(deployment, "/spec/template/metadata/labels");

    let service = cluster.one("Service");
    let selector = labels_at(service, "/spec/selector");
    assert_eq!(
        selector.get("app.kubernetes.io/name").map(String::as_str),
        Some("oxserve")
    );
    assert!(
        selects(&selector, &pod_labels),
        "Service selector does not match the pods"
    );
    let mut service_ports = BTreeMap::new();
    for p in array_at(service, "/spec/ports") {
        let name = str_at(p, "/name");
        let target = p.get("targetPort").unwrap_or(&p["port"]);
        assert_eq!(
            resolve_port(target, &ports),
            ports.get(name).copied(),
            "Service port {name} does not reach container port {name}"
        );
        assert_eq!(
            p["port"].as_u64(),
            ports.get(name).copied(),
            "Service port {name}"
        );
        service_ports.insert(name.to_string(), p["port"].as_u64());
    }
    for name in ["inference", "metrics"] {
        assert!(
            service_ports.contains_key(name),
            "Service lacks port {name}"
        );
    }

    let monitor = cluster.one("ServiceMonitor");
    assert_eq!(str_at(monitor, "/apiVersion"), "monitoring.coreos.com/v1");
    let service_labels = labels_at(service, "/metadata/labels");
    assert!(
        selects(
            &labels_at(monitor, "/spec/selector/matchLabels"),
            &service_labels
        ),
        "ServiceMonitor selector does not match the Service's labels"
    );
    let endpoints = array_at(monitor, "/spec/endpoints");
    assert!(!endpoints.is_empty());
    for e in endpoints {
        let port = str_at(e, "/port");
        assert!(
            service_ports.contains_key(port),
            "ServiceMonitor port {port} not on the Service"
        );
        assert_eq!(port, "metrics");
        if let Some(path) = e.get("path") {
            assert_eq!(path, "/metrics");
        }
    }
}

#[test]
fn autoscalers_target_the_deployment() {
    let cluster = Cluster::load();
    let deployment_name = str_at(cluster.one("Deployment"), "/metadata/name").to_string();

    let scaled = cluster.one("ScaledObject");
    assert_eq!(str_at(scaled, "/spec/scaleTargetRef/name"), deployment_name);
    if let Some(kind) = scaled.pointer("/spec/scaleTargetRef/kind") {
        assert_eq!(kind, "Deployment");
    }
    let min = scaled
        .pointer("/spec/minReplicaCount")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let max = scaled
        .pointer("/spec/maxReplicaCount")
        .and_then(Value::as_u64)
        .unwrap_or(100);
    assert!(min <= max && max > 0, "bad replica bounds {min}..{max}");
    let triggers = array_at(scaled, "/spec/triggers");
    assert!(!triggers.is_empty());
    for t in triggers {
        assert_eq!(str_at(t, "/type"), "prometheus");
        let query = str_at(t, "/metadata/query");
        assert!(
            query.contains("oxserve_queue_depth") || query.contains("ts_inference_requests_total"),
            "unexpected KEDA query {query}"
        );
        assert!(str_at(t, "/metadata/threshold").parse::<f64>().is_ok());
        assert!(str_at(t, "/metadata/serverAddress").starts_with("http"));
    }

    for hpa in cluster.all("HorizontalPodAutoscaler") {
        assert_eq!(str_at(hpa, "/apiVersion"), "autoscaling/v2");
        assert_eq!(str_at(hpa, "/spec/scaleTargetRef/name"), deployment_name);
        assert_eq!(str_at(hpa, "/spec/scaleTargetRef/kind"), "Deployment");
        for m in array_at(hpa, "/spec/metrics") {
            assert_eq!(str_at(m, "/type"), "Pods");
        }
    }
}

#[test]
fn kustomization_lists_existing_resources() {
    let dir = deploy_dir().join("kubernetes");
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    let resources: Vec<&str> = array_at(kustomization, "/resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in &resources {
        assert!(
            dir.join(r).is_file(),
            "kustomization lists missing file {r}"
        );
    }
    for needed in [
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "servicemonitor.yaml",
        "keda-scaledobject.yaml",
    ] {
        assert!(resources.contains(&needed), "kustomization lacks {needed}");
    }
}

#[test]
fn docker_image_config_uses_default_ports() {
    let docker = deploy_dir().join("docker");
    let props = properties(&read(&docker.join("config.properties")));
    for (key, port) in [
        ("inference_address", INFERENCE_PORT),
        ("management_address", MANAGEMENT_PORT),
        ("metrics_address", METRICS_PORT),
    ] {
        let address = props
            .get(key)
            .unwrap_or_else(|| panic!("image config lacks {key}"));
        assert_eq!(host_port(address), ("0.0.0.0".to_string(), port), "{key}");
    }
    let dockerfile = read(&docker.join("Dockerfile"));
    assert!(dockerfile
        .lines()
        .any(|l| l.trim() == "EXPOSE 8080 8081 8082 7070 7071"));
    // gRPC listeners (default ports 7070/7071) on all interfaces too.
    for key in ["grpc_inference_address", "grpc_management_address"] {
        assert_eq!(props.get(key).map(String::as_str), Some("0.0.0.0"), "{key}");
    }
}

#[test]
fn prometheus_scrapes_the_metrics_port_and_loads_rules() {
    let dir = deploy_dir().join("prometheus");
    let config = &yaml_docs(&dir.join("prometheus.yml"))[0];
    let jobs = array_at(config, "/scrape_configs");
    let oxserve = jobs
        .iter()
        .find(|j| j["job_name"] == "oxserve")
        .expect("no scrape job named oxserve");
    let targets: Vec<&str> = array_at(oxserve, "/static_configs")
        .iter()
        .flat_map(|s| array_at(s, "/targets").iter().filter_map(Value::as_str))
        .collect();
    assert!(!targets.is_empty(), "job oxserve has no targets");
    for t in &targets {
        assert_eq!(
            host_port(t).1,
            METRICS_PORT,
            "target {t} is not the metrics port"
        );
    }
    assert!(jobs.iter().any(|j| j["job_name"] == "prometheus"));
    let rule_files: Vec<&str> = array_at(config, "/rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        rule_files.contains(&"rules/*.yml"),
        "rule_files: {rule_files:?}"
    );

    let mut alerts = Vec::new();
    for path in files(&dir.join("rules"), &[".yml"]) {
        if path.parent() != Some(dir.join("rules").as_path()) {
            continue; // rules/tests/: promtool unit tests, not rules
        }
        for group in array_at(&yaml_docs(&path)[0], "/groups") {
            for rule in array_at(group, "/rules") {
                assert!(!str_at(rule, "/expr").trim().is_empty());
                if let Some(name) = rule.get("alert").and_then(Value::as_str) {
                    assert!(
                        rule.pointer("/labels/severity")
                            .and_then(Value::as_str)
                            .is_some(),
                        "alert {name} has no severity"
                    );
                    assert!(
                        rule.pointer("/annotations/summary").is_some(),
                        "alert {name}"
                    );
                    alerts.push(name.to_string());
                }
            }
        }
    }
    for name in [
        "OxserveModelHighErrorRate",
        "OxserveModelHighP99Latency",
        "OxserveQueueNearCapacity",
        "OxserveWorkersBelowMinimum",
        "OxserveTargetDown",
    ] {
        assert!(alerts.iter().any(|a| a == name), "missing alert {name}");
    }
}

/// Every panel (rows excepted, nested panels included).
fn panels(list: &[Value], out: &mut Vec<Value>) {
    for p in list {
        if p["type"] != "row" {
            out.push(p.clone());
        }
        if let Some(nested) = p.get("panels").and_then(Value::as_array) {
            panels(nested, out);
        }
    }
}

/// Names used as `$name` / `${name}` / `${name:fmt}` in an expression.
fn variables_used(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let body = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

#[test]
fn grafana_dashboards_have_a_query_in_every_panel() {
    let grafana = deploy_dir().join("grafana");
    let dashboards = files(&grafana.join("dashboards"), &[".json"]);
    assert!(!dashboards.is_empty(), "no dashboards");
    let builtin = [
        "__rate_interval",
        "__interval",
        "__range",
        "__interval_ms",
        "__range_s",
    ];
    for path in &dashboards {
        let d = json_doc(path);
        let where_ = path.display();
        assert!(!str_at(&d, "/uid").is_empty(), "{where_}: no uid");
        assert!(!str_at(&d, "/title").is_empty(), "{where_}: no title");
        assert!(
            d["schemaVersion"].as_u64().unwrap_or(0) >= 36,
            "{where_}: old schemaVersion"
        );
        let vars: Vec<String> = d
            .pointer("/templating/list")
            .and_then(Value::as_array)
            .map(|l| l.iter().map(|v| str_at(v, "/name").to_string()).collect())
            .unwrap_or_default();
        assert!(
            vars.iter().any(|v| v == "instance"),
            "{where_}: no $instance variable"
        );

        let mut all = Vec::new();
        panels(array_at(&d, "/panels"), &mut all);
        assert!(!all.is_empty(), "{where_}: no panels");
        for p in &all {
            let title = p["title"].as_str().unwrap_or("?");
            if let Some(uid) = p.pointer("/datasource/uid") {
                assert_eq!(uid, "prometheus", "{where_}: panel {title}");
            }
            let exprs: Vec<&str> = p
                .get("targets")
                .and_then(Value::as_array)
                .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
                .unwrap_or_default();
            assert!(
                exprs.iter().any(|e| !e.trim().is_empty()),
                "{where_}: panel {title:?} has no target with an expr"
            );
            for e in exprs {
                for v in variables_used(e) {
                    assert!(
                        vars.contains(&v) || builtin.contains(&v.as_str()),
                        "{where_}: panel {title:?} uses undefined variable ${v}"
                    );
                }
                if e.contains("model_name") || e.contains("ModelName") {
                    assert!(
                        e.contains("$model"),
                        "{where_}: panel {title:?} ignores $model: {e}"
                    );
                }
                assert!(
                    e.contains("$instance"),
                    "{where_}: panel {title:?} ignores $instance: {e}"
                );
            }
        }
    }

    let datasource = &yaml_docs(&grafana.join("provisioning/datasources/prometheus.yml"))[0];
    let ds = &array_at(datasource, "/datasources")[0];
    assert_eq!(str_at(ds, "/uid"), "prometheus");
    assert_eq!(str_at(ds, "/type"), "prometheus");
    let provider = &yaml_docs(&grafana.join("provisioning/dashboards/oxserve.yml"))[0];
    let p = &array_at(provider, "/providers")[0];
    assert_eq!(str_at(p, "/type"), "file");
    assert_eq!(str_at(p, "/folder"), "oxserve");
    assert!(!str_at(p, "/options/path").is_empty());
}

#[test]
fn kserve_runtime_and_inference_service_fit_together() {
    let cluster = Cluster::load();
    let runtime = cluster.one("ServingRuntime");
    let service = cluster.one("InferenceService");
    let deployment = cluster.one("Deployment");
    assert_eq!(str_at(runtime, "/apiVersion"), "serving.kserve.io/v1alpha1");
    assert_eq!(str_at(service, "/apiVersion"), "serving.kserve.io/v1beta1");
    // The InferenceService names the runtime, a format it supports and a protocol it speaks.
    let model = &service["spec"]["predictor"]["model"];
    assert_eq!(str_at(model, "/runtime"), str_at(runtime, "/metadata/name"));
    let format = str_at(model, "/modelFormat/name");
    assert!(
        array_at(runtime, "/spec/supportedModelFormats")
            .iter()
            .any(|f| f["name"] == format),
        "the runtime does not support model format {format}"
    );
    let protocol = str_at(model, "/protocolVersion");
    let protocols: Vec<&str> = array_at(runtime, "/spec/protocolVersions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        protocols.contains(&protocol),
        "{protocol} not in {protocols:?}"
    );
    assert!(protocols.contains(&"v1") && protocols.contains(&"v2"));
    // KServe sends traffic to the runtime's first container port: oxserve's inference port,
    // which the readiness probe (TorchServe's /ping) asks too.
    let container = &array_at(runtime, "/spec/containers")[0];
    assert_eq!(str_at(container, "/name"), "kserve-container");
    let port = array_at(container, "/ports")[0]["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(Some(&port), container_ports(deployment).get("inference"));
    assert_eq!(str_at(container, "/readinessProbe/httpGet/path"), "/ping");
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"].as_u64(),
        Some(port)
    );
    // Same image and the same start-up flags as the plain Deployment, on KServe's paths.
    let plain = &array_at(deployment, "/spec/template/spec/containers")[0];
    assert_eq!(str_at(container, "/image"), str_at(plain, "/image"));
    let args: Vec<&str> = array_at(container, "/args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "--ts-config",
            "/mnt/models/config/config.properties",
            "--model-store",
            "/mnt/models/model-store"
        ]
    );
    // The metrics port KServe's aggregation scrapes is oxserve's metrics port.
    let metrics_port: u64 = str_at(runtime, "/spec/annotations/prometheus.kserve.io~1port")
        .parse()
        .unwrap();
    assert_eq!(
        Some(&metrics_port),
        container_ports(deployment).get("metrics")
    );
    // Needs KServe's CRDs: not part of the plain kustomization.
    let kustomization = read(&deploy_dir().join("kubernetes/kustomization.yaml"));
    assert!(!kustomization.contains("kserve/"));
}

#[test]
fn committed_dashboards_are_what_the_generator_writes() {
    let fresh = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("python3")
        .arg(deploy_dir().join("tools/gen_dashboards.py"))
        .arg("--out")
        .arg(fresh.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed = deploy_dir().join("grafana/dashboards");
    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(fresh.path()), names(&committed));
    for name in names(&committed) {
        assert!(
            read(&committed.join(&name)) == read(&fresh.path().join(&name)),
            "deploy/grafana/dashboards/{name} differs from what deploy/tools/gen_dashboards.py \
             writes: edit the generator and rerun it"
        );
    }
}
