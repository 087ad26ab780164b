"""KServe v1 and v2 request envelopes (TorchServe's ts/torch_handler/request_envelope/), stdlib only.

The server sends `service_envelope` in the load message; the handler's entry point is wrapped so
that it sees the instances (v1) or the input tensors (v2) and its output is wrapped back into
the KServe reply. Differences from TorchServe's classes (docs/compatibility.md, "KServe"):
- no numpy: tensors are reshaped and typed in plain Python (same JSON out: numpy's int64 is
  INT64, float64 FP64, bool BOOL, str BYTES);
- every request of a batch is parsed, not only the first: the handler gets the instances of all
  of them in order, and each request gets back its own share of the outputs;
- a body that is not the envelope's JSON fails its batch with 400 and a message, not a 503
  from a Python traceback.
"""

import inspect
import json

from .service import PredictionException


def _body(row):
    data = row.get("data") or row.get("body")
    if isinstance(data, (bytes, bytearray)):
        try:
            data = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise PredictionException("the request body is not JSON: %s" % e, 400) from None
    if not isinstance(data, dict):
        raise PredictionException("the request body must be a JSON object", 400)
    return data


def _explain(context):
    return str(context.get_request_header(0, "explain")) == "True"


def _split(out, counts, what):
    if not isinstance(out, list) or len(out) != sum(counts):
        raise PredictionException(
            "the handler returned %s for %d %s; expected a list with one entry each"
            % (type(out).__name__ if not isinstance(out, list) else "%d entries" % len(out),
               sum(counts), what), 503)
    parts, at = [], 0
    for n in counts:
        parts.append(out[at:at + n])
        at += n
    return parts


class KServeEnvelope:
    """v1: {"instances": [...]} -> handler(instances) -> {"predictions"|"explanations": [...]}."""

    def __init__(self, handle_fn):
        self._handle_fn = handle_fn

    def _parse(self, data, context):
        counts, instances = [], []
        for row in data:
            body = _body(row)
            rows = body.get("instances")
            if not isinstance(rows, list):
                raise PredictionException(
                    'a KServe v1 request needs "instances": a JSON list', 400)
            counts.append(len(rows))
            instances.extend(rows)
        return instances, counts

    def _reply(self, out, counts, context):
        key = "explanations" if _explain(context) else "predictions"
        return [{key: part} for part in _split(out, counts, "instances")]


_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
              "FP16", "FP32", "FP64", "BYTES"}


def _flatten(value):
    if isinstance(value, (list, tuple)):
        flat = []
        for v in value:
            flat.extend(_flatten(v))
        return flat
    return [value]


def _reshape(flat, shape):
    if len(shape) <= 1:
        return list(flat)
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _datatype(flat):
    if flat and all(isinstance(v, bool) for v in flat):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return "INT64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        return "FP64"
    return "BYTES"


class KServev2Envelope:
    """v2: {"id", "inputs": [tensors]} -> handler(tensors) -> {"id", "model_name",
    "model_version", "outputs": [one tensor per input, named after it]}."""

    def __init__(self, handle_fn):
        self._handle_fn = handle_fn

    def _inputs(self, body):
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise PredictionException('a KServe v2 request needs "inputs": a non-empty list', 400)
        names = []
        for tensor in inputs:
            if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= set(tensor):
                raise PredictionException(
                    "each KServe v2 input needs name, shape, datatype and data", 400)
            shape, datatype = tensor["shape"], tensor["datatype"]
            if datatype not in _DATATYPES:
                raise PredictionException("KServe v2 datatype %r is not one of %s"
                                          % (datatype, ", ".join(sorted(_DATATYPES))), 400)
            if datatype == "BYTES":
                data = tensor["data"]
                tensor["data"] = data[0] if isinstance(data, list) and data else data
            else:
                if not isinstance(shape, list) or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                    raise PredictionException("KServe v2 shape must be a list of sizes", 400)
                flat = _flatten(tensor["data"])
                size = 1
                for d in shape:
                    size *= d
                if size != len(flat):
                    raise PredictionException(
                        "cannot reshape %d values of input %r into shape %s"
                        % (len(flat), tensor["name"], shape), 400)
                tensor["data"] = _reshape(flat, shape)
            names.append(tensor["name"])
        return inputs, names

    def _parse(self, data, context):
        bodies, counts, tensors, names = [], [], [], []
        for row in data:
            body = _body(row)
            inputs, row_names = self._inputs(body)
            bodies.append(body)
            counts.append(len(inputs))
            tensors.extend(inputs)
            names.append(row_names)
        return tensors, (bodies, counts, names)

    def _reply(self, out, state, context):
        bodies, counts, names = state
        model = (getattr(context, "manifest", None) or {}).get("model", {})
        replies = []
        for idx, (body, part, row_names) in enumerate(
                zip(bodies, _split(out, counts, "inputs"), names)):
            request_id = body.get("id")
            if not isinstance(request_id, str) or not request_id.strip():
                request_id = context.get_request_id(idx)
            outputs = []
            for item, name in zip(part, row_names):
                flat = _flatten(item)
                outputs.append({"name": name, "datatype": _datatype(flat), "data": flat,
                                "shape": [len(flat)]})
            replies.append({"id": request_id, "model_name": model.get("modelName"),
                            "model_version": model.get("modelVersion"), "outputs": outputs})
        return replies


class _Envelope:
    """Runs an envelope's _parse, the handler, then its _reply. An `async def handle` is
    awaited between the two (the envelope returns a coroutine the service runs on its loop),
    never wrapped as if its coroutine object were the output."""

    def __init__(self, envelope):
        self._envelope = envelope

    def handle(self, data, context):
        if not data:
            return self._envelope._handle_fn(data, context)
        inputs, state = self._envelope._parse(data, context)
        out = self._envelope._handle_fn(inputs, context)
        if inspect.isawaitable(out):
            return self._reply_later(out, state, context)
        return self._envelope._reply(out, state, context)

    async def handle_async(self, data, context):
        if not data:
            return await self._envelope._handle_fn(data, context)
        inputs, state = self._envelope._parse(data, context)
        out = await self._envelope._handle_fn(inputs, context)
        return self._envelope._reply(out, state, context)

    async def _reply_later(self, out, state, context):
        return self._envelope._reply(await out, state, context)


ENVELOPES = {"kserve": KServeEnvelope, "kservev2": KServev2Envelope}


def wrap(name, entry):
    """The entry point wrapped in the named envelope ("" or None: unchanged). The wrapper is an
    `async def` when the entry point is, so async mode awaits it on the event loop."""
    if not name:
        return entry
    cls = ENVELOPES.get(name)
    if cls is None:
        raise ValueError("unknown service_envelope %r" % name)
    wrapped = _Envelope(cls(entry))
    if inspect.iscoroutinefunction(entry):
        return wrapped.handle_async
    return wrapped.handle
