"""Custom metrics: emits handler metrics with TorchServe's context.metrics API.

The metrics are declared under model_metrics in metrics.yaml (this folder); start the server with
`metrics_config=examples/custom_metrics/metrics.yaml` so that they reach /metrics.
"""

import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes


class MetricsHandler:
    def initialize(self, context):
        self.metrics = context.metrics
        # A declared metric with its own dimensions, updated through get_metric().
        self.input_chars = self.metrics.get_metric("InputChars", MetricTypes.HISTOGRAM)

    def handle(self, data, context):
        start = time.time()
        replies = []
        for idx, request in enumerate(data):
            payload = request.get("body", request.get("data"))
            text = payload if isinstance(payload, str) else str(payload)
            self.input_chars.add_or_update(len(text), [context.model_name, "Model"],
                                           context.get_request_id(idx))
            self.metrics.add_counter("InferenceRequestCount", 1, idx)
            self.metrics.add_size("InputSize", len(text.encode("utf-8")) / 1024, idx, unit="kB")
            replies.append({"chars": len(text)})
        self.metrics.add_percent("BatchFill", 100.0 * len(data) /
                                 max(1, context.system_properties.get("batch_size") or 1))
        self.metrics.add_time("PreprocessTime", round((time.time() - start) * 1000, 3),
                              dimensions=[Dimension("Stage", "pre")])
        return replies
