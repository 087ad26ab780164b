"""Echo: answers each request with its own payload (the `body` or `data` parameter).

JSON bodies come back as JSON, text as text, anything else as the same bytes.
"""


def handle(data, context):
    if data is None:  # TorchServe calls handle(None, context) once at load
        return None
    replies = []
    for request in data:
        payload = request.get("body")
        if payload is None:
            payload = request.get("data")
        if payload is None:
            payload = dict(request)  # form fields or query parameters
        replies.append(payload)
    return replies
