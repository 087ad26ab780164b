"""Shim of TorchServe's `ts` package, on sys.path only inside oxserve's worker runtime, so that
TorchServe-style handlers import unchanged. It holds only the pieces handlers use; TorchServe's
built-in handlers (ts.torch_handler) need torch and TorchServe's own worker."""

__version__ = "0.12.0"
