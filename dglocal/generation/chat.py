"""Conversations: the GGUF chat template rendered in one place (jinja2, sandboxed), and a multi-turn session
that keeps its sequence across turns, so each turn encodes only what differs from what the cache holds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext

from ..errors import BackendError, ConfigError, ModelError
from .driver import stream
from .events import Event
from .grammar import MAX_JSON_DEPTH, check_depth


class ChatTemplate:
    """A model's `tokenizer.chat_template`, compiled once."""

    def __init__(self, source: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ConfigError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ModelError(f"the chat template does not compile: {e}") from None

    @classmethod
    def of(cls, model) -> ChatTemplate | None:
        source = model.metadata.get("tokenizer.chat_template")
        return cls(source) if source else None

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True, **kwargs) -> str:
        import jinja2

        # the template's macros recurse on nested values: bounded before it runs (a deep one overflowed it)
        check_depth(list(messages), MAX_JSON_DEPTH, "messages")
        if kwargs.get("tools") is not None:
            check_depth(kwargs["tools"], MAX_JSON_DEPTH, "tools")
        # BOS comes from the tokenizer (add_special), not from the template's bos_token
        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        **{"bos_token": "", **kwargs})
        # the messages are the caller's: one the template cannot read (tool_calls that are not a list, say)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
            raise ConfigError(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None

    def tokens(self, model, messages: Sequence[dict], **kwargs) -> list[int]:
        return model.tokenize(self.render(messages, **kwargs), add_special=True, parse_special=True)

    def prompt(self, model, messages: Sequence[dict], **kwargs) -> tuple[list[int] | str, list]:
        """(the prompt, its images): token ids, or with image parts in the messages the rendered text, whose
        `<|image|>` markers (the template writes one per image part) the images fill in order."""
        images = [part["image"] for m in messages if isinstance(m.get("content"), list)
                  for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]
        if not images:
            return self.tokens(model, messages, **kwargs), []
        return self.render(messages, **kwargs), images


class ChatSession:
    """Multi-turn chat over one sequence. `seeds`: where turns without a seed draw theirs."""

    def __init__(self, model, messages: Sequence[dict] | None = None, *, seeds=None, exclusive=None,
                 template_kwargs: dict | None = None, owner=None, **options):
        self.template = ChatTemplate.of(model)
        if self.template is None:
            raise ModelError("this model has no tokenizer.chat_template")
        self.model, self.options, self.seeds = model, options, seeds
        self.template_kwargs = dict(template_kwargs or {})  # enable_thinking=True, say
        self.exclusive = exclusive  # the LLM's: turns take the model like its other generations
        self.initial = _messages(messages)
        self.messages = [dict(m) for m in self.initial]
        # its sequence is leased when a turn first needs it, with the model held (never from under a running
        # generation): through the LLM that made it (`owner`: it may release an idle user's), else a free one
        self.owner = owner if owner is not None else model if callable(getattr(model, "lease", None)) else None
        self.seq = None

    def prompt_tokens(self, messages: Sequence[dict]) -> list[int]:
        return self.template.tokens(self.model, messages, **self.template_kwargs)

    def stream(self, content: str, *, images: Sequence = (), **options) -> Iterator[Event]:
        """One user turn (with `images`: paths, bytes or PIL images, placed before the text); the reply joins the
        history when the turn completes (not when it is broken off)."""
        if not isinstance(content, str):
            raise ConfigError(f"a chat message is text (a str), got {type(content).__name__}: {content!r:.40}")
        with self.exclusive.hold("a chat turn") if self.exclusive is not None else nullcontext():
            if images:
                from ..runtime.vision import load_image

                content = [{"type": "image", "image": load_image(i)} for i in images] + \
                    [{"type": "text", "text": content}]
            messages = self.messages + [{"role": "user", "content": content}]
            self._ensure_sequence()
            prompt, shown = self.template.prompt(self.model, messages, **self.template_kwargs)
            events = stream(self.model, prompt, images=shown, seq=self.seq, seeds=self.seeds,
                            **{**self.options, **options})
            try:
                for event in events:
                    if event.kind == "done":
                        self.messages = messages + [{"role": "assistant", "content": event.text}]
                    yield event
            finally:
                events.close()

    def stream_prompt(self, prompt, **options) -> Iterator[Event]:
        """A generation after `prompt` (text or ids; `images=` with its markers) on this chat's own sequence,
        outside the history: an edit of the last answer, whose prompt is the history before it (cached)."""
        with self.exclusive.hold("a chat edit") if self.exclusive is not None else nullcontext():
            self._ensure_sequence()
            events = stream(self.model, prompt, seq=self.seq, seeds=self.seeds, **{**self.options, **options})
            try:
                yield from events
            finally:
                events.close()

    def answer_context(self):
        """(the prompt the last answer followed, its images, a function that puts an edited answer in its place).
        With images in the history the prompt is the rendered text, whose markers the images fill."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ConfigError("the conversation has no answer yet")

        def keep(text: str) -> None:
            self.messages[-1] = {"role": "assistant", "content": text}

        prompt, images = self.template.prompt(self.model, self.messages[:-1], **self.template_kwargs)
        return prompt, images, keep

    def send(self, content: str, **options):
        for event in self.stream(content, **options):
            pass
        return event

    def reset(self) -> None:
        """Forget the conversation (back to the initial messages) and empty the cache."""
        with self.exclusive.hold("reset") if self.exclusive is not None else nullcontext():
            self.messages = [dict(m) for m in self.initial]
            if self.seq is not None and getattr(self.seq, "live", True):
                self.seq.truncate(0)
            else:  # released meanwhile (another user of the model took it): nothing of it is cached
                self.seq = None

    def _ensure_sequence(self) -> None:
        # released (another user of the model needed one, or the model closed): a fresh lease, a full re-prefill
        if getattr(self.model, "closed", False):
            raise BackendError("the model is closed")
        if self.owner is not None:
            self.owner.used(self)
        if self.seq is None or not getattr(self.seq, "live", True):
            self.seq = self.owner.lease(self) if self.owner is not None else self.model.sequence()


def _messages(messages) -> list[dict]:
    """A chat's initial messages, copied: a list of {"role": str, "content": ...} dicts; ConfigError otherwise."""
    try:
        items = [dict(m) for m in messages or ()]
    except (TypeError, ValueError):
        raise ConfigError(f"messages are a list of {{'role': ..., 'content': ...}} dicts, got "
                          f"{messages!r:.60}") from None
    for m in items:
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise ConfigError(f"a message needs a 'role' (a str) and a 'content', got {m!r:.60}")
    return items
