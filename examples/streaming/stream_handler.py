"""Streaming: sends three intermediate parts per request, then the final one.

The server answers with a chunked HTTP response; every chunk but the last carries the header
`ts_stream_next: true`. The same handler works unchanged under TorchServe.
Send `{"text": "...", "delay_ms": N}` to wait N ms between parts (as a token generator would).
"""

import time

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    texts = []
    delay = 0.0
    for request in data:
        payload = request.get("body", request.get("data"))
        if isinstance(payload, (bytes, bytearray)):
            payload = payload.decode("utf-8", "replace")
        if isinstance(payload, dict):
            delay = max(delay, float(payload.get("delay_ms", 0)) / 1000)
            payload = payload.get("text", "")
        texts.append(str(payload))
    for part in range(3):
        if part:
            time.sleep(delay)
        send_intermediate_predict_response(
            ["%s: part %d\n" % (t, part + 1) for t in texts],
            context.request_ids, "Intermediate Prediction success", 200, context)
    time.sleep(delay)
    return ["%s: done\n" % t for t in texts]
