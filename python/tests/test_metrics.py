"""context.metrics: declarations handed over by the server, and the [METRICS] lines it prints.

Run from python/: python3 -m unittest discover -s tests -t .
"""

import io
import json
import re
import unittest
from contextlib import redirect_stdout

from oxserve_runtime.metrics import Dimension, MetricsCache, MetricTypes

# What the server hands over (src/metrics/spec.rs, Spec::handler_metrics_json) for
# examples/custom_metrics/metrics.yaml-like declarations.
DECLARED = {
    "counter": [{"name": "InferenceCount", "unit": "count", "dimensions": ["ModelName", "Level"]}],
    "histogram": [{"name": "Tokens", "unit": "", "dimensions": ["ModelName"]}],
}

LINE = re.compile(r"^\[METRICS\](?P<name>[^.]+)\.(?P<unit>[^:]*):(?P<value>[^|]+)\|#(?P<dims>[^|]*)"
                  r"\|#type:(?P<type>[A-Z]+)\|#hostname:[^,]+,(?P<ts>\d+)(?:,(?P<req>.*))?$")


def printed(fn):
    """The [METRICS] lines `fn` prints."""
    out = io.StringIO()
    with redirect_stdout(out):
        fn()
    return [line for line in out.getvalue().splitlines() if line]


class Declarations(unittest.TestCase):
    def test_from_server_declares_what_the_json_says(self):
        cache = MetricsCache.from_server("m", {"OXSERVE_MODEL_METRICS": json.dumps(DECLARED)})
        counter = cache.get_metric("InferenceCount", MetricTypes.COUNTER)
        self.assertEqual(counter.dimension_names, ["ModelName", "Level"])
        self.assertEqual(counter.unit, "Count")
        hist = cache.get_metric("Tokens", "histogram")
        self.assertEqual(hist.metric_type, MetricTypes.HISTOGRAM)
        with self.assertRaises(KeyError):
            cache.get_metric("Tokens", MetricTypes.COUNTER)

    def test_no_declarations_without_the_variable(self):
        cache = MetricsCache.from_server("m", {})
        self.assertEqual(cache.cache, {})

    def test_an_unknown_type_is_refused(self):
        with self.assertRaises(ValueError):
            MetricsCache(model_name="m", declared={"summary": [{"name": "X"}]})


class Lines(unittest.TestCase):
    def setUp(self):
        self.cache = MetricsCache(model_name="mod", declared=DECLARED)
        self.cache.set_request_ids({0: "req-0", 1: "req-1"})

    def test_declared_counter_fills_model_name_and_level(self):
        lines = printed(lambda: self.cache.add_counter("InferenceCount", 2, idx=1))
        self.assertEqual(len(lines), 1)
        m = LINE.match(lines[0])
        self.assertIsNotNone(m, lines[0])
        self.assertEqual((m["name"], m["unit"], m["value"], m["type"]),
                         ("InferenceCount", "Count", "2", "COUNTER"))
        self.assertEqual(m["dims"], "ModelName:mod,Level:Model")
        self.assertEqual(m["req"], "req-1")

    def test_undeclared_metric_is_created_on_first_use(self):
        lines = printed(lambda: self.cache.add_time(
            "Step", 1.5, dimensions=[Dimension("Stage", "pre")]))
        m = LINE.match(lines[0])
        self.assertEqual((m["name"], m["unit"], m["type"]), ("Step", "Milliseconds", "GAUGE"))
        self.assertEqual(m["dims"], "Stage:pre,ModelName:mod,Level:Model")
        self.assertIn("Step", self.cache.cache[MetricTypes.GAUGE])

    def test_errors_are_logged_not_printed(self):
        counter = self.cache.get_metric("InferenceCount", MetricTypes.COUNTER)
        with self.assertLogs("oxserve_runtime.metrics", "ERROR"):
            self.assertEqual(printed(lambda: counter.add_or_update(-1, ["mod", "Model"])), [])
        with self.assertLogs("oxserve_runtime.metrics", "ERROR"):
            self.assertEqual(printed(lambda: counter.add_or_update(1, ["only one"])), [])

    def test_units_are_checked_for_times_and_sizes(self):
        with self.assertRaises(ValueError):
            self.cache.add_time("T", 1, unit="h")
        with self.assertRaises(ValueError):
            self.cache.add_size("S", 1, unit="TB")


if __name__ == "__main__":
    unittest.main()
