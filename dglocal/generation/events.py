"""What a generation emits, a small closed family with a common base: `kind` names the event, so consumers
dispatch on it (`handlers[event.kind](event)`) instead of testing classes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import numpy as np

from .channels import split


class Event:
    kind: ClassVar[str]


@dataclass
class Step(Event):
    """One denoising step: the draft (argmax canvas) and which positions were accepted."""

    kind: ClassVar[str] = "step"
    block: int
    step: int  # 1-based within the block
    argmax: np.ndarray
    accepted: np.ndarray
    temperature: float
    mean_entropy: float
    early_stop: bool
    seconds: float  # the denoise call plus the host-side sampler work
    guided: np.ndarray | None = None  # positions the guide re-noised at this step (None without a guide)


@dataclass(frozen=True)
class TokenLogprob:
    """An output token's log-probability under the model's own distribution at its position (the softcapped
    logits at temperature 1, no filter or mask, as llama-server's n_probs and vLLM's raw logprobs), taken at the
    last pass of its canvas, and that position's most likely ids with theirs. None: not known (a token a guide's
    earlier attempt chose)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()  # (id, log-probability), most likely first


@dataclass
class BlockText(Event):
    """A finished block: the tokens and text it adds to the output, and the whole canvas it came from."""

    kind: ClassVar[str] = "block"
    block: int
    tokens: list[int]  # what it adds: before an EOS, within max_new_tokens, before a stop string
    text: str
    steps: int
    canvas: np.ndarray | None = field(default=None, repr=False)  # the argmax of its last step, all of it
    eos: bool = False  # an EOS inside the part of the canvas that counts towards max_new_tokens
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # of `tokens`, when asked for


@dataclass
class Stats:
    prompt_tokens: int
    prefilled_tokens: int  # the part of the prompt not already in the cache
    generated_tokens: int
    canvases: int
    steps_per_canvas: list[int]
    tokens_per_forward: float
    ms_per_step: float
    tokens_per_second: float  # generated tokens over the time after the prefill
    time_to_first_token: float  # seconds from the call to the first committed block
    prefill_seconds: float
    total_seconds: float
    seed: int | None = None  # the seed its noise came from: the same seed (and settings) repeats it
    # canvas positions run through the forward, summed over the steps (the work; the reference: canvas x steps;
    # the fast sampler runs fewer as positions freeze)
    forward_positions: int = 0


@dataclass
class Completion(Event):
    kind: ClassVar[str] = "done"
    text: str
    tokens: list[int]
    finish_reason: str  # "eos", "length" or "stop"
    stats: Stats = field(repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)  # of `tokens`, when asked for

    # a chat reply's channels (Gemma 4's syntax, dglocal.generation.channels): its thinking, the answer without
    # it, and the tool calls the answer holds
    @property
    def reasoning(self) -> str | None:
        return split(self.text, tools=False).reasoning

    @property
    def content(self) -> str:
        return split(self.text, tools=True).content

    @cached_property  # once: each call's id stays what a tool reply was built from
    def tool_calls(self) -> list:
        return split(self.text, tools=True).tool_calls
