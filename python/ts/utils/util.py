"""Shim: TorchServe's PredictionException (fails a batch with its error_code)."""
from oxserve_runtime.service import PredictionException  # noqa: F401
