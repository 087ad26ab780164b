"""vLLM's OpenAI request and response models (the stand-in's, without pydantic).

`model_validate` checks types as vLLM's pydantic models do and raises `ValidationError` (a
ValueError, as pydantic's is) on bad input: inside TorchServe's vllm_handler that escapes as an
exception, which TorchServe's worker answers for that request alone ("Prediction failed", 503).
Fields vLLM accepts but the stand-in does not use (temperature, top_p, ...) are accepted and
ignored; unknown fields are ignored, as vLLM does.
"""

import time
import uuid


class ValidationError(ValueError):
    pass


_MISSING = object()


def _check(name, value, kinds, optional):
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise ValidationError("%s: expected %s, got a boolean" % (name, kinds[0].__name__))
    if not isinstance(value, kinds):
        raise ValidationError("%s: expected %s, got %s" % (name, kinds[0].__name__,
                                                           type(value).__name__))
    return value


class _Request:
    # name -> (accepted types, optional, default); default _MISSING means required.
    FIELDS = {}

    @classmethod
    def model_validate(cls, obj):
        if not isinstance(obj, dict):
            raise ValidationError("%s: the body must be a JSON object" % cls.__name__)
        self = cls()
        for name, (kinds, optional, default) in cls.FIELDS.items():
            if name in obj:
                value = _check(name, obj[name], kinds, optional)
            elif default is _MISSING:
                raise ValidationError("%s: field required" % name)
            else:
                value = default
            setattr(self, name, value)
        so = self.stream_options
        if so is not None:
            _check("stream_options.include_usage", so.get("include_usage", False), (bool,), True)
        self._validate()
        return self

    def _validate(self):
        pass

    def include_usage(self):
        return bool(self.stream_options and self.stream_options.get("include_usage"))


_NUM = (int, float)
_COMMON = {
    "model": ((str,), False, _MISSING),
    "max_tokens": ((int,), True, None),
    "stream": ((bool,), True, False),
    "stream_options": ((dict,), True, None),
    "stop": ((str, list), True, None),
    "n": ((int,), True, 1),
    "temperature": (_NUM, True, None),
    "top_p": (_NUM, True, None),
    "seed": ((int,), True, None),
    "user": ((str,), True, None),
}


class CompletionRequest(_Request):
    FIELDS = dict(_COMMON, prompt=((str, list), False, _MISSING), max_tokens=((int,), True, 16))

    def _validate(self):
        if isinstance(self.prompt, list) and not all(isinstance(p, str) for p in self.prompt):
            raise ValidationError("prompt: expected a string or a list of strings")


class ChatCompletionRequest(_Request):
    FIELDS = dict(_COMMON, messages=((list,), False, _MISSING))

    def _validate(self):
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValidationError("messages.%d: expected an object with a role" % i)
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str)
                           for p in content):
                    raise ValidationError("messages.%d.content: bad content parts" % i)
            elif content is not None and not isinstance(content, str):
                raise ValidationError("messages.%d.content: expected a string" % i)


class _Response:
    def __init__(self, **fields):
        self.__dict__.update(fields)

    def model_dump(self):
        return dict(self.__dict__)


class ErrorResponse(_Response):
    """{"object": "error", "message": ..., "type": "BadRequestError", "param": null, "code": 400}"""

    def __init__(self, message, type="BadRequestError", code=400):
        super().__init__(object="error", message=message, type=type, param=None, code=code)


class ModelList(_Response):
    pass


def random_id(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex)


def now():
    return int(time.time())
