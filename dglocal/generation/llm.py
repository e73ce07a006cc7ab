"""The high-level API, what `dglocal.load` returns: a runtime Model with generation on top (stream, generate,
generate_many, chat) and the seeds of requests that give none, drawn from the load seed.

    llm = dglocal.load("model.gguf", seed=0)
    print(llm.generate("Write a haiku", max_new_tokens=64).text)
    chat = llm.chat(); chat.send("Hello")

The runtime Model's own attributes and methods (tokenize, sequence, n_ctx, ...) read through."""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

from ..errors import ConfigError
from .chat import ChatSession
from .driver import generate_many, lease_free, stream
from .editing import edit_request, infill_request
from .request import SeedSource


class Exclusive:
    """One generation at a time on a model's cache. Another thread waits for its turn (its answer is the one it
    would get alone: each call has its own noise); the thread that holds it is refused, since waiting would never
    end (a stream still open when generate is called, two streams advanced in turn)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextmanager
    def hold(self, what: str):
        me = threading.get_ident()
        if self._owner == me:
            raise ConfigError(f"{what}: a generation of this model is still open in this thread (a stream not run "
                              "to its end): finish or close() it first, or use generate_many for several at once")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None


class LLM:
    def __init__(self, model, *, seed: int | None = None):
        self.model = model
        self.seeds = SeedSource(seed)
        self.exclusive = Exclusive()  # the model has one cache: generations take turns on it
        self._seq = None  # the sequence stream() reuses across calls (its prompt cache)
        self._users: list = []  # weak references to whoever holds one of the model's sequences, idle longest first

    def __getattr__(self, name):
        if name == "model":  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def close(self) -> None:
        self._seq = None
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stream(self, prompt, **options):
        """Generate after `prompt` (text or token ids); yields Step drafts, BlockText per block and a final
        Completion. Consecutive calls reuse the cached common prefix. The model is held from the first event to
        the end (or close())."""
        with self.exclusive.hold("stream"):
            yield from self._stream(prompt, options)

    def _stream(self, prompt, options):
        self.model.check_open()
        if self._seq is None or not self._seq.live:
            self._seq = self.lease(self)
        self.used(self)
        return stream(self.model, prompt, seq=self._seq, seeds=self.seeds, **options)

    def sequence(self, seq_id: int | None = None):
        """A lease on one of the model's sequences (runtime Model.sequence), yours until you release it: where
        none is free (or `seq_id` is not), an idle session or chat of this LLM gives its own back (it re-encodes
        its history when it next runs); sequences others hold are never taken."""
        self.model.check_open()
        with self.exclusive.hold("sequence"):
            return self.lease(None, seq_id)

    def lease(self, user, seq_id: int | None = None):
        """A sequence for `user` (this LLM's own session or one of its chats, None for a caller of sequence());
        the model is held by the caller: a free one, else the one whose user has been idle longest is released
        (that user re-encodes its history when it next runs). Nobody's sequence is taken while it generates."""
        if user is not None:
            self.used(user)
        mine = self._held_by(weakref.ref(user)) if user is not None else None
        while True:
            try:
                return self.model.sequence(seq_id)
            except ConfigError:
                idle = next((seq for seq in map(self._held_by, self._users) if seq is not None and seq.live and
                             seq is not mine and seq_id in (None, seq.seq_id)), None)
                if idle is None:
                    raise
                idle.release()

    def used(self, user) -> None:
        """`user` ran last (the longest idle is released first)."""
        self._users = [r for r in self._users if r() is not None and r() is not user] + [weakref.ref(user)]

    def _held_by(self, ref):
        user = ref() if ref is not None else None
        return None if user is None else user._seq if user is self else getattr(user, "seq", None)

    def generate(self, prompt, **options):
        """Run `stream` to the end: a Completion with text, tokens, finish_reason and stats. `draft=` (text or
        token ids) starts the canvases from it instead of noise (a warm start)."""
        with self.exclusive.hold("generate"):
            for event in self._stream(prompt, options):
                pass
        return event

    def edit(self, text: str, spans, *, prompt=None, room: int = 0, **options):
        """Re-noise the character `spans` [(start, end), ...] of `text` and denoise them, everything else pinned,
        after `prompt` (default: BOS alone): an Edited with the new text and its changes (generation.editing)."""
        req = edit_request(self.model, text, spans, prompt=prompt, room=room, **options)
        return req.result(self.generate(req.prompt, **req.options))

    def infill(self, prefix: str, suffix: str, *, max_middle: int | None = None, **options):
        """The middle between `prefix` and `suffix` (pinned after it): an Infilled with .middle and .text
        (middle + suffix)."""
        req = infill_request(self.model, prefix, suffix, max_middle=max_middle, **options)
        return req.result(self.generate(req.prompt, **req.options))

    def generate_many(self, prompts, *, seed: int | None = None, **options):
        """`generate` for every prompt, up to n_seq_max canvases per forward; with a seed, prompt i's noise comes
        from (seed, i): its result does not depend on the batch. A list of Completions."""
        self.model.check_open()
        with self.exclusive.hold("generate_many"):
            seqs = lease_free(self.model, self.model.n_seq_max) if len(self.model.held()) < self.model.n_seq_max \
                else [self.lease(None)]
            try:
                return generate_many(self.model, prompts, seed=seed, seeds=self.seeds, sequences=seqs, **options)
            finally:
                for seq in seqs:
                    seq.release()

    def chat(self, messages=None, **options) -> ChatSession:
        """A multi-turn ChatSession over the GGUF chat template that keeps the KV cache across turns."""
        self.model.check_open()
        return ChatSession(self.model, messages, seeds=self.seeds, exclusive=self.exclusive, owner=self,
                           **options)

    @property
    def session_sequence(self):
        """The sequence `stream` and `generate` reuse (None before the first call)."""
        return self._seq
