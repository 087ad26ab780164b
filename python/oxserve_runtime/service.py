"""Loads the handler and serves batches over the frontend connection."""

import asyncio
import importlib
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback

from . import __version__
from .context import Context, RequestProcessor
from .metrics import MetricsCache
from .protocol import create_predict_response, encode_predict_reply, predict_item

logger = logging.getLogger("oxserve_runtime")

# TorchServe's built-in handler names: they need torch and TorchServe's own worker.
TORCHSERVE_HANDLERS = {"base_handler", "image_classifier", "image_segmenter", "object_detector",
                       "text_classifier", "text_handler", "vision_handler", "densenet_handler"}


# Printed on stdout and stderr around each batch ("<prefix>id1,id2" before, "<prefix>" after): the
# server attributes the lines in between to those requests (src/backend/python.rs). Within one pipe
# lines arrive in the order they were written, so this is exact where any timing would guess.
REQUEST_IDS_PREFIX = "[OXSERVE_REQUEST_IDS]"


def _mark_requests(ids):
    line = REQUEST_IDS_PREFIX + ids + "\n"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or replaced stream must not fail the batch


class PredictionException(Exception):
    """Raise from a handler to fail the batch with a chosen status code (TorchServe's class)."""

    def __init__(self, message, error_code=500):
        self.message = message
        self.error_code = error_code
        super().__init__(message)

    def __str__(self):
        return "%s : %s" % (self.message, self.error_code)


class LoadError(Exception):
    pass


def _send_lock(context):
    lock = getattr(context, "_oxserve_send_lock", None)
    if lock is None:
        lock = threading.Lock()
        context._oxserve_send_lock = lock
    return lock


class CoalescingWriter:
    """Async mode's way out to the frontend: frames written on the event loop's thread during one
    loop iteration are gathered and leave in few socket writes (at MAX_FRAMES frames, and at the
    start of the next iteration for the rest).

    After an engine step every running stream's handler coroutine wakes in the same iteration and
    sends its chunk. With a write per chunk (a syscall each, and each one waking the frontend's
    reader, which then competes with this process for the CPU) the last stream's chunk left a
    whole step of Python work plus 64 wake-ups after its token was made; coalesced, the step's
    chunks go out in a few writes of up to MAX_FRAMES frames.

    A frame written from another thread (a plain `def handle` runs on the executor) is sent at
    once, together with anything already buffered, so order is kept per connection and a busy
    event loop cannot hold back a thread's frames. Writes happen under the lock, so frames never
    interleave.

    No write ever waits for the socket: what it does not take at once is kept, in order, and
    sent by the event loop when the socket can take more (`add_writer`). The loop also reads the
    frontend's requests (oxserve_worker.serve_async), and the frontend does not read replies
    while it waits to write a request; a loop blocked in `sendall` with both socket buffers full
    (large requests in, long streams out) would wait for the frontend forever."""

    # A step's chunks leave in writes of at most this many frames: waiting for all 64 would make
    # the first streams wait for the last one's Python work; 16 (measured against 4 and no limit
    # with bench/llm_worker.py) keeps the wake-ups few and lets the first quarter go early.
    MAX_FRAMES = 16

    def __init__(self, sock, loop):
        self._sock = sock
        self._loop = loop
        self._lock = threading.Lock()
        self._frames = []
        self._scheduled = False
        self._limit = 1
        # Bytes the socket did not take yet, and whether the loop waits to send them.
        self._unsent = bytearray()
        self._watching = False
        # Made on the thread that then runs the loop (serve_async).
        self._loop_thread = threading.get_ident()

    def write(self, frame, now=False):
        """Queues a frame; `now` sends it (and any gathered before it) at once."""
        if now or threading.get_ident() != self._loop_thread:
            with self._lock:
                self._frames.append(frame)
                self._send_locked()
            return
        with self._lock:
            self._frames.append(frame)
            if len(self._frames) >= self._limit:
                self._send_locked()
                self._limit = min(self._limit * 4, self.MAX_FRAMES)
            if self._scheduled:
                return
            self._scheduled = True
        # call_soon runs after every callback already queued for this iteration: all the
        # coroutines woken by the same engine step get to add their frame first.
        self._loop.call_soon(self.flush)

    def flush(self):
        with self._lock:
            self._scheduled = False
            self._limit = 1
            self._send_locked()

    def pending(self):
        """Bytes written and not yet taken by the socket."""
        with self._lock:
            return len(self._unsent) + sum(len(f) for f in self._frames)

    def _send_locked(self):
        if not self._frames:
            return
        data = self._frames[0] if len(self._frames) == 1 else b"".join(self._frames)
        self._frames.clear()
        if self._unsent:  # earlier bytes still wait for the socket: these go after them
            self._unsent += data
            return
        try:
            sent = self._sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):
            self._unsent += data[sent:]
            self._loop.call_soon_threadsafe(self._watch)

    def _watch(self):
        with self._lock:
            if self._watching or not self._unsent:
                return
            self._watching = True
        self._loop.add_writer(self._sock.fileno(), self._writable)

    def _writable(self):
        with self._lock:
            try:
                sent = self._sock.send(self._unsent, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # The frontend is gone; the reader sees the end of the connection and stops.
                sent = len(self._unsent)
            del self._unsent[:sent]
            if self._unsent:
                return
            self._watching = False
        self._loop.remove_writer(self._sock.fileno())


# Under torchrun only rank 0 answers (TorchServe's rule). torchrun sets LOCAL_RANK before the
# worker starts, so it is read once, not on every streamed chunk.
_RANK_0 = os.environ.get("LOCAL_RANK", "0") in ("", "0")


def send_intermediate_predict_response(ret, req_id_map, message, code, context=None):
    """Sends one streamed part for each request of the batch before handle() returns."""
    if not _RANK_0:
        return None
    if context is None or context.cl_socket is None:
        raise RuntimeError("send_intermediate_predict_response needs the handler's context")
    frame = create_predict_response(ret, req_id_map, message, code, context, ts_stream_next=True)
    _send_frame(context, frame)
    return None


def _send_frame(context, frame, now=False):
    """Through async mode's coalescing writer, or straight onto the socket under its lock."""
    writer = getattr(context, "_oxserve_writer", None)
    if writer is not None:
        writer.write(frame, now=now)
        return
    with _send_lock(context):
        context.cl_socket.sendall(frame)


def send_intermediate_parts(parts, message="Intermediate Prediction success", urgent=False):
    """oxserve's runtime only (TorchServe's worker has no such call): one streamed part for each
    of many requests, each with its own context, in one reply frame. `parts` is a list of
    (context, idx, data), as send_intermediate_predict_response would send `{idx: data}` for
    that context. An engine that makes one token for every running sequence per step sends the
    step's chunks for all its streams with one call: one frame and one write instead of a
    handler coroutine step, a frame and a share of a write per stream. The frontend matches
    the parts by request id, as it does every frame in async mode.

    `urgent=True` (a step's first tokens, which users are waiting for) writes the frame at once,
    ahead of anything the writer still gathers, and then yields the CPU. The yield is for small
    hosts: the kernel wakes the frontend's reader on the CPU of the process that wrote to the
    socket (a "sync" wake-up, made on the guess that the writer is about to sleep), and if this
    process goes on building the step's other chunks, the frontend waits for it even with the
    other CPU idle. Measured on a 2-CPU host (docs/benchmarks.md): half of the steps' first
    tokens reached the frontend only after the rest of the step was built, 0.4-0.9 ms later.
    Where another CPU takes the frontend, the yield returns at once."""
    if not _RANK_0 or not parts:
        return None
    items = [predict_item(ctx.request_ids[idx], data, 200, ctx, idx, True)
             for ctx, idx, data in parts]
    frame = encode_predict_reply(200, message, items)
    context = parts[0][0]
    if context.cl_socket is None:
        raise RuntimeError("send_intermediate_parts needs the handlers' contexts")
    _send_frame(context, frame, now=urgent)
    if urgent:
        os.sched_yield()
    return None


def _import_handler(handler):
    """TorchServe's rules: `file.py`, `module`, `module:function`, `dir/file.py:function`."""
    module_name, _, function_name = handler.partition(":")
    if module_name.endswith(".py"):
        module_name = module_name[:-3]
    module_name = module_name.split("/")[-1]
    if not module_name:
        raise LoadError("the manifest names no handler")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            hint = ""
            if module_name in TORCHSERVE_HANDLERS:
                hint = (" (%r is one of TorchServe's built-in handlers; they need torch and "
                        "TorchServe's worker: set worker_runtime=torchserve)" % module_name)
            raise LoadError("handler module %r not found in the model folder%s"
                            % (module_name, hint)) from None
        raise
    return module, function_name or None


def _entry_points(module, function_name):
    """(handle callable, initialize callable or None) following TorchServe's model loader."""
    name = function_name or "handle"
    if hasattr(module, name):
        entry = getattr(module, name)
        init = getattr(module, "initialize", None) if not function_name else None
        if init is None:
            # TorchServe initialises a function entry point by calling it with data=None, and a
            # load whose call raises fails (a missing import, MemoryError): the worker reports it.
            # (Returned: an `async def handle` gives a coroutine, which the loader runs.)
            def init(ctx):
                return entry(None, ctx)
        return entry, init
    if function_name:
        raise LoadError("handler module %r has no function %r" % (module.__name__, function_name))
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__]
    if len(classes) != 1:
        raise LoadError("expected one class or a function named handle in handler module %r, "
                        "found classes %s" % (module.__name__, [c.__name__ for c in classes]))
    instance = classes[0]()
    if not hasattr(instance, "handle"):
        raise LoadError("class %s has no handle method" % classes[0].__name__)
    return instance.handle, getattr(instance, "initialize", None)


def _clone(context):
    """A shallow copy of the context, as copy.copy makes it but without its generic protocol
    (__reduce_ex__, copyreg): once per request in async mode, 64 at once at 64 streams."""
    ctx = object.__new__(type(context))
    ctx.__dict__.update(context.__dict__)
    return ctx


class Service:
    def __init__(self, msg, metrics_config):
        model_dir = msg["model_path"] or os.getcwd()
        if model_dir not in sys.path:
            sys.path.insert(0, model_dir)
        manifest = None
        manifest_file = os.path.join(model_dir, "MAR-INF", "MANIFEST.json")
        if os.path.exists(manifest_file):
            with open(manifest_file, encoding="utf-8") as f:
                manifest = json.load(f)
        # metrics.yaml's model_metrics, parsed by the server (the --metrics-config path is for
        # TorchServe's worker, which reads the file itself).
        self.metrics = MetricsCache.from_server(msg["model_name"])
        # The archive's model-config.yaml, parsed by the server (TorchServe's model_yaml_config).
        model_yaml_config = json.loads(os.environ.get("OXSERVE_MODEL_YAML_CONFIG") or "{}")
        self.context = Context(msg["model_name"], model_dir, manifest, msg["batch_size"],
                               msg["gpu_id"], __version__, msg["limit_max_image_pixels"],
                               self.metrics, model_yaml_config)
        module, function_name = _import_handler(msg["handler"])
        self.entry, init = _entry_points(module, function_name)
        # The event loop coroutine handlers run on, in every mode. It is the thread's current
        # loop before initialize runs, so a handler that calls asyncio.get_event_loop() there
        # (TorchServe's vllm_handler does) binds its engine to the loop requests later run on.
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # service_envelope (kserve, kservev2) wraps the entry point, as TorchServe's loader does.
        from .envelope import wrap  # here, not at the top: envelope imports this module
        self.entry = wrap(msg.get("envelope"), self.entry)
        # Asked once, not for every request in async mode (inspect's check is a few lookups).
        self._entry_is_coroutine = inspect.iscoroutinefunction(self.entry)
        if init is not None:
            ret = init(self.context)
            if inspect.isawaitable(ret):
                self.loop().run_until_complete(ret)

    def loop(self):
        """The service's event loop: where `async def` handlers and initialize run."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def predict(self, batch):
        """Runs handle() on one batch; returns the final reply frame. An `async def handle` is
        run to completion on the service's own event loop (classic mode: one batch at a time)."""
        _mark_requests(",".join(request["request_id"] for request in batch))
        try:
            ctx, req_id_map, data, start = self._prepare(batch, self.context)
            handler_start = time.time()
            try:
                ret = self.entry(data, ctx)
                if inspect.isawaitable(ret):
                    ret = self.loop().run_until_complete(ret)
            except BaseException as e:  # pylint: disable=broad-except
                return self._failed(e, req_id_map)
            return self._finish(ret, ctx, req_id_map, data, start, handler_start)
        finally:
            _mark_requests("")

    async def predict_async(self, batch, loop):
        """Async mode (`asyncCommunication: true`): one batch among many in flight. Each batch
        gets its own copy of the context (TorchServe's async_service does the same), so
        concurrent requests never see each other's ids or response headers. A plain `def
        handle` runs on a thread so that it cannot stall the other requests."""
        ctx, req_id_map, data, start = self._prepare(batch, _clone(self.context))
        handler_start = time.time()
        try:
            if self._entry_is_coroutine:
                ret = await self.entry(data, ctx)
            else:
                ret = await loop.run_in_executor(None, self.entry, data, ctx)
                if inspect.isawaitable(ret):
                    ret = await ret
        except Exception as e:  # pylint: disable=broad-except
            return self._failed(e, req_id_map)
        return self._finish(ret, ctx, req_id_map, data, start, handler_start)

    def _prepare(self, batch, ctx):
        start = time.time()
        req_id_map, processors, data = {}, [], []
        for idx, request in enumerate(batch):
            req_id_map[idx] = request["request_id"]
            inputs, headers = {}, {}
            for name, content_type, value in request["params"]:
                inputs[name] = value
                headers[name] = {"content-type": content_type}
            for name, value in request["headers"]:
                headers[name] = value
            processors.append(RequestProcessor(headers))
            data.append(inputs)
        ctx.request_ids = req_id_map
        ctx.request_processor = processors
        self.metrics.set_request_ids(req_id_map)
        return ctx, req_id_map, data, start

    @staticmethod
    def _failed(e, req_id_map):
        if isinstance(e, MemoryError):
            traceback.print_exc()
            return create_predict_response(None, req_id_map, "Out of resources", 507)
        if not isinstance(e, Exception):
            raise e
        traceback.print_exc()
        code = getattr(e, "error_code", None)
        if isinstance(code, int) and hasattr(e, "message"):
            return create_predict_response(None, req_id_map, str(e.message), code)
        if "CUDA" in str(e):
            return create_predict_response(None, req_id_map, "Out of resources", 507)
        return create_predict_response(None, req_id_map, "Prediction failed: %s: %s"
                                       % (type(e).__name__, e), 503)

    def _finish(self, ret, ctx, req_id_map, data, start, handler_start):
        handler_ms = round((time.time() - handler_start) * 1000, 2)
        if not isinstance(ret, list):
            return create_predict_response(
                None, req_id_map, "Invalid model predict output: handle() returned %s, expected a "
                "list with one reply per request" % type(ret).__name__, 503)
        if len(ret) != len(data):
            return create_predict_response(
                None, req_id_map, "number of batch response mismatched: handle() returned %d "
                "replies for a batch of %d requests" % (len(ret), len(data)), 503)
        self.metrics.add_time("HandlerTime", handler_ms, None, "ms")
        self.metrics.add_time("PredictionTime", round((time.time() - start) * 1000, 2), None, "ms")
        try:
            return create_predict_response(ret, req_id_map, "Prediction success", 200, ctx)
        except TypeError as e:
            logger.warning("cannot serialize the handler's output: %s", e)
            return create_predict_response(None, req_id_map, "Unsupported model output data "
                                           "type: %s" % e, 503)
