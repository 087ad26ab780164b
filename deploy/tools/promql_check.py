#!/usr/bin/env python3
"""Runs every PromQL expression of the shipped dashboards and alert rules against a Prometheus.

Usage:
    promql_check.py [--url http://127.0.0.1:9090] [--dashboards PATH]... [--rules PATH]...
                    [--allow-empty REGEX]... [--retry-for SECONDS] [--json] [--list] [-v]

Python 3.9+ with PyYAML (`pip install pyyaml`; Debian's python3-yaml). By default it reads
deploy/grafana/dashboards/*.json and deploy/prometheus/rules/*.yml (not rules/tests/) next to this
script.

What is checked, one line of output per check:

* Dashboard panels: every `targets[].expr` of every panel (rows and collapsed rows included).
  Grafana variables are substituted first: $model / $instance (also ${model}, ${model:regex},
  [[model]]) -> `.*`, $__rate_interval -> 1m, $__interval -> 15s, $__range -> 5m. Any other
  variable is a failure. The query must succeed and return data (a non-empty vector, or a scalar).
* Dashboard variables: `label_values(SELECTOR, label)` is checked as `count by (label) (SELECTOR)`
  and must return data; `label_values(label)` is not checked; any other query is run as PromQL.
* Recording rules: the expr must succeed and return data.
* Alerting rules: the whole expr must succeed; an empty result is fine (the alert is not firing).
  That each alert can fire at all (its expression without the threshold returns data) needs a
  PromQL parser: tests/dashboards_e2e.rs checks it with the `promql-parser` crate.

Statuses: OK, EMPTY (no data), ERROR (the query failed), ALLOWED (empty, but the expression or
its source matches an --allow-empty regex, e.g. --allow-empty GPU on a machine without GPU).
Exit status: 0 when nothing is EMPTY or ERROR, 1 otherwise, 2 for bad usage or an unreachable
Prometheus. --retry-for N re-runs the failing checks until they pass or N seconds have gone by
(Prometheus needs a couple of scrapes before rate() returns anything).

--list prints every expression (as written, then as queried) and queries nothing.

Rule files are Prometheus' YAML (`groups[].rules[]` with `alert` or `record`, and `expr`), read
with PyYAML.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARDS = DEPLOY / "grafana" / "dashboards"
DEFAULT_RULES = DEPLOY / "prometheus" / "rules"

VARIABLE_VALUES = {
    "model": ".*",
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}


# --------------------------------------------------------------------------------------------
# Checks


@dataclass
class Check:
    source: str  # e.g. "dashboard oxserve-models.json: Throughput per model [A]"
    expr: str  # as written
    query: str  # as sent
    need_data: bool  # False: only validity is checked
    kind: str  # panel | variable | record | alert
    status: str = "PENDING"
    detail: str = ""
    series: int = 0
    extra: dict = field(default_factory=dict)


_VAR_RE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)(?::[\w]+)?\]\]|\$(\w+)")


def substitute(expr: str) -> tuple[str, list[str]]:
    """Replaces Grafana variables; returns the query and the unknown variable names."""
    unknown: list[str] = []

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in VARIABLE_VALUES:
            return VARIABLE_VALUES[name]
        unknown.append(name)
        return m.group(0)

    return _VAR_RE.sub(repl, expr), unknown


def panel_checks(path: pathlib.Path) -> list[Check]:
    checks: list[Check] = []
    try:
        dash = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        c = Check(f"dashboard {path.name}", "", "", True, "panel")
        c.status, c.detail = "ERROR", f"cannot read dashboard: {e}"
        return [c]

    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))

    for p in walk(dash.get("panels")):
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        exprs = [t for t in targets if isinstance(t, dict) and t.get("expr", "").strip()]
        if not exprs:
            c = Check(f"dashboard {path.name}: {p.get('title', '?')}", "", "", True, "panel")
            c.status, c.detail = "ERROR", "panel has no target with an expr"
            checks.append(c)
            continue
        for t in exprs:
            expr = t["expr"]
            query, unknown = substitute(expr)
            c = Check(f"dashboard {path.name}: {p.get('title', '?')} [{t.get('refId', '?')}]",
                      expr, query, True, "panel")
            if unknown:
                c.status, c.detail = "ERROR", f"unknown variable(s): {', '.join(sorted(set(unknown)))}"
            checks.append(c)

    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query", "")
        q = (q or v.get("definition") or "").strip()
        if not q:
            continue
        source = f"dashboard {path.name}: variable ${v.get('name')}"
        m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", q, re.S)
        if m:
            expr = f"count by ({m.group(2)}) ({m.group(1).strip()})"
        elif re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", q):
            continue
        else:
            m = re.fullmatch(r"query_result\((.*)\)", q, re.S)
            expr = m.group(1) if m else q
        query, unknown = substitute(expr)
        c = Check(source, q, query, True, "variable")
        if unknown:
            c.status, c.detail = "ERROR", f"unknown variable(s): {', '.join(sorted(set(unknown)))}"
        checks.append(c)
    return checks


# --------------------------------------------------------------------------------------------
# Rule files


def read_rules(path: pathlib.Path) -> list[tuple[str, str, str]]:
    """Returns (kind, name, expr) with kind 'alert' or 'record'."""
    doc = yaml.safe_load(path.read_text()) or {}
    rules: list[tuple[str, str, str]] = []
    for group in doc.get("groups") or []:
        for rule in group.get("rules") or []:
            kind = "alert" if "alert" in rule else "record" if "record" in rule else None
            if kind is None or not isinstance(rule.get("expr"), str):
                raise ValueError(f"a rule of group {group.get('name')!r} has no alert/record name or no expr")
            rules.append((kind, str(rule[kind]), rule["expr"]))
    return rules


def rule_checks(path: pathlib.Path) -> list[Check]:
    try:
        rules = read_rules(path)
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as e:
        c = Check(f"rules {path.name}", "", "", True, "record")
        c.status, c.detail = "ERROR", f"cannot read rule file: {e}"
        return [c]
    checks = []
    for kind, name, expr in rules:
        if kind == "record":
            checks.append(Check(f"rules {path.name}: record {name}", expr, expr, True, "record"))
            continue
        checks.append(Check(f"rules {path.name}: alert {name}", expr, expr, False, "alert"))
    return checks


# --------------------------------------------------------------------------------------------
# Querying


def query(base: str, q: str, timeout: float) -> tuple[str, int, str]:
    """Returns (status, series count, detail) for one instant query."""
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
        except ValueError:
            return "ERROR", 0, f"HTTP {e.code}"
    if body.get("status") != "success":
        return "ERROR", 0, f"{body.get('errorType', 'error')}: {body.get('error', body)}"
    data = body.get("data", {})
    rtype, result = data.get("resultType"), data.get("result")
    if rtype in ("scalar", "string"):
        return "OK", 1, rtype
    n = len(result or [])
    return ("OK" if n else "EMPTY"), n, rtype


def reachable(base: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/api/v1/status/buildinfo", timeout=timeout) as r:
            r.read()
        return None
    except (urllib.error.URLError, OSError) as e:
        return str(e)


def run(checks: list[Check], base: str, allow: list[re.Pattern], timeout: float) -> None:
    for c in checks:
        if c.status == "ERROR" and not c.query:
            continue
        if c.detail.startswith("unknown variable"):
            continue
        status, n, detail = query(base, c.query, timeout)
        c.series, c.detail = n, detail
        if status == "EMPTY" and not c.need_data:
            status, c.detail = "OK", "valid, no result (not firing)"
        if status == "EMPTY" and any(p.search(c.query) or p.search(c.source) for p in allow):
            status = "ALLOWED"
        c.status = status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:9090", help="Prometheus base URL")
    ap.add_argument("--dashboards", action="append", type=pathlib.Path,
                    help=f"dashboard JSON file or folder (default {DEFAULT_DASHBOARDS})")
    ap.add_argument("--rules", action="append", type=pathlib.Path,
                    help=f"rule file or folder of *.yml/*.yaml (default {DEFAULT_RULES})")
    ap.add_argument("--allow-empty", action="append", default=[], metavar="REGEX",
                    help="accept an empty result when the query or its source matches")
    ap.add_argument("--retry-for", type=float, default=0, metavar="SECONDS",
                    help="retry failing checks for this long")
    ap.add_argument("--timeout", type=float, default=10, help="seconds per query")
    ap.add_argument("--list", action="store_true", help="print the expressions, query nothing")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the query of every check")
    args = ap.parse_args(argv)

    def files(paths, default, patterns):
        out = []
        for p in paths or [default]:
            if p.is_dir():
                out += sorted(f for pat in patterns for f in p.glob(pat))
            elif p.exists():
                out.append(p)
            else:
                ap.error(f"{p} does not exist")
        return out

    checks: list[Check] = []
    for f in files(args.dashboards, DEFAULT_DASHBOARDS, ["*.json"]):
        checks += panel_checks(f)
    for f in files(args.rules, DEFAULT_RULES, ["*.yml", "*.yaml"]):
        checks += rule_checks(f)
    if not checks:
        ap.error("no dashboards or rules found")

    if args.list:
        if args.json:
            print(json.dumps([{"source": c.source, "kind": c.kind, "expr": c.expr, "query": c.query,
                               "need_data": c.need_data} for c in checks], indent=2))
        else:
            for c in checks:
                print(f"# {c.source}")
                print(c.expr)
                if c.query != c.expr:
                    print(f"# queried as:\n{c.query}")
                print()
        return 0

    err = reachable(args.url, args.timeout)
    if err:
        print(f"promql_check: cannot reach Prometheus at {args.url}: {err}", file=sys.stderr)
        return 2
    allow = [re.compile(a) for a in args.allow_empty]
    deadline = time.monotonic() + args.retry_for
    pending = checks
    while True:
        run(pending, args.url, allow, args.timeout)
        pending = [c for c in checks if c.status in ("EMPTY", "ERROR") and c.query
                   and not c.detail.startswith("unknown variable")]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    failed = [c for c in checks if c.status in ("EMPTY", "ERROR")]
    if args.json:
        print(json.dumps([{"source": c.source, "kind": c.kind, "status": c.status, "series": c.series,
                           "detail": c.detail, "query": c.query} for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{c.status:8} {c.source}  ({c.series} series{'; ' + c.detail if c.status != 'OK' else ''})")
            if args.verbose or c.status in ("EMPTY", "ERROR"):
                print("         " + c.query.replace("\n", "\n         "))
        counts = {s: sum(c.status == s for c in checks) for s in ("OK", "ALLOWED", "EMPTY", "ERROR")}
        print(f"{len(checks)} checks: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
