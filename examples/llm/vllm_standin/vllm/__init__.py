"""A stand-in for the `vllm` package: just the API surface TorchServe's vllm_handler uses, on CPU.

TorchServe 0.12.0's `ts/torch_handler/vllm_handler.py` imports `AsyncEngineArgs`,
`AsyncLLMEngine` and vLLM's OpenAI serving classes (`vllm.entrypoints.openai.*`). Real vLLM needs a
GPU and model weights; this package lets that handler file run unchanged anywhere (tests,
benchmarks) with an engine that behaves like vLLM's where a server can tell:

- continuous batching: one loop runs generation steps; every step emits one token for every
  running sequence; a finished sequence frees its slot and a waiting one takes it at the next step;
  at most `max_num_seqs` run at once;
- `generate()` yields cumulative `RequestOutput`s, as vLLM's does, and aborts the sequence when its
  consumer goes away;
- words are tokens, and the "model" is deterministic: the n-th generated word is picked from a fixed
  vocabulary by the prompt and n, so tests can predict every answer.

Stand-in-only engine arguments (set them under `handler.vllm_engine_config` in model-config.yaml,
as any engine argument): `standin_step_ms` (one generation step, default 10 ms) and
`standin_first_step_after_seqs` (the engine takes its first step only once that many sequences
have arrived: a test proves with it that many requests are inside one worker at once, without
timing anything).
"""

import asyncio
import collections
import dataclasses
import time
import zlib
from typing import List, Optional

__version__ = "0.6.1.standin"

VOCAB = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "judge boxing matches under bright summer skies").split()


def tokenize(text):
    """Words are tokens."""
    return text.split()


def next_word(prompt, n):
    """The n-th generated word for this prompt (deterministic; tests recompute it)."""
    return VOCAB[(zlib.crc32(prompt.encode("utf-8")) + 7 * n) % len(VOCAB)]


@dataclasses.dataclass
class AsyncEngineArgs:
    """vLLM's engine arguments (the ones TorchServe's example sets, and the stand-in's own).
    Instance attributes, because the handler copies `vllm_engine_config` keys found in
    `vars(args)`."""

    model: str = "standin"
    served_model_name: Optional[List[str]] = None
    tokenizer: Optional[str] = None
    max_num_seqs: int = 256
    max_model_len: Optional[int] = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    trust_remote_code: bool = False
    disable_log_requests: bool = False
    standin_step_ms: float = 10.0
    standin_first_step_after_seqs: int = 0


class SamplingParams:
    """The sampling parameters a request sets. Validation raises ValueError, as vLLM's does (the
    serving classes turn it into a 400 ErrorResponse)."""

    def __init__(self, n=1, max_tokens=16, stop=None, temperature=1.0, top_p=1.0, seed=None,
                 **_ignored):
        if n != 1:
            raise ValueError("the vllm stand-in generates n=1 only, got n=%r" % (n,))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError("max_tokens must be at least 1, got %r." % (max_tokens,))
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        self.n = n
        self.max_tokens = max_tokens
        self.stop = list(stop)
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[str] = None


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclasses.dataclass
class ModelConfig:
    model: str
    max_model_len: int
    served_model_name: Optional[List[str]] = None


class _Sequence:
    def __init__(self, request_id, prompt, params):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(range(len(tokenize(prompt))))
        self.params = params
        self.words = []
        self.finish_reason = None
        self.stop_reason = None
        self.queue = asyncio.Queue()
        self.metrics = RequestMetrics(arrival_time=time.time())
        self.aborted = False

    def output(self):
        text = " ".join(self.words)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[CompletionOutput(0, text, list(range(len(self.words))),
                                      finish_reason=self.finish_reason,
                                      stop_reason=self.stop_reason)],
            finished=self.finish_reason is not None, metrics=self.metrics)


class AsyncLLMEngine:
    """One generation loop on the running event loop (started by the first request), stepping
    every running sequence at once: vLLM's continuous batching, without a model."""

    def __init__(self, args):
        self.args = args
        self.max_num_seqs = max(1, int(args.max_num_seqs))
        self.step_s = max(0.0, float(args.standin_step_ms) / 1000.0)
        self.gate = int(args.standin_first_step_after_seqs or 0)
        self.arrived = 0
        self.max_model_len = int(args.max_model_len or 4096)
        self.waiting = collections.deque()
        self.running = []
        self.wake = None
        self.task = None
        self.steps = 0
        self.max_batch_seen = 0

    @classmethod
    def from_engine_args(cls, engine_args, **_kwargs):
        return cls(engine_args)

    async def get_model_config(self):
        return ModelConfig(model=str(self.args.model), max_model_len=self.max_model_len,
                           served_model_name=self.args.served_model_name)

    async def get_tokenizer(self, lora_request=None):
        return None

    async def is_tracing_enabled(self):
        return False

    async def abort(self, request_id):
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                seq.aborted = True

    async def generate(self, inputs, sampling_params, request_id, lora_request=None, **_kw):
        """Yields the sequence's cumulative RequestOutput after every step that changed it; the
        last one has `finished` set."""
        prompt = inputs.get("prompt", "") if isinstance(inputs, dict) else str(inputs)
        seq = _Sequence(request_id, prompt, sampling_params)
        if self.wake is None:
            self.wake = asyncio.Event()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.arrived += 1
        self.waiting.append(seq)
        self.wake.set()
        try:
            while True:
                out = await seq.queue.get()
                yield out
                if out.finished:
                    return
        finally:
            # The consumer went away (client disconnected, handler failed): free the slot.
            seq.aborted = True

    async def _loop(self):
        while True:
            if (not self.running and not self.waiting) or self.arrived < self.gate:
                self.wake.clear()
                await self.wake.wait()
                continue
            self.gate = 0
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.running.append(self.waiting.popleft())
            self.max_batch_seen = max(self.max_batch_seen, len(self.running))
            await asyncio.sleep(self.step_s)
            self.steps += 1
            now = time.time()
            still = []
            for seq in self.running:
                if seq.aborted:
                    continue
                word = next_word(seq.prompt, len(seq.words))
                if word in seq.params.stop:
                    seq.finish_reason, seq.stop_reason = "stop", word
                else:
                    seq.words.append(word)
                    if len(seq.words) >= seq.params.max_tokens:
                        seq.finish_reason = "length"
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
                if seq.finish_reason:
                    seq.metrics.finished_time = now
                else:
                    still.append(seq)
                seq.queue.put_nowait(seq.output())
            self.running = still
