"""An OpenAI-shaped LLM deployment that runs on CPU in under a second: examples/llm.

The handler is an `async def handle` served in async mode (`asyncCommunication: true` in
model-config.yaml): oxserve sends each request to the worker as it arrives, and the toy engine
(engine.py, continuous batching, words as tokens) generates for all of them at once. Routes, by
the extra path of `/predictions/llm/1.0/<path>` (TorchServe passes it as the `url_path` header):

- `v1/completions`: `{"prompt": "...", "max_tokens": 16, "stream": false, "stop": [...]}`
- `v1/chat/completions`: `{"messages": [{"role": "user", "content": "..."}], ...}`

Replies have OpenAI's shape with a `usage` object; with `"stream": true` they are Server-Sent
Events (`data: {...}` per token, then `data: [DONE]`), one HTTP chunk per event. The first part
carries the header `x-engine-ttft-ms`: the engine's own time to first token, and the wall-clock
times (epoch seconds) of the request entering the handler (`x-handler-start`) and of its first
token (`x-engine-first-token`), which bench/llm_stream.py compares with what clients see.

Under oxserve's own runtime a streamed request's words do not travel through its coroutine: the
engine hands each step's words for every streamed sequence to `_on_step` at once, which sends
them in one frame (`send_intermediate_parts`), the way vLLM's engine outputs a whole step; the
request's coroutine just waits for its sequence to end and answers `[DONE]`. Under TorchServe's
worker (no such call) each coroutine sends its own chunks.
"""

import asyncio
import json
import os
import time
import types

from engine import Engine, count_tokens
from ts.handler_utils.utils import send_intermediate_predict_response

try:
    # oxserve's runtime: one frame for one engine step's chunks of every stream.
    from oxserve_runtime.service import send_intermediate_parts
except ImportError:  # TorchServe's worker: a frame per chunk, from each request's coroutine
    send_intermediate_parts = None

MAX_TOKENS_LIMIT = 4096

# Stand-ins for a stream's id and creation time in its chunk template (_templates).
_ID, _CREATED = json.dumps("\x01"), json.dumps("\x02")


class LlmHandler:
    # First tokens leave in frames of this many: when many streams start in the same step (64
    # requests arriving together), the first ones need not wait for the last one's chunk to be
    # built (measured against 4, 64 and growing groups: docs/benchmarks.md).
    FIRSTS_PER_FRAME = 8

    def __init__(self):
        self.engine = None
        self.model_name = "llm"
        self.default_max_tokens = 16

    def initialize(self, context):
        cfg = (context.model_yaml_config or {}).get("handler", {}) or {}
        # With oxserve's runtime, streamed sequences' words come a whole step at a time
        # (_on_step) and leave in one frame; otherwise each stream's coroutine sends its own.
        on_step = self._on_step if send_intermediate_parts is not None else None
        self.engine = Engine(cfg.get("max_num_seqs", 64), cfg.get("step_ms", 10) / 1000.0,
                             on_step)
        self.default_max_tokens = int(cfg.get("max_tokens", 16))
        self.model_name = context.model_name
        # Every streamed chunk but the last differs only in its text (and its stream's id and
        # creation time): the JSON around them is made once here, for completions and for chat,
        # as (head, tail) around the text; a stream fills in its id and time, a token its text.
        # (The text is the chunk's last string: rpartition finds it whatever the model is called.)
        self._templates = {}
        for chat in (False, True):
            head, _, tail = json.dumps(self._chunk("\x01", "\x02", chat, "\x00", None)).rpartition(
                json.dumps("\x00"))
            self._templates[chat] = ("data: " + head, tail + "\n\n")

    async def handle(self, data, context):
        if data is None:
            return None
        # TorchServe's async worker sends one request per message (batchSize 1, as vLLM's): that
        # one is awaited directly, since gather would wrap it in a task of its own and start it
        # a loop iteration later. A larger batch is generated concurrently all the same.
        if len(data) == 1:
            return [await self._one(0, data[0], context)]
        return list(await asyncio.gather(
            *(self._one(i, request, context) for i, request in enumerate(data))))

    async def _one(self, idx, request, context):
        handler_start = time.time()
        path = (context.get_request_header(idx, "url_path") or "v1/completions").strip("/")
        body = request.get("body", request.get("data"))
        if isinstance(body, (bytes, bytearray)):
            body = json.loads(body.decode("utf-8"))
        if not isinstance(body, dict):
            return self._error(context, idx, 400, "the body must be a JSON object")
        chat = path == "v1/chat/completions"
        if not chat and path != "v1/completions":
            return self._error(context, idx, 404, "unknown route %r" % path)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return self._error(context, idx, 400, "messages must be a non-empty list")
            prompt = " ".join([str(m.get("content", "")) for m in messages if isinstance(m, dict)])
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return self._error(context, idx, 400, "prompt must be a string")
        max_tokens = body.get("max_tokens", self.default_max_tokens)
        if not isinstance(max_tokens, int) or not 0 <= max_tokens <= MAX_TOKENS_LIMIT:
            return self._error(context, idx, 400, "max_tokens must be an integer from 0 to %d"
                               % MAX_TOKENS_LIMIT)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else None
        stream = bool(body.get("stream", False))
        rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex()
        created = int(time.time())
        prompt_tokens = count_tokens(prompt)
        words, seq = [], None
        first = True
        if stream:
            context.set_response_content_type(idx, "text/event-stream")
            # This stream's JSON around a token's text: the handler's template (initialize)
            # with the stream's id and creation time filled in.
            head, tail = self._templates[chat]
            head = head.replace(_ID, '"%s"' % rid, 1).replace(_CREATED, str(created), 1)
            request_ids = {idx: context.request_ids[idx]}
            if self.engine.on_step is not None:
                # (Not a class of this module: TorchServe's loader wants exactly one class here.)
                state = types.SimpleNamespace(
                    context=context, idx=idx, rid=rid, created=created, chat=chat, head=head,
                    tail=tail, prompt_tokens=prompt_tokens, handler_start=handler_start, words=0)
                seq = self.engine.add(prompt, max_tokens, stop, state)
                try:
                    await seq.finished
                except asyncio.CancelledError:
                    # The client went away (oxserve cancels the request): free the slot.
                    self.engine.abort(seq)
                    raise
                return "data: [DONE]\n\n"
        async for word, seq in self.engine.generate(prompt, max_tokens, stop):
            words.append(word)
            if not stream:
                continue
            if first:
                ttft = (seq.first_token_at - seq.arrived) * 1000
                context.set_response_header(idx, "x-engine-ttft-ms", "%.3f" % ttft)
                first_wall = time.time() - (time.monotonic() - seq.first_token_at)
                context.set_response_header(idx, "x-handler-start", "%.6f" % handler_start)
                context.set_response_header(idx, "x-engine-first-token", "%.6f" % first_wall)
            text = word if first else " " + word
            first = False
            if seq.finish_reason:
                chunk = self._chunk(rid, created, chat, text, seq.finish_reason)
                chunk["usage"] = self._usage(prompt_tokens, len(words))
                event = "data: %s\n\n" % json.dumps(chunk)
            else:
                event = head + json.dumps(text) + tail
            send_intermediate_predict_response(
                {idx: event}, request_ids, "Intermediate Prediction success", 200, context)
        finish = (seq.finish_reason if seq else None) or "length"
        if stream:
            return "data: [DONE]\n\n"
        text = " ".join(words)
        usage = self._usage(prompt_tokens, len(words))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        context.set_response_content_type(idx, "application/json")
        return json.dumps({"id": rid, "object": obj, "created": created,
                           "model": self.model_name, "choices": [choice], "usage": usage})

    def _on_step(self, seqs):
        """Words of one engine step for streamed sequences: their SSE events in one frame. First
        tokens (the engine hands them over on their own, ahead of the rest of the step, and
        puts them first) are sent at once with the CPU yielded (`urgent`), in frames of
        FIRSTS_PER_FRAME, since a user is waiting for them, while the other streams' next
        tokens can follow a moment later."""
        firsts = 0
        while firsts < len(seqs) and seqs[firsts].listener.words == 0:
            firsts += 1
        for i in range(0, firsts, self.FIRSTS_PER_FRAME):
            self._send_step(seqs[i:min(firsts, i + self.FIRSTS_PER_FRAME)], urgent=True)
        if firsts < len(seqs):
            self._send_step(seqs[firsts:])

    def _send_step(self, seqs, urgent=False):
        parts = []
        for seq in seqs:
            st = seq.listener
            first = st.words == 0
            st.words += 1
            if first:
                ctx, idx = st.context, st.idx
                ctx.set_response_header(idx, "x-engine-ttft-ms",
                                        "%.3f" % ((seq.first_token_at - seq.arrived) * 1000))
                first_wall = time.time() - (time.monotonic() - seq.first_token_at)
                ctx.set_response_header(idx, "x-handler-start", "%.6f" % st.handler_start)
                ctx.set_response_header(idx, "x-engine-first-token", "%.6f" % first_wall)
            text = seq.word if first else " " + seq.word
            if seq.finish_reason:
                chunk = self._chunk(st.rid, st.created, st.chat, text, seq.finish_reason)
                chunk["usage"] = self._usage(st.prompt_tokens, st.words)
                event = "data: %s\n\n" % json.dumps(chunk)
            else:
                event = st.head + json.dumps(text) + st.tail
            parts.append((st.context, st.idx, event))
        send_intermediate_parts(parts, urgent=urgent)

    def _chunk(self, rid, created, chat, text, finish):
        if chat:
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": self.model_name,
                "choices": [choice]}

    @staticmethod
    def _usage(prompt_tokens, completion_tokens):
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def _error(context, idx, code, message):
        context.set_response_status(code, message, idx)
        context.set_response_content_type(idx, "application/json")
        return json.dumps({"object": "error", "message": message, "code": code})
