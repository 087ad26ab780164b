"""vLLM's OpenAIServing base (stand-in): served model names, LoRA module paths, the model check
and prompt length limit shared by the completion and chat services."""

import dataclasses

from vllm import SamplingParams, tokenize
from vllm.entrypoints.openai.protocol import ErrorResponse, ModelList, now


@dataclasses.dataclass
class LoRAModulePath:
    name: str
    path: str
    base_model_name: str = None


@dataclasses.dataclass
class PromptAdapterPath:
    name: str
    local_path: str


class OpenAIServing:
    def __init__(self, engine, model_config, served_model_names, *, lora_modules=None,
                 prompt_adapters=None, request_logger=None, **_kw):
        self.engine = engine
        self.model_config = model_config
        self.max_model_len = model_config.max_model_len
        self.served_model_names = list(served_model_names)
        self.lora_requests = [m.name for m in (lora_modules or [])]

    async def show_available_models(self):
        names = self.served_model_names + self.lora_requests
        return ModelList(object="list", data=[
            {"id": n, "object": "model", "created": now(), "owned_by": "vllm",
             "root": self.served_model_names[0], "parent": None,
             "max_model_len": self.max_model_len} for n in names])

    def create_error_response(self, message, err_type="BadRequestError", status_code=400):
        return ErrorResponse(message=message, type=err_type, code=status_code)

    def _check_model(self, request):
        if request.model in self.served_model_names or request.model in self.lora_requests:
            return None
        return self.create_error_response(
            "The model `%s` does not exist." % request.model, "NotFoundError", 404)

    def _sampling_params(self, request, prompt):
        """SamplingParams for this request, or an ErrorResponse (vLLM's 400s: a prompt plus
        max_tokens over max_model_len, invalid sampling parameters)."""
        prompt_tokens = len(tokenize(prompt))
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_tokens
        if prompt_tokens + max_tokens > self.max_model_len:
            return None, self.create_error_response(
                "This model's maximum context length is %d tokens. However, you requested %d "
                "tokens (%d in the messages, %d in the completion). Please reduce the length of "
                "the messages or completion." % (self.max_model_len, prompt_tokens + max_tokens,
                                                prompt_tokens, max_tokens))
        try:
            return SamplingParams(n=request.n, max_tokens=max_tokens, stop=request.stop,
                                  temperature=request.temperature, top_p=request.top_p,
                                  seed=request.seed), None
        except ValueError as e:
            return None, self.create_error_response(str(e))
