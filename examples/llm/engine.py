"""A toy continuous-batching "LLM engine": pure standard library, asyncio, words as tokens.

It behaves like vLLM's engine where it matters to a server: one loop runs generation steps; every
step emits one token for every running sequence; a finished sequence frees its slot and a waiting
one takes it at the next step (continuous batching), at most `max_num_seqs` run at once. The
"model" is deterministic: the n-th word of a completion is picked from a fixed vocabulary by the
prompt and n, so tests can predict every answer.
"""

import asyncio
import collections
import time
import zlib

VOCAB = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "judge boxing matches under bright summer skies").split()


def count_tokens(text):
    """Words are tokens."""
    return len(text.split())


def next_word(prompt, n):
    """The n-th generated word for this prompt (deterministic)."""
    return VOCAB[(zlib.crc32(prompt.encode("utf-8")) + 7 * n) % len(VOCAB)]


class Sequence:
    def __init__(self, prompt, max_tokens, stop):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.stop = stop
        self.generated = 0
        # The words made and not yet taken (None ends the sequence), and the future its consumer
        # waits on when there are none: an asyncio.Queue does the same with more Python per word.
        self.out = collections.deque()
        self.waiter = None
        self.arrived = time.monotonic()
        self.first_token_at = None
        self.finish_reason = None

    def put(self, word):
        """Hands a word (None: the end) to the consumer, waking it if it waits."""
        self.out.append(word)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # a consumer cancelled while waiting leaves a cancelled one
                waiter.set_result(None)


class Engine:
    def __init__(self, max_num_seqs=64, step_s=0.01):
        self.max_num_seqs = max(1, int(max_num_seqs))
        self.step_s = float(step_s)
        self.waiting = collections.deque()
        self.running = []
        self.wake = asyncio.Event()
        self.task = None
        self.steps = 0

    async def generate(self, prompt, max_tokens=16, stop=None):
        """Yields (word, sequence) per generated word; the sequence's finish_reason is set when
        the last word is yielded ("length" or "stop")."""
        seq = Sequence(prompt, max(0, int(max_tokens)), stop)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.waiting.append(seq)
        self.wake.set()
        out = seq.out
        while True:
            if not out:
                seq.waiter = asyncio.get_running_loop().create_future()
                await seq.waiter
            word = out.popleft()
            if word is None:
                return
            yield word, seq

    async def _loop(self):
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            # Refill freed slots from the waiting queue: continuous batching.
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.running.append(self.waiting.popleft())
            await asyncio.sleep(self.step_s)
            self.steps += 1
            still = []
            for seq in self.running:
                if seq.generated >= seq.max_tokens:
                    seq.finish_reason = "length"
                    seq.put(None)
                    continue
                word = next_word(seq.prompt, seq.generated)
                seq.generated += 1
                if seq.first_token_at is None:
                    seq.first_token_at = time.monotonic()
                if seq.stop and word in seq.stop:
                    seq.finish_reason = "stop"
                elif seq.generated >= seq.max_tokens:
                    seq.finish_reason = "length"
                seq.put(word)
                if seq.finish_reason:
                    seq.put(None)
                else:
                    still.append(seq)
            self.running = still
