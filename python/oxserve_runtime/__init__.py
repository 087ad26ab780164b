"""oxserve's Python worker runtime: TorchServe's worker protocol and handler API, standard library only."""

__version__ = "0.12.0"

from .service import PredictionException, send_intermediate_predict_response  # noqa: E402,F401
