"""vLLM's OpenAIServingChat (stand-in): `/v1/chat/completions`, whole or streamed as vLLM streams
it (a first event with the assistant's role, one event per token, an optional usage event, then
`data: [DONE]`). The "chat template" joins the messages' contents."""

import json

from vllm import tokenize
from vllm.entrypoints.openai.protocol import _Response, now, random_id
from vllm.entrypoints.openai.serving_engine import OpenAIServing


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def _content(message):
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content)
    return content or ""


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine, model_config, served_model_names, response_role="assistant", *,
                 chat_template=None, **kw):
        super().__init__(engine, model_config, served_model_names, **kw)
        self.response_role = response_role
        self.chat_template = chat_template

    async def create_chat_completion(self, request, raw_request=None):
        error = self._check_model(request)
        if error is not None:
            return error
        prompt = " ".join(_content(m) for m in request.messages)
        params, error = self._sampling_params(request, prompt)
        if error is not None:
            return error
        rid, created = random_id("chat"), now()
        outputs = self.engine.generate({"prompt": prompt}, params, rid)
        if request.stream:
            return self._stream(request, rid, created, prompt, outputs)
        final = None
        async for final in outputs:
            pass
        out = final.outputs[0]
        return _Response(
            id=rid, object="chat.completion", created=created, model=request.model,
            choices=[{"index": 0,
                      "message": {"role": self.response_role, "content": out.text,
                                  "tool_calls": []},
                      "logprobs": None, "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason}],
            usage=_usage(len(tokenize(prompt)), len(out.token_ids)), prompt_logprobs=None)

    async def _stream(self, request, rid, created, prompt, outputs):
        def chunk(choices, **extra):
            return "data: %s\n\n" % json.dumps(dict(
                id=rid, object="chat.completion.chunk", created=created, model=request.model,
                choices=choices, **extra))

        yield chunk([{"index": 0, "delta": {"role": self.response_role, "content": ""},
                      "logprobs": None, "finish_reason": None}])
        sent = 0
        final = None
        async for final in outputs:
            out = final.outputs[0]
            delta = out.text[sent:]
            sent = len(out.text)
            yield chunk([{"index": 0, "delta": {"content": delta}, "logprobs": None,
                          "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}])
        if request.include_usage():
            yield chunk([], usage=_usage(len(tokenize(prompt)), len(final.outputs[0].token_ids)))
        yield "data: [DONE]\n\n"
