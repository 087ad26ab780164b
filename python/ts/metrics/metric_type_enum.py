"""Shim: TorchServe's MetricTypes."""
from oxserve_runtime.metrics import MetricTypes  # noqa: F401
