"""Shim: TorchServe's streaming helper and reply encoder."""
from oxserve_runtime.protocol import create_predict_response  # noqa: F401
from oxserve_runtime.service import send_intermediate_predict_response  # noqa: F401
