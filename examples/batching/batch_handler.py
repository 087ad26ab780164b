"""Batching: a class handler that processes the whole batch in one call.

Each reply says which batch it was part of, so clients can see server-side batching at work
(register the model with batch_size > 1 and max_batch_delay > 0).
"""


class BatchHandler:
    def __init__(self):
        self.batches = 0
        self.model_name = None

    def initialize(self, context):
        self.model_name = context.model_name
        self.max_batch_size = context.system_properties.get("batch_size")

    def handle(self, data, context):
        self.batches += 1
        size = len(data)
        replies = []
        for idx, request in enumerate(data):
            payload = request.get("body", request.get("data"))
            replies.append({
                "model": self.model_name,
                "request_id": context.get_request_id(idx),
                "input": payload if isinstance(payload, (str, int, float, list, dict)) else None,
                "batch_size": size,
                "max_batch_size": self.max_batch_size,
                "batch_number": self.batches,
            })
        return replies
