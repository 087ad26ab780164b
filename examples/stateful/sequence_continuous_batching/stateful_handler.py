"""TorchServe's examples/stateful/sequence_continuous_batching handler for oxserve's own runtime.

Sequence batching plus continuous batching: a session is opened by a request without a
sequence id (the server gives one and marks the request with the start header), every request
adds its number to the session's sum, and:
- an even number is answered at once with the new sum;
- an odd number streams the sum once per step until `stream_steps` steps have run;
- -1 cancels the session's running streams (they end with their current value, the cancel
  request answers -1);
- 0 ends the session: the reply sets the `ts_request_sequence_end` header, which closes it in
  the server.
The per-request decision is made by `context.stopping_criteria`, as in TorchServe. TorchServe's
version needs BaseHandler (torch) and lru-dict; this one is standard library only and takes
`handler.stream_steps` / `handler.stream_step_seconds` from model-config.yaml (TorchServe's are
fixed at 10 steps of 1 s).
"""

import logging
import time
from collections import OrderedDict

logger = logging.getLogger(__name__)


# The same lru() as ../sequence_batching/stateful_handler.py: each example is one handler file that its
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
        self.steps = 10
        self.step_seconds = 1.0
        self.initialized = False

    def initialize(self, ctx):
        # ctx.cache holds two kinds of keys: a sequence id -> the session's status (start, end,
        # cancel, requests running); a request id -> its streaming status.
        ctx.cache = {}
        self.context = ctx
        conf = (ctx.model_yaml_config or {}).get("handler") or {}
        self.cache = lru(conf.get("cache", {}).get("capacity", StatefulHandler.DEFAULT_CAPACITY))
        self.steps = int(conf.get("stream_steps", 10))
        self.step_seconds = float(conf.get("stream_step_seconds", 1.0))
        self.initialized = True

    def preprocess(self, data):
        results = []
        for idx, row in enumerate(data):
            sequence_id = self.context.get_sequence_id(idx)
            # Sticky routers find the session from the reply header.
            self.context.set_response_header(idx, self.context.header_key_sequence_id, sequence_id)
            if self.context.get_request_header(idx, self.context.header_key_sequence_start):
                prev = 0
                self.context.cache[sequence_id] = {
                    "start": True, "cancel": False, "end": False, "num_requests": 0}
            elif self.cache.has_key(sequence_id):
                prev = int(self.cache[sequence_id])
            else:
                prev = None
                logger.error("Not received sequence_start request for sequence_id:%s before",
                             sequence_id)

            req_id = self.context.get_request_id(idx)
            if req_id not in self.context.cache:
                logger.info("received a new request sequence_id=%s, request_id=%s",
                            sequence_id, req_id)
                request = row.get("data") or row.get("body")
                if isinstance(request, (bytes, bytearray)):
                    request = request.decode("utf-8")
                self.context.cache[req_id] = {
                    "stopping_criteria": self._create_stopping_criteria(req_id, sequence_id),
                    "stream": True,
                }
                session = self.context.cache.setdefault(
                    sequence_id, {"start": False, "cancel": False, "end": False,
                                  "num_requests": 0})
                session["num_requests"] += 1
                if isinstance(request, dict) and "input" in request:
                    request = request.get("input")

                if int(request) == -1:  # cancel
                    session["cancel"] = True
                    self.context.cache[req_id]["stream"] = False
                    results.append(int(request))
                elif prev is None:
                    logger.info("Close the sequence:%s without open session request", sequence_id)
                    session["end"] = True
                    self.context.cache[req_id]["stream"] = False
                    self.context.set_response_header(
                        idx, self.context.header_key_sequence_end, sequence_id)
                    results.append(int(request))
                else:
                    val = prev + int(request)
                    self.cache[sequence_id] = val
                    if int(request) == 0:  # end
                        session["end"] = True
                        self.context.cache[req_id]["stream"] = False
                        self.context.set_response_header(
                            idx, self.context.header_key_sequence_end, sequence_id)
                    elif int(request) % 2 == 0:  # not streamed
                        self.context.cache[req_id]["stream"] = False
                    results.append(val)
            else:
                # A running stream's next step.
                time.sleep(self.step_seconds)
                results.append(prev)
        return results

    def inference(self, data):
        return data

    def postprocess(self, data):
        self.context.stopping_criteria = [
            self.context.cache[req_id]["stopping_criteria"]
            for req_id in self.context.request_ids.values()
        ]
        return data

    def handle(self, data, context):
        self.context = context
        return self.postprocess(self.inference(self.preprocess(data)))

    def clean_up(self, seq_id, req_id, del_seq):
        self.context.cache[seq_id]["num_requests"] -= 1
        if self.context.cache[seq_id]["num_requests"] == 0 and del_seq:
            del self.context.cache[seq_id]
        del self.context.cache[req_id]

    def _create_stopping_criteria(self, req_id, seq_id):
        outer = self

        class StoppingCriteria:
            def __init__(self):
                self.counter = outer.steps

            def __call__(self, res):
                cache = outer.context.cache
                if cache[seq_id]["end"]:
                    ret = True if cache[req_id]["stream"] else None
                    outer.clean_up(seq_id, req_id, True)
                    return ret
                if cache[seq_id]["cancel"]:
                    ret = True if cache[req_id]["stream"] else None
                    outer.clean_up(seq_id, req_id, False)
                    if cache[seq_id]["num_requests"] == 0:
                        cache[seq_id]["cancel"] = False
                    return ret
                if cache[seq_id]["start"]:
                    outer.clean_up(seq_id, req_id, False)
                    cache[seq_id]["start"] = False
                    return None
                if not cache[req_id]["stream"]:
                    outer.clean_up(seq_id, req_id, False)
                    return None
                if self.counter == 0:
                    outer.clean_up(seq_id, req_id, False)
                    return True
                self.counter -= 1
                return False

        return StoppingCriteria()
