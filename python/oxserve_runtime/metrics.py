"""Handler metrics with TorchServe's API, printed as `[METRICS]` lines on stdout.

Line format: `[METRICS]<name>.<unit>:<value>|#<dim>:<val>,...|#type:<TYPE>|#hostname:<host>,<epoch>[,<request ids>]`.
Declared metrics come from the model_metrics section of metrics.yaml, which the server parses and
hands over as JSON (OXSERVE_MODEL_METRICS), as it does model-config.yaml: the runtime needs no YAML
reader. Others are created on first use, as TorchServe does (the server decides whether to keep
them).
"""

import enum
import json
import logging
import os
import socket
import sys
import threading
import time

logger = logging.getLogger(__name__)

UNITS = {
    "ms": "Milliseconds",
    "s": "Seconds",
    "percent": "Percent",
    "count": "Count",
    "MB": "Megabytes",
    "GB": "Gigabytes",
    "kB": "Kilobytes",
    "B": "Bytes",
    "": "unit",
    None: "unit",
}

_HOSTNAME = socket.gethostname()
_OUT_LOCK = threading.Lock()


def emit_line(text):
    """Writes one line on stdout at once (metric lines must never be interleaved)."""
    with _OUT_LOCK:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class MetricTypes(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


def _metric_type(value):
    if isinstance(value, MetricTypes):
        return value
    if isinstance(value, str):
        return MetricTypes(value.lower())
    return MetricTypes(getattr(value, "value", value))


class Dimension:
    def __init__(self, name, value):
        self.name = name
        self.value = value

    def __str__(self):
        return "%s:%s" % (self.name, self.value)

    def __repr__(self):
        return "Dimension(%r, %r)" % (self.name, self.value)


class CachingMetric:
    """One metric (name, unit, dimension names, type); each update prints one line."""

    def __init__(self, metric_name, unit, dimension_names=None, metric_type=MetricTypes.COUNTER):
        self.metric_name = metric_name
        self.unit = UNITS.get(unit, unit)
        self.dimension_names = list(dimension_names or [])
        self.metric_type = _metric_type(metric_type)

    def add_or_update(self, value, dimension_values=(), request_id=""):
        dimension_values = list(dimension_values or [])
        if len(dimension_values) != len(self.dimension_names):
            logger.error("Failed to update metric %s: dimension values %s "
                         "should correspond to dimension names %s", self.metric_name,
                         dimension_values, self.dimension_names)
            return
        if self.metric_type == MetricTypes.COUNTER and value < 0:
            logger.error("Failed to update metric %s: counter metric update "
                         "value cannot be negative", self.metric_name)
            return
        dims = ",".join("%s:%s" % (n, v) for n, v in zip(self.dimension_names, dimension_values))
        line = "[METRICS]%s.%s:%s|#%s|#type:%s|#hostname:%s,%d" % (
            self.metric_name, self.unit, value, dims, self.metric_type.name, _HOSTNAME,
            int(time.time()))
        if request_id:
            line += "," + str(request_id)
        emit_line(line)

    def update(self, value, request_id="", dimensions=()):
        """TorchServe's older API: dimensions as Dimension objects."""
        self.dimension_names = [d.name for d in dimensions]
        self.add_or_update(value, [d.value for d in dimensions], request_id)


class MetricsCache:
    """`context.metrics`: TorchServe's metric cache API."""

    def __init__(self, config_file_path=None, model_name=None, declared=None):
        """`declared`: metrics.yaml's model_metrics section (`{"counter": [{"name", "unit",
        "dimensions"}], ...}`). A handler that builds its own cache from a metrics.yaml path
        (TorchServe's API) needs PyYAML, as in TorchServe."""
        self.cache = {}
        self.request_ids = None
        self.model_name = model_name
        self.config_file_path = config_file_path
        if declared is None and config_file_path:
            import yaml  # TorchServe's own dependency for this path

            with open(config_file_path, "r", encoding="utf-8") as f:
                declared = (yaml.safe_load(f) or {}).get("model_metrics")
        self._declare(declared or {})

    @classmethod
    def from_server(cls, model_name, environ=None):
        """The cache of a worker the server started: declarations from OXSERVE_MODEL_METRICS."""
        text = (os.environ if environ is None else environ).get("OXSERVE_MODEL_METRICS")
        return cls(model_name=model_name, declared=json.loads(text or "{}"))

    def _declare(self, section):
        for type_name, entries in section.items():
            metric_type = MetricTypes(type_name)
            for entry in entries or []:
                self.add_metric_to_cache(entry["name"], entry.get("unit", ""),
                                         entry.get("dimensions") or [], metric_type)

    def set_request_ids(self, request_ids):
        self.request_ids = request_ids

    def add_metric_to_cache(self, metric_name, unit, dimension_names=(), metric_type=MetricTypes.COUNTER):
        metric_type = _metric_type(metric_type)
        metric = CachingMetric(metric_name, unit, dimension_names, metric_type)
        self.cache.setdefault(metric_type, {})[metric_name] = metric
        return metric

    def get_metric(self, metric_name, metric_type=MetricTypes.COUNTER):
        try:
            return self.cache[_metric_type(metric_type)][metric_name]
        except KeyError:
            raise KeyError("Metric of type '%s' and name '%s' doesn't exist"
                           % (_metric_type(metric_type), metric_name)) from None

    def _get_req(self, idx):
        ids = self.request_ids
        if isinstance(ids, dict):
            if idx is not None and idx in ids:
                return ids[idx]
            return ",".join(ids.values())
        return ids

    def _with_defaults(self, dimensions, level="Model"):
        dimensions = list(dimensions or [])
        names = [d.name for d in dimensions]
        if level == "Model" and "ModelName" not in names:
            dimensions.append(Dimension("ModelName", self.model_name))
        if "Level" not in names:
            dimensions.append(Dimension("Level", level))
        return dimensions

    def _record(self, name, value, unit, idx, dimensions, metric_type, level="Model"):
        metric_type = _metric_type(metric_type)
        dimensions = self._with_defaults(dimensions, level)
        request_id = self._get_req(idx) if level == "Model" else None
        try:
            metric = self.get_metric(name, metric_type)
        except KeyError:
            metric = self.add_metric_to_cache(name, unit, [d.name for d in dimensions], metric_type)
        values = {d.name: d.value for d in dimensions}
        if all(n in values for n in metric.dimension_names):
            metric.add_or_update(value, [values[n] for n in metric.dimension_names], request_id)
        else:
            metric.add_or_update(value, [d.value for d in dimensions], request_id)

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=MetricTypes.COUNTER):
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_counter(self, name, value, idx=None, dimensions=None):
        self._record(name, value, "count", idx, dimensions, MetricTypes.COUNTER)

    def add_time(self, name, value, idx=None, unit="ms", dimensions=None, metric_type=MetricTypes.GAUGE):
        if unit not in ("ms", "s"):
            raise ValueError("the unit for a timed metric should be one of ['ms', 's']")
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_size(self, name, value, idx=None, unit="MB", dimensions=None, metric_type=MetricTypes.GAUGE):
        if unit not in ("MB", "kB", "GB", "B"):
            raise ValueError("The unit for size based metric is one of ['MB','kB', 'GB', 'B']")
        self._record(name, value, unit, idx, dimensions, metric_type)

    def add_percent(self, name, value, idx=None, dimensions=None, metric_type=MetricTypes.GAUGE):
        self._record(name, value, "percent", idx, dimensions, metric_type)

    def add_error(self, name, value, dimensions=None):
        self._record(name, value, "", None, dimensions, MetricTypes.COUNTER, level="Error")
