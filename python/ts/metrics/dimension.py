"""Shim: TorchServe's Dimension."""
from oxserve_runtime.metrics import Dimension  # noqa: F401
