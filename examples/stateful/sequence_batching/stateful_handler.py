"""TorchServe's examples/stateful/sequence_batching handler for oxserve's own Python runtime.

Each request carries a number; the reply is the running sum of its sequence (session). The sum
lives in this worker's memory, keyed by `context.get_sequence_id(idx)`: that only works because
sequence batching sends every request of a session to the same worker, one at a time and in
order. TorchServe's version extends BaseHandler (torch) and keeps the sums in an `lru-dict`; this
one needs only the standard library (an OrderedDict as the LRU) and behaves the same.
"""

import logging
from collections import OrderedDict

logger = logging.getLogger(__name__)


# The same lru() as ../sequence_continuous_batching/stateful_handler.py: each example is one handler file that its
# archive carries alone (as TorchServe's two examples each carry their own code), so it is not shared.
def lru(capacity):
    """The part of lru-dict's LRU the example uses, as a bounded OrderedDict (a function, not a
    class: the runtime, like TorchServe's, takes the handler module's only class as the handler)."""

    class _LRU(OrderedDict):
        def has_key(self, key):
            return key in self

        def __getitem__(self, key):
            self.move_to_end(key)
            return OrderedDict.__getitem__(self, key)

        def __setitem__(self, key, value):
            OrderedDict.__setitem__(self, key, value)
            self.move_to_end(key)
            while len(self) > cap:
                self.popitem(last=False)

    cap = max(1, int(capacity))
    return _LRU()


class StatefulHandler:
    DEFAULT_CAPACITY = 10

    def __init__(self):
        self.cache = None
        self.context = None
        self.initialized = False

    def initialize(self, ctx):
        self.context = ctx
        capacity = StatefulHandler.DEFAULT_CAPACITY
        try:
            capacity = int(ctx.model_yaml_config["handler"]["cache"]["capacity"])
        except (KeyError, TypeError, ValueError):
            logger.error("No cache capacity was set! Using default value.")
        self.cache = lru(capacity)
        self.initialized = True

    def preprocess(self, data):
        results = []
        for idx, row in enumerate(data):
            sequence_id = self.context.get_sequence_id(idx)
            prev = int(self.cache[sequence_id]) if self.cache.has_key(sequence_id) else 0
            request = row.get("data") or row.get("body")
            if isinstance(request, (bytes, bytearray)):
                request = request.decode("utf-8")
            val = prev + int(request)
            self.cache[sequence_id] = val
            results.append(val)
        return results

    def inference(self, data):
        return data

    def postprocess(self, data):
        return data

    def handle(self, data, context):
        self.context = context
        return self.postprocess(self.inference(self.preprocess(data)))
