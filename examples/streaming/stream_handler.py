"""Streaming: sends three intermediate parts per request, then the final one.

The server answers with a chunked HTTP response; every chunk but the last carries the header
`ts_stream_next: true`. The same handler works unchanged under TorchServe.
"""

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    texts = []
    for request in data:
        payload = request.get("body", request.get("data"))
        if isinstance(payload, (bytes, bytearray)):
            payload = payload.decode("utf-8", "replace")
        texts.append(str(payload))
    for part in range(3):
        send_intermediate_predict_response(
            ["%s: part %d\n" % (t, part + 1) for t in texts],
            context.request_ids, "Intermediate Prediction success", 200, context)
    return ["%s: done\n" % t for t in texts]
