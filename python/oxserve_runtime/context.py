"""The `context` object handed to handlers, with TorchServe's attributes and methods."""

import os


class RequestProcessor:
    """Per-request state of one batch: request headers in, status and headers out."""

    def __init__(self, request_headers):
        self._request_headers = request_headers
        self._status_code = 200
        self._reason_phrase = None
        self._response_headers = {}
        # Set once a streamed part of this request has carried the response headers to the
        # frontend (protocol.create_predict_response): later parts send only ts_stream_next.
        self.headers_sent = False

    def get_request_property(self, key):
        return self._request_headers.get(key)

    def get_request_properties(self):
        return self._request_headers

    def report_status(self, code, reason_phrase=None):
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self):
        return self._status_code

    def get_response_status_phrase(self):
        return self._reason_phrase

    def add_response_property(self, key, value):
        self._response_headers[key] = value

    def get_response_headers(self):
        return self._response_headers

    def get_response_header(self, key):
        return self._response_headers.get(key)


class Context:
    """What a handler knows about its model and the batch being served."""

    def __init__(self, model_name, model_dir, manifest, batch_size, gpu, server_version,
                 limit_max_image_pixels=True, metrics=None, model_yaml_config=None):
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": server_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.model_yaml_config = model_yaml_config or {}
        self.request_ids = None
        self.request_processor = None
        self.metrics = metrics
        self.cl_socket = None
        # Continuous batching (TorchServe's): per request of the batch, a function of its reply
        # that says whether the request is done (False keeps it in the worker's batch).
        self.stopping_criteria = None
        # Sequence batching (stateful sessions): the header names TorchServe's ts/context.py
        # reads, with the same environment overrides. The server sets the id (and the start
        # mark on a session's first request); a handler sets the end header to close sessions.
        self.header_key_sequence_id = os.getenv("TS_REQUEST_SEQUENCE_ID", "ts_request_sequence_id")
        self.header_key_sequence_start = os.getenv(
            "TS_REQUEST_SEQUENCE_START", "ts_request_sequence_start")
        self.header_key_sequence_end = os.getenv(
            "TS_REQUEST_SEQUENCE_END", "ts_request_sequence_end")

    @property
    def system_properties(self):
        return self._system_properties

    def get_request_id(self, idx=0):
        if self.request_ids is None:
            return None
        return self.request_ids.get(idx)

    def get_request_header(self, idx, key):
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx):
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx, value):
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx):
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx):
        rp = self.request_processor[idx]
        return rp.get_response_status_code(), rp.get_response_status_phrase()

    def set_response_status(self, code=200, phrase="", idx=0):
        if self.request_processor is not None and self.request_processor[idx] is not None:
            self.request_processor[idx].report_status(code, reason_phrase=phrase)

    def set_all_response_status(self, code=200, phrase=""):
        for rp in self.request_processor or []:
            rp.report_status(code, reason_phrase=phrase)

    def get_response_headers(self, idx):
        return self.request_processor[idx].get_response_headers()

    def set_response_header(self, idx, key, value):
        self.request_processor[idx].add_response_property(key, value)

    def get_sequence_id(self, idx):
        """The session id of request `idx` (sequence batching), None outside a session."""
        return self.request_processor[idx].get_request_property(self.header_key_sequence_id)
