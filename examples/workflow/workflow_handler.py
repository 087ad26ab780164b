"""Function nodes of the example workflow (examples/workflow/echo_pipeline.yaml).

Each function is a node of the DAG: TorchServe (and oxserve) call it like a handler's handle,
with one dict per request of the batch. A node with one parent gets that parent's reply as
`body`; a node with several gets one parameter per parent, named after the parent node.
"""
import json


def _text(value):
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _json(value):
    if isinstance(value, (bytes, bytearray, str)):
        try:
            return json.loads(value)
        except ValueError:
            return _text(value)
    return value


def pre_processing(data, context):
    """Start node: wraps the request body for both branches."""
    if data is None:  # called once at load
        return None
    return [{"input": _text(row.get("body") if row.get("body") is not None else row.get("data"))}
            for row in data]


def post_processing(data, context):
    """Joins the two branches' replies (parameters `left` and `right`)."""
    if data is None:
        return None
    return [{"left": _json(row.get("left")), "right": _json(row.get("right"))} for row in data]
