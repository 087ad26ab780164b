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
import traceback
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
        # Set by Engine.add: who takes this sequence's words (the engine's on_step, a step at a
        # time), the word of the latest step, and the future that ends with the sequence.
        self.listener = None
        self.word = None
        self.finished = None
        # Its consumer went away (the client disconnected): the engine drops it at its next step.
        self.aborted = False

    def end(self):
        """The sequence is over: ends generate()'s iterator, or resolves `finished`."""
        if self.finished is not None:
            if not self.finished.done():
                self.finished.set_result(self.finish_reason)
        else:
            self.put(None)

    def put(self, word):
        """Hands a word (None: the end) to the consumer, waking it if it waits."""
        self.out.append(word)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # a consumer cancelled while waiting leaves a cancelled one
                waiter.set_result(None)


class Engine:
    """`on_step`, if given, is called with the sequences added by `add` that got a word in a
    step (its `word`; `finish_reason` set on its last one): a server can then send a step's
    tokens together, as vLLM's engine hands a step's outputs over together. It is called at most
    twice per step: first, from inside the step, with the sequences admitted for it (their first
    tokens, which users are waiting for), then, once the engine is back to sleep, with the rest.

    Steps start every `step_s` like a GPU's, whatever the host does in between: handing a step's
    output to the server overlaps the next step (vLLM's async output processing) instead of
    lengthening it."""

    def __init__(self, max_num_seqs=64, step_s=0.01, on_step=None):
        self.on_step = on_step
        self.max_num_seqs = max(1, int(max_num_seqs))
        self.step_s = float(step_s)
        self.waiting = collections.deque()
        self.running = []
        self.wake = asyncio.Event()
        self.task = None
        self.steps = 0

    def add(self, prompt, max_tokens=16, stop=None, listener=None):
        """Queues a sequence whose words go to `on_step` (with `listener` on the sequence, for
        the caller to find its own state); returns it: `await seq.finished` waits for its end."""
        if self.on_step is None:
            raise RuntimeError("Engine.add needs an engine made with on_step")
        seq = Sequence(prompt, max(0, int(max_tokens)), stop)
        seq.listener = listener
        seq.finished = asyncio.get_running_loop().create_future()
        self._queue(seq)
        return seq

    def _queue(self, seq):
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.waiting.append(seq)
        self.wake.set()

    async def generate(self, prompt, max_tokens=16, stop=None):
        """Yields (word, sequence) per generated word; the sequence's finish_reason is set when
        the last word is yielded ("length" or "stop"). A consumer that stops early (cancelled,
        or closing the generator) frees the sequence's slot."""
        seq = Sequence(prompt, max(0, int(max_tokens)), stop)
        self._queue(seq)
        out = seq.out
        try:
            while True:
                if not out:
                    seq.waiter = asyncio.get_running_loop().create_future()
                    await seq.waiter
                word = out.popleft()
                if word is None:
                    return
                yield word, seq
        finally:
            if seq.finish_reason is None:
                self.abort(seq)

    def abort(self, seq):
        """Stops a sequence nobody waits for any more (its client went away, as vLLM's
        engine.abort): it leaves the batch at the next step, and its slot goes to a waiting one."""
        seq.aborted = True
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass

    async def _loop(self):
        next_step = None
        while True:
            if not self.running and not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                next_step = None
            # Refill freed slots from the waiting queue: continuous batching. The sequences
            # admitted now go first in the step's output, as vLLM's scheduler puts the prefills
            # ahead of the decodes: their first token is the one a user is waiting for, and
            # the server sends a step's chunks in this order.
            admitted = []
            while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
                admitted.append(self.waiting.popleft())
            if admitted:
                self.running = admitted + self.running
            # Steps follow each other every step_s, as on a GPU: the host's work on one step's
            # output (here: handing it to the server) overlaps the next step, as vLLM's async
            # output processing does, instead of lengthening it.
            if next_step is None:
                next_step = time.monotonic() + self.step_s
            await asyncio.sleep(max(0.0, next_step - time.monotonic()))
            self.steps += 1
            now = time.monotonic()
            next_step += self.step_s
            if next_step < now:  # the host fell a whole step behind: start again from now
                next_step = now + self.step_s
            # The sequences admitted for this step come first: their words are handed over as
            # soon as they are made, before the rest of the step is worked through (a user is
            # waiting for a first token; the others' next tokens can follow a moment later).
            running, self.running = self.running, []
            first = self._step(running[:len(admitted)], now)
            if first[0] or first[1]:
                self._hand_over(*first)
            rest = self._step(running[len(admitted):], now)
            if rest[0] or rest[1]:
                # Once this task has set the next step's timer and is back to sleep, as
                # generate()'s consumers run: the rest of the step's output waits for the
                # first tokens, not the engine for the rest.
                asyncio.get_running_loop().call_soon(self._hand_over, *rest)

    def _step(self, seqs, now):
        """One token for each of seqs; the running ones go back to self.running. Returns the
        sequences for on_step and those that ended."""
        stepped, ended = [], []
        still = self.running
        for seq in seqs:
            if seq.aborted:
                continue
            if seq.generated >= seq.max_tokens:
                seq.finish_reason = "length"
                self._retire(seq, ended)
                continue
            word = next_word(seq.prompt, seq.generated)
            seq.generated += 1
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.stop and word in seq.stop:
                seq.finish_reason = "stop"
            elif seq.generated >= seq.max_tokens:
                seq.finish_reason = "length"
            if seq.finished is not None:
                seq.word = word
                stepped.append(seq)
            else:
                seq.put(word)
            if seq.finish_reason:
                self._retire(seq, ended)
            else:
                still.append(seq)
        return stepped, ended

    @staticmethod
    def _retire(seq, ended):
        """A finished sequence ends now, or, fed to on_step, after its last words are handed over."""
        if seq.finished is not None:
            ended.append(seq)
        else:
            seq.end()

    def _hand_over(self, stepped, ended):
        # A sequence aborted since the step (the rest of a step is handed over a moment later)
        # has nobody to take its word.
        stepped = [seq for seq in stepped if not seq.aborted]
        if stepped:
            try:
                self.on_step(stepped)
            except Exception:  # pylint: disable=broad-except
                # One bad listener must not stop the engine for every other sequence.
                traceback.print_exc()
        for seq in ended:
            seq.end()
