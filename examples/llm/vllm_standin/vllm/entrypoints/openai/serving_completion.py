"""vLLM's OpenAIServingCompletion (stand-in): `/v1/completions`, whole or streamed as vLLM
streams it (one `data: {...}` event per token, an optional usage event, then `data: [DONE]`)."""

import json

from vllm import tokenize
from vllm.entrypoints.openai.protocol import _Response, now, random_id
from vllm.entrypoints.openai.serving_engine import OpenAIServing


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request, raw_request=None):
        error = self._check_model(request)
        if error is not None:
            return error
        prompt = request.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                return self.create_error_response("the vllm stand-in serves one prompt a request")
            prompt = prompt[0]
        params, error = self._sampling_params(request, prompt)
        if error is not None:
            return error
        rid, created = random_id("cmpl"), now()
        outputs = self.engine.generate({"prompt": prompt}, params, rid)
        if request.stream:
            return self._stream(request, rid, created, prompt, outputs)
        final = None
        async for final in outputs:
            pass
        out = final.outputs[0]
        return _Response(
            id=rid, object="text_completion", created=created, model=request.model,
            choices=[{"index": 0, "text": out.text, "logprobs": None,
                      "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                      "prompt_logprobs": None}],
            usage=_usage(len(tokenize(prompt)), len(out.token_ids)))

    async def _stream(self, request, rid, created, prompt, outputs):
        sent = 0
        final = None
        async for final in outputs:
            out = final.outputs[0]
            delta = out.text[sent:]
            sent = len(out.text)
            chunk = {"id": rid, "object": "text_completion", "created": created,
                     "model": request.model,
                     "choices": [{"index": 0, "text": delta, "logprobs": None,
                                  "finish_reason": out.finish_reason,
                                  "stop_reason": out.stop_reason}]}
            yield "data: %s\n\n" % json.dumps(chunk)
        if request.include_usage():
            chunk = {"id": rid, "object": "text_completion", "created": created,
                     "model": request.model, "choices": [],
                     "usage": _usage(len(tokenize(prompt)), len(final.outputs[0].token_ids))}
            yield "data: %s\n\n" % json.dumps(chunk)
        yield "data: [DONE]\n\n"
