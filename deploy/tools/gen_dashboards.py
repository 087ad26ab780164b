#!/usr/bin/env python3
"""Writes the Grafana dashboards under deploy/grafana/dashboards/ (stdlib only).

The JSON files are committed; this script is how they are made, so that every panel follows the
same conventions (datasource uid "prometheus", `model_name=~"$model"` / `instance=~"$instance"`
filters, PromQL only in targets[].expr). Edit the panels here and rerun:

    python3 deploy/tools/gen_dashboards.py

Then check them against a Prometheus with deploy/tools/promql_check.py. tests/deploy_manifests.rs
fails when the committed files differ from what this script writes.
"""

import argparse
import json
import pathlib

DS = {"type": "prometheus", "uid": "prometheus"}
OUT = pathlib.Path(__file__).resolve().parent.parent / "grafana" / "dashboards"

M = 'model_name=~"$model", instance=~"$instance"'  # oxserve_* and ts_* per-model series
HOST = 'instance=~"$instance"'  # host-level series
TSM = 'ModelName=~"$model", instance=~"$instance"'  # TorchServe model gauges (HandlerTime...)
RI = "[$__rate_interval]"


def quantiles(family, qs, by="model_name", sel=M):
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({family}_bucket{{{sel}}}{RI})))",
            f"{{{{{by}}}}} p{int(round(q * 100))}",
        )
        for q in qs
    ]


class Dash:
    def __init__(self, uid, title, description, variables):
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def row(self, title):
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _targets(self, targets):
        out = []
        for i, (expr, legend) in enumerate(targets):
            out.append(
                {
                    "datasource": DS,
                    "refId": chr(ord("A") + i),
                    "expr": expr,
                    "legendFormat": legend,
                    "range": True,
                    "instant": False,
                    "editorMode": "code",
                }
            )
        return out

    def timeseries(self, title, description, targets, unit, w=12, h=8, min_=None, max_=None,
                   dashed=None, thresholds=None, stack=False):
        defaults = {
            "unit": unit,
            "color": {"mode": "palette-classic"},
            "custom": {
                "drawStyle": "line",
                "lineWidth": 1,
                "fillOpacity": 20 if stack else 10,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                "thresholdsStyle": {"mode": "line" if thresholds else "off"},
            },
        }
        if min_ is not None:
            defaults["min"] = min_
        if max_ is not None:
            defaults["max"] = max_
        if thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}]
                + [{"color": c, "value": v} for v, c in thresholds],
            }
        overrides = []
        if dashed:
            overrides.append(
                {
                    "matcher": {"id": "byRegexp", "options": dashed},
                    "properties": [
                        {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
                        {"id": "custom.fillOpacity", "value": 0},
                    ],
                }
            )
        self.panels.append(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "id": self._id(),
                "datasource": DS,
                "gridPos": self._place(w, h),
                "fieldConfig": {"defaults": defaults, "overrides": overrides},
                "options": {
                    "legend": {
                        "displayMode": "table",
                        "placement": "bottom",
                        "showLegend": True,
                        "calcs": ["mean", "max", "lastNotNull"],
                    },
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
                "targets": self._targets(targets),
            }
        )

    def stat(self, title, description, targets, unit, w=4, h=4, text_mode="auto", thresholds=None):
        steps = [{"color": "green", "value": None}]
        if thresholds:
            steps += [{"color": c, "value": v} for v, c in thresholds]
        self.panels.append(
            {
                "type": "stat",
                "title": title,
                "description": description,
                "id": self._id(),
                "datasource": DS,
                "gridPos": self._place(w, h),
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "color": {"mode": "thresholds"},
                        "thresholds": {"mode": "absolute", "steps": steps},
                    },
                    "overrides": [],
                },
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "area",
                    "textMode": text_mode,
                    "justifyMode": "auto",
                    "orientation": "auto",
                },
                "targets": self._targets(targets),
            }
        )

    def json(self):
        return {
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    }
                ]
            },
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [
                {
                    "asDropdown": False,
                    "icon": "external link",
                    "includeVars": True,
                    "keepTime": True,
                    "tags": ["oxserve"],
                    "targetBlank": False,
                    "title": "oxserve dashboards",
                    "type": "dashboards",
                }
            ],
            "panels": self.panels,
            "refresh": "30s",
            "schemaVersion": 39,
            "tags": ["oxserve", "torchserve"],
            "templating": {"list": self.variables},
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "timezone": "",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


def query_var(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "hide": 0,
    }


INSTANCE_VAR = query_var("instance", "Instance", 'label_values(up{job="oxserve"}, instance)')
MODEL_VAR = query_var("model", "Model", 'label_values(oxserve_queue_depth{instance=~"$instance"}, model_name)')


def models_dashboard():
    d = Dash(
        "oxserve-models",
        "oxserve / Models",
        "Per-model traffic, errors, latency, queues and workers of oxserve (TorchServe-compatible "
        "metrics plus oxserve's own histograms and gauges). All replicas are summed per model.",
        [INSTANCE_VAR, MODEL_VAR],
    )
    d.row("Overview")
    d.stat("Servers up", "Scraped oxserve targets that answered (job=\"oxserve\").",
           [(f'sum(up{{job="oxserve", {HOST}}})', "up")], "short", thresholds=None)
    d.stat("Predictions / s", "All models, all replicas (ts_inference_requests_total).",
           [(f"sum(rate(ts_inference_requests_total{{{M}}}{RI}))", "req/s")], "reqps")
    d.stat("5xx ratio", "Share of prediction responses that were 5xx (oxserve_model_responses_total).",
           [(f'sum(rate(oxserve_model_responses_total{{status_class="5xx", {M}}}{RI})) '
             f"/ sum(rate(oxserve_model_responses_total{{{M}}}{RI}))", "5xx")],
           "percentunit", thresholds=[(0.01, "orange"), (0.05, "red")])
    d.stat("Queued requests", "Requests waiting in model queues (oxserve_queue_depth).",
           [(f"sum(oxserve_queue_depth{{{M}}})", "queued")], "short")
    d.stat("Live workers", "Workers ready or busy (oxserve_workers).",
           [(f'sum(oxserve_workers{{state=~"ready|busy", {M}}})', "workers")], "short")
    d.stat("Versions", "Number of servers per oxserve version (oxserve_build_info).",
           [(f"count by (version) (oxserve_build_info{{{HOST}}})", "{{version}}")], "short",
           text_mode="value_and_name")

    d.row("Traffic and errors")
    d.timeseries("Throughput per model",
                 "Prediction requests per second (ts_inference_requests_total; TorchServe-compatible).",
                 [(f"sum by (model_name) (rate(ts_inference_requests_total{{{M}}}{RI}))", "{{model_name}}")],
                 "reqps", min_=0)
    d.timeseries("Responses by status class",
                 "Prediction responses per second by status class (oxserve_model_responses_total).",
                 [(f"sum by (model_name, status_class) (rate(oxserve_model_responses_total{{{M}}}{RI}))",
                   "{{model_name}} {{status_class}}")],
                 "reqps", min_=0)
    d.timeseries("Error ratio per model",
                 "Share of prediction responses that were 5xx / 4xx (oxserve_model_responses_total).",
                 [(f'sum by (model_name) (rate(oxserve_model_responses_total{{status_class="5xx", {M}}}{RI})) '
                   f"/ sum by (model_name) (rate(oxserve_model_responses_total{{{M}}}{RI}))", "{{model_name}} 5xx"),
                  (f'sum by (model_name) (rate(oxserve_model_responses_total{{status_class="4xx", {M}}}{RI})) '
                   f"/ sum by (model_name) (rate(oxserve_model_responses_total{{{M}}}{RI}))", "{{model_name}} 4xx")],
                 "percentunit", min_=0, thresholds=[(0.05, "red")])
    req = lambda c: f"(sum(rate(Requests{c}XX{{{HOST}}}{RI})) or vector(0))"  # noqa: E731
    total = f"({req(2)} + {req(4)} + {req(5)})"
    d.timeseries("HTTP error ratio, all listeners",
                 "Requests5XX and Requests4XX over all Requests*XX (TorchServe-compatible; counts every "
                 "response of every listener, /metrics scrapes and /ping included).",
                 [(f"{req(5)} / {total}", "5xx"), (f"{req(4)} / {total}", "4xx")],
                 "percentunit", min_=0)

    d.row("Latency")
    d.timeseries("Request latency per model",
                 "Arrival to response, p50/p90/p99 (oxserve_request_duration_seconds).",
                 quantiles("oxserve_request_duration_seconds", [0.5, 0.9, 0.99]), "s", min_=0)
    d.timeseries("Queue wait per model",
                 "Time in the model's queue, batching delay included, p50/p99 (oxserve_queue_wait_seconds).",
                 quantiles("oxserve_queue_wait_seconds", [0.5, 0.99]), "s", min_=0)
    d.timeseries("Backend (handler) time per model",
                 "Time the handler spent on one batch, p50/p99 (oxserve_backend_duration_seconds).",
                 quantiles("oxserve_backend_duration_seconds", [0.5, 0.99]), "s", min_=0)
    d.timeseries("Mean latency per model (TorchServe counters)",
                 "ts_inference_latency_microseconds and ts_queue_latency_microseconds over "
                 "ts_inference_requests_total. The latency counter only adds successful predictions, "
                 "so failures pull the mean down.",
                 [(f"sum by (model_name) (rate(ts_inference_latency_microseconds{{{M}}}{RI})) "
                   f"/ sum by (model_name) (rate(ts_inference_requests_total{{{M}}}{RI})) / 1000",
                   "{{model_name}} request"),
                  (f"sum by (model_name) (rate(ts_queue_latency_microseconds{{{M}}}{RI})) "
                   f"/ sum by (model_name) (rate(ts_inference_requests_total{{{M}}}{RI})) / 1000",
                   "{{model_name}} queue")],
                 "ms", min_=0)
    d.timeseries("HandlerTime / PredictionTime (TorchServe, last value)",
                 "Handler-reported gauges of the latest batch, highest over the selected instances "
                 "(HandlerTime, PredictionTime; label ModelName).",
                 [(f"max by (ModelName) (HandlerTime{{{TSM}}})", "{{ModelName}} handler"),
                  (f"max by (ModelName) (PredictionTime{{{TSM}}})", "{{ModelName}} prediction")],
                 "ms", min_=0)
    d.timeseries("QueueTime / WorkerThreadTime (TorchServe, last value)",
                 "Host-level gauges of the latest request / batch per server (no model label).",
                 [(f"QueueTime{{{HOST}}}", "queue {{instance}}"),
                  (f"WorkerThreadTime{{{HOST}}}", "worker thread {{instance}}")],
                 "ms", min_=0)
    d.timeseries("Time to first chunk (streaming)",
                 "Streamed responses: arrival to first chunk, p50/p99 (oxserve_time_to_first_chunk_seconds).",
                 quantiles("oxserve_time_to_first_chunk_seconds", [0.5, 0.99]), "s", min_=0)
    d.timeseries("Batch size per model",
                 "Requests per batch handed to a worker: mean and p90 (oxserve_batch_size).",
                 [(f"sum by (model_name) (rate(oxserve_batch_size_sum{{{M}}}{RI})) "
                   f"/ sum by (model_name) (rate(oxserve_batch_size_count{{{M}}}{RI}))", "{{model_name}} mean"),
                  (f"histogram_quantile(0.9, sum by (le, model_name) (rate(oxserve_batch_size_bucket{{{M}}}{RI})))",
                   "{{model_name}} p90")],
                 "short", min_=0)

    d.row("Queues and workers")
    d.timeseries("Queue depth and capacity per model",
                 "Requests waiting (solid) and queue capacity, job_queue_size (dashed), summed over "
                 "replicas (oxserve_queue_depth, oxserve_queue_capacity).",
                 [(f"sum by (model_name) (oxserve_queue_depth{{{M}}})", "{{model_name}} depth"),
                  (f"sum by (model_name) (oxserve_queue_capacity{{{M}}})", "{{model_name}} capacity")],
                 "short", min_=0, dashed=".* capacity$")
    d.timeseries("Queue fill, fullest server per model",
                 "oxserve_queue_depth / oxserve_queue_capacity of the fullest replica; the "
                 "OxserveQueueNearCapacity alert fires above 80%.",
                 [(f"max by (model_name) (oxserve_queue_depth{{{M}}} / oxserve_queue_capacity{{{M}}})",
                   "{{model_name}}")],
                 "percentunit", min_=0, max_=1, thresholds=[(0.8, "red")])
    d.timeseries("Workers by state per model",
                 "oxserve_workers by state, summed over replicas, with the configured minimum and "
                 "maximum (dashed; oxserve_workers_min, oxserve_workers_max).",
                 [(f"sum by (model_name, state) (oxserve_workers{{{M}}})", "{{model_name}} {{state}}"),
                  (f"sum by (model_name) (oxserve_workers_min{{{M}}})", "{{model_name}} min"),
                  (f"sum by (model_name) (oxserve_workers_max{{{M}}})", "{{model_name}} max")],
                 "short", min_=0, dashed=".* (min|max)$")
    d.timeseries("Worker load time (TorchServe)",
                 "Milliseconds from worker creation until its model was loaded (WorkerLoadTime, per worker).",
                 [(f"WorkerLoadTime{{{HOST}}}", "{{WorkerName}} {{instance}}")],
                 "ms", min_=0)
    d.timeseries("Dropped backend metric lines",
                 "Handler [METRICS] lines oxserve dropped, by reason (malformed, undeclared in metrics.yaml).",
                 [(f"sum by (reason) (rate(oxserve_backend_metric_lines_dropped_total{{{HOST}}}{RI}))", "{{reason}}")],
                 "short", min_=0, w=24, h=6)
    return d


def llm_dashboard():
    d = Dash(
        "oxserve-llm",
        "oxserve / LLM",
        "Token-level view of models that stream (LLMs): time to first token, inter-token latency, "
        "tokens per second, requests running in workers vs waiting, GPU memory. Tokens are counted "
        "from the OpenAI usage object of replies; TTFT and inter-token latency are measured on the "
        "chunks of streamed replies (one chunk per token for a token stream). See docs/llm.md.",
        [INSTANCE_VAR, MODEL_VAR],
    )
    d.row("Latency per token")
    d.timeseries("Time to first token (TTFT)",
                 "Streamed responses: arrival to first chunk, p50/p99, all replicas "
                 "(oxserve_time_to_first_chunk_seconds). The OxserveLLMTimeToFirstTokenHigh alert "
                 "fires when p99 stays above 2s.",
                 quantiles("oxserve_time_to_first_chunk_seconds", [0.5, 0.99]), "s", min_=0,
                 thresholds=[(2, "red")])
    d.timeseries("Inter-token latency",
                 "Time between consecutive chunks of a stream, p50/p99 "
                 "(oxserve_inter_token_latency_seconds).",
                 quantiles("oxserve_inter_token_latency_seconds", [0.5, 0.99]), "s", min_=0)
    d.row("Throughput")
    d.timeseries("Tokens per second",
                 "Generated (completion) and prompt tokens per second, from the OpenAI usage of replies "
                 "(oxserve_generated_tokens_total, oxserve_prompt_tokens_total).",
                 [(f"sum by (model_name) (rate(oxserve_generated_tokens_total{{{M}}}{RI}))",
                   "{{model_name}} generated"),
                  (f"sum by (model_name) (rate(oxserve_prompt_tokens_total{{{M}}}{RI}))",
                   "{{model_name}} prompt")],
                 "short", min_=0, dashed=".* prompt$")
    d.timeseries("Streamed chunks per second",
                 "Chunks sent in streamed responses (oxserve_stream_chunks_total); with one token per "
                 "chunk this is the decode rate even when replies carry no usage.",
                 [(f"sum by (model_name) (rate(oxserve_stream_chunks_total{{{M}}}{RI}))",
                   "{{model_name}}")],
                 "short", min_=0)
    d.row("Load")
    d.timeseries("Requests running vs waiting",
                 "Requests inside workers (oxserve_requests_running) and waiting in the queue "
                 "(oxserve_queue_depth, dashed), summed over replicas. Waiting above running for "
                 "minutes fires OxserveLLMQueueSaturated.",
                 [(f"sum by (model_name) (oxserve_requests_running{{{M}}})", "{{model_name}} running"),
                  (f"sum by (model_name) (oxserve_queue_depth{{{M}}})", "{{model_name}} waiting")],
                 "short", min_=0, dashed=".* waiting$")
    d.timeseries("Requests cancelled by clients",
                 "Requests whose client went away before the reply was complete, per second "
                 "(oxserve_requests_cancelled_total). In async mode on oxserve's runtime their "
                 "generation was stopped; elsewhere it ran on for nobody, as in TorchServe.",
                 [(f"sum by (model_name) (rate(oxserve_requests_cancelled_total{{{M}}}{RI}))",
                   "{{model_name}}")],
                 "reqps", min_=0)
    d.timeseries("GPU memory used", "GPUMemoryUsed per DeviceId (the KV cache lives here).",
                 [(f"GPUMemoryUsed{{{HOST}}}", "{{instance}} GPU {{DeviceId}}")], "mbytes", min_=0)
    return d


def host_dashboard():
    d = Dash(
        "oxserve-host",
        "oxserve / Host and GPU",
        "Host CPU, memory and disk, and GPU utilization and memory, as reported by oxserve (or "
        "TorchServe) system metrics. GPU panels are empty on machines without a GPU.",
        [INSTANCE_VAR],
    )
    d.row("GPU")
    d.timeseries("GPU memory used", "GPUMemoryUsed per DeviceId.",
                 [(f"GPUMemoryUsed{{{HOST}}}", "{{instance}} GPU {{DeviceId}}")], "mbytes", min_=0, w=8)
    d.timeseries("GPU memory utilization", "GPUMemoryUtilization per DeviceId.",
                 [(f"GPUMemoryUtilization{{{HOST}}}", "{{instance}} GPU {{DeviceId}}")], "percent",
                 min_=0, max_=100, w=8, thresholds=[(90, "red")])
    d.timeseries("GPU utilization", "GPUUtilization per DeviceId.",
                 [(f"GPUUtilization{{{HOST}}}", "{{instance}} GPU {{DeviceId}}")], "percent",
                 min_=0, max_=100, w=8)
    d.row("Host")
    d.timeseries("CPU utilization", "CPUUtilization (measured over metric_time_interval).",
                 [(f"CPUUtilization{{{HOST}}}", "{{instance}}")], "percent", min_=0, max_=100, w=8)
    d.timeseries("Memory utilization", "MemoryUtilization.",
                 [(f"MemoryUtilization{{{HOST}}}", "{{instance}}")], "percent", min_=0, max_=100, w=8,
                 thresholds=[(90, "red")])
    d.timeseries("Disk utilization", "DiskUtilization.",
                 [(f"DiskUtilization{{{HOST}}}", "{{instance}}")], "percent", min_=0, max_=100, w=8,
                 thresholds=[(90, "red")])
    d.timeseries("Memory used / available", "MemoryUsed and MemoryAvailable (megabytes).",
                 [(f"MemoryUsed{{{HOST}}}", "{{instance}} used"),
                  (f"MemoryAvailable{{{HOST}}}", "{{instance}} available")], "mbytes", min_=0)
    d.timeseries("Disk used / available", "DiskUsage and DiskAvailable (gigabytes).",
                 [(f"DiskUsage{{{HOST}}}", "{{instance}} used"),
                  (f"DiskAvailable{{{HOST}}}", "{{instance}} available")], "gbytes", min_=0)
    return d


def main(argv=None):
    ap = argparse.ArgumentParser(description="Writes the Grafana dashboards.")
    ap.add_argument("--out", type=pathlib.Path, default=OUT,
                    help=f"folder to write them to (default {OUT}); a test compares a fresh one with it")
    out = ap.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    for d in (models_dashboard(), llm_dashboard(), host_dashboard()):
        path = out / f"{d.uid}.json"
        path.write_text(json.dumps(d.json(), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
