"""Shim: TorchServe's streaming helper."""
from oxserve_runtime.service import send_intermediate_predict_response  # noqa: F401
