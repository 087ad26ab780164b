//! The shipped Prometheus configuration and alert rules pass promtool, and the alert unit tests
//! (which make each alert fire and clear on synthetic series) pass.

use std::process::Command;

fn promtool(args: &[&str]) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(format!("{root}/deploy/prometheus"))
        .output()
        .expect("promtool is installed (apt-get install prometheus; .ci/run does it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_config_is_valid() {
    promtool(&["check", "config", "prometheus.yml"]);
}

#[test]
fn alert_rules_are_valid() {
    promtool(&["check", "rules", "rules/oxserve-alerts.yml"]);
}

#[test]
fn alert_rule_unit_tests_pass() {
    promtool(&["test", "rules", "rules/tests/oxserve-alerts.test.yml"]);
}
