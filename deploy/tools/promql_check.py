#!/usr/bin/env python3
"""Runs every PromQL expression of the shipped dashboards and alert rules against a Prometheus.

Usage:
    promql_check.py [--url http://127.0.0.1:9090] [--dashboards PATH]... [--rules PATH]...
                    [--allow-empty REGEX]... [--retry-for SECONDS] [--json] [--list] [-v]

Stdlib only (Python 3.11). By default it reads deploy/grafana/dashboards/*.json and
deploy/prometheus/rules/*.yml (not rules/tests/) next to this script.

What is checked, one line of output per check:

* Dashboard panels: every `targets[].expr` of every panel (rows and collapsed rows included).
  Grafana variables are substituted first: $model / $instance (also ${model}, ${model:regex},
  [[model]]) -> `.*`, $__rate_interval -> 1m, $__interval -> 15s, $__range -> 5m. Any other
  variable is a failure. The query must succeed and return data (a non-empty vector, or a scalar).
* Dashboard variables: `label_values(SELECTOR, label)` is checked as `count by (label) (SELECTOR)`
  and must return data; `label_values(label)` is not checked; any other query is run as PromQL.
* Recording rules: the expr must succeed and return data.
* Alerting rules, two checks each:
    - "valid": the whole expr must succeed; an empty result is fine (the alert is not firing).
    - "data": the expr without its threshold must return data, so that a typo in a metric or label
      name cannot leave an alert that never fires. The threshold is removed like this: comments and
      outer parentheses are dropped; for `A and B` / `A unless B` only A (the condition; B is a
      guard) is looked at; for a comparison `A > 0.8` (any of == != > < >= <=, `bool` and
      on/ignoring/group_* modifiers allowed) the side that is not a number is checked, and when both
      sides are expressions (`A < B`) both are checked. An expression without a comparison at the
      top is checked as it is. A top-level `or` is kept whole.

Statuses: OK, EMPTY (no data), ERROR (the query failed), ALLOWED (empty, but the expression or
its source matches an --allow-empty regex, e.g. --allow-empty GPU on a machine without GPU).
Exit status: 0 when nothing is EMPTY or ERROR, 1 otherwise, 2 for bad usage or an unreachable
Prometheus. --retry-for N re-runs the failing checks until they pass or N seconds have gone by
(Prometheus needs a couple of scrapes before rate() returns anything).

--list prints every expression (as written, then as queried) and queries nothing.

Rule files are read with a small YAML reader that understands what rule files use: `alert:` /
`record:` / `expr:` keys with plain, quoted or block (| >) values. Anchors, flow mappings and
multi-document files are not supported (they would be reported as unreadable).
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
    kind: str  # panel | variable | record | alert-valid | alert-data
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
# A reader for the YAML subset of rule files


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        return json.loads(value)
    if value.startswith("'"):
        return value[1:-1].replace("''", "'")
    return value


def _strip_comment(value: str) -> str:
    """Removes a trailing ` # comment` from a plain or quoted scalar."""
    if value.startswith(("'", '"')):
        q = value[0]
        i = 1
        while i < len(value):
            if value[i] == "\\" and q == '"':
                i += 2
                continue
            if value[i] == q:
                if q == "'" and value[i + 1:i + 2] == "'":
                    i += 2
                    continue
                return value[: i + 1]
            i += 1
        return value
    m = re.search(r"\s#", value)
    return value[: m.start()] if m else value


def read_rules(path: pathlib.Path) -> list[tuple[str, str, str]]:
    """Returns (kind, name, expr) with kind 'alert' or 'record'."""
    lines = path.read_text().splitlines()
    rules: list[tuple[str, str, str]] = []
    current: dict | None = None
    key_re = re.compile(r"^(\s*)(?:-\s+)?(alert|record|expr)\s*:\s*(.*)$")
    i = 0
    while i < len(lines):
        m = key_re.match(lines[i])
        if not m:
            i += 1
            continue
        key_col = len(lines[i]) - len(lines[i].lstrip(" -")) if lines[i].lstrip().startswith("-") else len(m.group(1))
        key, raw = m.group(2), _strip_comment(m.group(3).rstrip())
        i += 1
        if raw.startswith(("|", ">")):
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip(" ")) > key_col):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            indent = min((len(b) - len(b.lstrip(" ")) for b in block if b.strip()), default=0)
            text = [b[indent:] for b in block]
            value = "\n".join(text) if raw.startswith("|") else " ".join(t.strip() for t in text)
        else:
            # plain or quoted scalar, possibly continued on more indented lines
            value = raw
            while (i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("#")
                   and len(lines[i]) - len(lines[i].lstrip(" ")) > key_col
                   and not key_re.match(lines[i])
                   and not re.match(r"^\s*[A-Za-z_]+\s*:", lines[i])):
                value += " " + lines[i].strip()
                i += 1
            value = _unquote(value)
        if key in ("alert", "record"):
            current = {"kind": key, "name": value}
        elif key == "expr":
            if current is None or "expr" in current:
                raise ValueError(f"{path}:{i}: expr without an alert or record name")
            current["expr"] = value
            rules.append((current["kind"], current["name"], value))
    return rules


# --------------------------------------------------------------------------------------------
# Taking the threshold off an alert expression


def _strip_comments(expr: str) -> str:
    out, i, quote = [], 0, None
    while i < len(expr):
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and quote != "`":
                out.append(expr[i + 1:i + 2])
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
            out.append(ch)
        elif ch == "#":
            while i < len(expr) and expr[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _top_level(expr: str):
    """Yields (index, char) of characters outside brackets and strings."""
    depth, quote, i = 0, None, 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            if ch == "\\" and quote != "`":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, ch
        i += 1


def _strip_parens(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        depth, quote, closes_at_end = 0, None, True
        for i, ch in enumerate(expr):
            if quote:
                if ch == quote:
                    quote = None
                continue
            if ch in "\"'`":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth == 0 and i != len(expr) - 1:
                    closes_at_end = False
                    break
        if not closes_at_end:
            break
        expr = expr[1:-1].strip()
    return expr


_WORD = re.compile(r"[A-Za-z0-9_:]")
_MODIFIER = re.compile(r"^\s*(bool\b)?\s*((on|ignoring)\s*\([^)]*\))?\s*((group_left|group_right)\s*(\([^)]*\))?)?",
                       re.S)
_NUMBER = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|0[xX][0-9a-fA-F]+|[Ii]nf|NaN)$")


def _split_top(expr: str, words: tuple[str, ...] = (), ops: tuple[str, ...] = ()):
    """The last top-level occurrence of one of the keywords or operators: (left, op, right)."""
    found = None
    positions = dict(_top_level(expr))
    for i in sorted(positions):
        for w in words:
            if (expr.startswith(w, i) and (i == 0 or not _WORD.match(expr[i - 1]))
                    and (i + len(w) >= len(expr) or not _WORD.match(expr[i + len(w)]))):
                found = (i, w)
        for op in ops:
            if expr.startswith(op, i):
                # not part of a longer operator (>= vs >, == vs =~ never at top level)
                if op in (">", "<") and expr[i + 1:i + 2] == "=":
                    continue
                if op in (">", "<", "=") and i > 0 and expr[i - 1] in "<>=!":
                    continue
                found = (i, op)
    if not found:
        return None
    i, op = found
    right = expr[i + len(op):]
    right = right[_MODIFIER.match(right).end():]
    return expr[:i].strip(), op, right.strip()


def data_expressions(expr: str) -> list[str]:
    """The expressions whose non-emptiness shows that an alert expression can fire."""
    expr = _strip_parens(_strip_comments(expr))
    if _split_top(expr, words=("or",)):
        return [expr]
    split = _split_top(expr, words=("and", "unless"))
    if split:
        return data_expressions(split[0])
    split = _split_top(expr, ops=("==", "!=", ">=", "<=", ">", "<"))
    if split:
        left, _, right = split
        left, right = _strip_parens(left), _strip_parens(right)
        sides = [s for s in (left, right) if not _NUMBER.match(s)]
        return sides or [expr]
    return [expr]


def rule_checks(path: pathlib.Path) -> list[Check]:
    try:
        rules = read_rules(path)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        c = Check(f"rules {path.name}", "", "", True, "record")
        c.status, c.detail = "ERROR", f"cannot read rule file: {e}"
        return [c]
    checks = []
    for kind, name, expr in rules:
        if kind == "record":
            checks.append(Check(f"rules {path.name}: record {name}", expr, expr, True, "record"))
            continue
        checks.append(Check(f"rules {path.name}: alert {name} (valid)", expr, expr, False, "alert-valid"))
        for j, d in enumerate(data_expressions(expr)):
            checks.append(Check(f"rules {path.name}: alert {name} (data {j + 1})", d, d, True, "alert-data"))
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
