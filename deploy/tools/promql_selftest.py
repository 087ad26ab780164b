#!/usr/bin/env python3
"""Proves the dashboards and alert rules against a real Prometheus, without oxserve (PyYAML).

    python3 deploy/tools/promql_selftest.py [--prometheus /usr/bin/prometheus] [--seconds 40]

It serves deploy/tools/testdata/metrics (a hand-written /metrics page with every family the
dashboards and rules use) from a throwaway `python3 -m http.server` on a free loopback port,
multiplying counters and histograms by a tick that grows every second so that rate() has
something to see; starts Prometheus on another free loopback port scraping it every second with
the shipped rule files (deploy/prometheus/rules/*.yml); checks that every rule group loaded with
health "ok" and that the queue alert of the page's 85%-full model is pending; runs
promql_check.py against it; and stops both processes and removes its temporary folder.
Exit status: promql_check's, or 1 when the rules did not load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
DEPLOY = HERE.parent
sys.path.insert(0, str(HERE))
import promql_check  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scaled(template: str, tick: int) -> str:
    """Counters and histograms (cumulative) times `tick`; gauges as they are."""
    types: dict[str, str] = {}
    out = []
    for line in template.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split()
            types[name] = typ
        if line.startswith("#") or not line.strip():
            out.append(line)
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0]
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        if types.get(family) in ("counter", "histogram"):
            value = repr(float(value) * tick)
        out.append(f"{series} {value}")
    return "\n".join(out) + "\n"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    ap.add_argument("--seconds", type=float, default=40, help="how long promql_check may retry")
    ap.add_argument("check_args", nargs="*", help="extra promql_check.py arguments (after --)")
    args = ap.parse_args()

    template = (HERE / "testdata" / "metrics").read_text()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="oxserve-promql-"))
    site = tmp / "site"
    site.mkdir()
    procs: list[subprocess.Popen] = []
    stop = threading.Event()

    def write(tick: int) -> None:
        part = site / "metrics.tmp"
        part.write_text(scaled(template, tick))
        os.replace(part, site / "metrics")

    def ticker() -> None:
        tick = 1
        while not stop.wait(1.0):
            tick += 1
            write(tick)

    try:
        write(1)
        http_port, prom_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
             "--directory", str(site)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(DEPLOY / 'prometheus' / 'rules' / '*.yml'))}\n"
            "scrape_configs:\n"
            f"  - job_name: prometheus\n    static_configs:\n      - targets: ['127.0.0.1:{prom_port}']\n"
            f"  - job_name: oxserve\n    static_configs:\n      - targets: ['127.0.0.1:{http_port}']\n")
        log = open(tmp / "prometheus.log", "w")
        procs.append(subprocess.Popen(
            [args.prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT))
        threading.Thread(target=ticker, daemon=True).start()
        base = f"http://127.0.0.1:{prom_port}"

        deadline = time.monotonic() + 20
        while True:
            try:
                groups = get_json(base + "/api/v1/rules")["data"]["groups"]
                if groups:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or procs[1].poll() is not None:
                print("Prometheus did not come up; its log:\n" + (tmp / "prometheus.log").read_text())
                return 1
            time.sleep(0.5)
        up = base + "/api/v1/query?query=" + urllib.parse.quote('up{job="oxserve"} == 1')
        while not get_json(up)["data"]["result"]:
            if time.monotonic() > deadline:
                print("Prometheus could not scrape the test page")
                return 1
            time.sleep(0.5)
        time.sleep(3)  # a few scrapes and rule evaluations, so that rate() has two samples
        rules = [r for g in get_json(base + "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        bad = [r for r in rules if r.get("health") != "ok"]
        print(f"Prometheus {base} loaded {len(rules)} rules; unhealthy: {len(bad)}")
        for r in bad:
            print(f"  {r['name']}: {r.get('health')} {r.get('lastError', '')}")
        # The test page has model resnet's queue 85% full: that alert must be pending or firing.
        alerts = get_json(base + "/api/v1/alerts")["data"]["alerts"]
        queue = [a for a in alerts if a["labels"].get("alertname") == "OxserveQueueNearCapacity"
                 and a["labels"].get("model_name") == "resnet"]
        print(f"OxserveQueueNearCapacity for resnet: {queue[0]['state'] if queue else 'MISSING'}")
        rc = promql_check.main(["--url", base, "--retry-for", str(args.seconds)] + args.check_args)
        return rc or (1 if bad or not rules or not queue else 0)
    finally:
        stop.set()
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
