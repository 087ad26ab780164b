"""Handler metrics with TorchServe's API, printed as `[METRICS]` lines on stdout.

Line format: `[METRICS]<name>.<unit>:<value>|#<dim>:<val>,...|#type:<TYPE>|#hostname:<host>,<epoch>[,<request ids>]`.
Declared metrics come from the model_metrics section of metrics.yaml (--metrics-config); others
are created on first use, as TorchServe does (the server decides whether to keep them).
"""

import enum
import logging
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

    def __init__(self, config_file_path=None, model_name=None):
        self.cache = {}
        self.request_ids = None
        self.model_name = model_name
        self.config_file_path = config_file_path
        if config_file_path:
            self._load_yaml(config_file_path)

    def _load_yaml(self, path):
        with open(path, "r", encoding="utf-8") as f:
            doc = load_yaml(f.read()) or {}
        for type_name, entries in (doc.get("model_metrics") or {}).items():
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


# --- a YAML subset, enough for metrics.yaml when PyYAML is not installed --------------------------

def load_yaml(text):
    try:
        import yaml  # type: ignore
    except ImportError:
        return _MiniYaml(text).parse()
    return yaml.safe_load(text)


class _MiniYaml:
    """Block mappings and sequences, flow sequences, quoted/plain scalars, anchors and aliases."""

    def __init__(self, text):
        self.anchors = {}
        self.lines = []
        for raw in text.splitlines():
            line = self._strip_comment(raw).rstrip()
            if line.strip() and line.strip() not in ("---", "..."):
                self.lines.append([len(line) - len(line.lstrip(" ")), line.strip()])

    @staticmethod
    def _strip_comment(line):
        quote = None
        for i, ch in enumerate(line):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                return line[:i]
        return line

    def parse(self):
        if not self.lines:
            return None
        value, i = self._block(0, self.lines[0][0])
        if i != len(self.lines):
            raise ValueError("unsupported YAML near %r" % self.lines[i][1])
        return value

    @staticmethod
    def _is_item(text):
        return text == "-" or text.startswith("- ")

    @staticmethod
    def _split_key(text):
        quote = None
        for i, ch in enumerate(text):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch == ":" and (i + 1 == len(text) or text[i + 1] == " "):
                return text[:i].strip().strip("'\""), text[i + 1:].strip()
        return None

    def _block(self, i, indent):
        if self._is_item(self.lines[i][1]):
            seq = []
            while i < len(self.lines) and self.lines[i][0] == indent and self._is_item(self.lines[i][1]):
                rest = self.lines[i][1][1:].strip()
                if not rest:
                    value, i = self._nested(i + 1, indent)
                elif self._split_key(rest) and not rest.startswith(("[", "'", '"')):
                    col = indent + len(self.lines[i][1]) - len(self.lines[i][1][1:].lstrip())
                    self.lines[i] = [col, rest]
                    value, i = self._block(i, col)
                else:
                    value, i = self._scalar(rest), i + 1
                seq.append(value)
            return seq, i
        mapping = {}
        while i < len(self.lines) and self.lines[i][0] == indent and not self._is_item(self.lines[i][1]):
            kv = self._split_key(self.lines[i][1])
            if kv is None:
                raise ValueError("unsupported YAML line %r" % self.lines[i][1])
            key, rest = kv
            if rest and not rest.startswith("&") or (rest.startswith("&") and " " in rest):
                mapping[key], i = self._scalar(rest), i + 1
            else:
                anchor = rest[1:] if rest.startswith("&") else None
                value, i = self._nested(i + 1, indent, allow_same_indent_seq=True)
                if anchor:
                    self.anchors[anchor] = value
                mapping[key] = value
        return mapping, i

    def _nested(self, i, indent, allow_same_indent_seq=False):
        if i < len(self.lines):
            ind, text = self.lines[i]
            if ind > indent or (allow_same_indent_seq and ind == indent and self._is_item(text)):
                return self._block(i, ind)
        return None, i

    def _scalar(self, text):
        text = text.strip()
        if text.startswith("&"):
            name, _, rest = text[1:].partition(" ")
            value = self._scalar(rest)
            self.anchors[name] = value
            return value
        if text.startswith("*"):
            return self.anchors[text[1:]]
        if text.startswith("["):
            if not text.endswith("]"):
                raise ValueError("unsupported YAML flow sequence %r" % text)
            return [self._scalar(p) for p in self._split_flow(text[1:-1]) if p.strip()]
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        lowered = text.lower()
        if lowered in ("null", "~", ""):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    @staticmethod
    def _split_flow(text):
        parts, current, quote = [], "", None
        for ch in text:
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == ",":
                parts.append(current)
                current = ""
                continue
            current += ch
        parts.append(current)
        return parts
