"""What a canvas can do that a typewriter cannot: edit spans of a text in place, and fill in a middle between a
prefix and a suffix. Both are a fixed layout of canvases: tokens that stay pinned, free regions the model
denoises, and the model's end and pad tokens allowed in a free region to close it early.

    req = edit_request(model, "The cat sat on the mat.", [(4, 7)])
    result = req.result(generate(model, req.prompt, **req.options))   # .text, .changes
    req = infill_request(model, "def add(a, b):\\n    return ", "\\n\\nprint(add(1, 2))\\n")

A layout spans as many canvases as it needs; tokens past its end, in its last canvas, are pinned to an end token
and then pads (the text ends there). Each free region's text ends at its first end or pad token. See
docs/editing.md for what the model sees of a suffix and how long middles are handled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..runtime import checks
from .events import Completion

MAX_ROOM = 4096  # free positions an edit may add to a span beyond its own tokens (`room`)


@dataclass
class Change:
    """One edited span: `start`..`end` in the input text, its old and new text."""

    start: int
    end: int
    old: str
    new: str


@dataclass
class Edited:
    """The outcome of an edit: the whole new text, what changed, and the generation behind it."""

    text: str
    changes: list[Change]
    completion: Completion


@dataclass
class Infilled:
    """The outcome of an infill: the middle, and `text` = middle + suffix (the document after the prefix)."""

    middle: str
    text: str
    completion: Completion


@dataclass
class Layout:
    """Pinned tokens (-1 where free) over `length` positions; `regions` are the free (start, end) ranges."""

    tokens: np.ndarray
    regions: list[tuple[int, int]]

    @property
    def length(self) -> int:
        return len(self.tokens)


def fillers(model) -> tuple[int, ...]:
    """The tokens that may close a free region: the model's end tokens and its pad token."""
    pad = model.metadata.get("tokenizer.ggml.padding_token_id")
    return tuple(sorted(set(model.eos_ids) | ({int(pad)} if pad is not None else set())))


def _closing(model, length: int) -> np.ndarray:
    """What follows a layout's end in its last canvas: an end token, then pads (ends, without a pad token)."""
    pad = model.metadata.get("tokenizer.ggml.padding_token_id")
    tail = np.full(length, model.eos_ids[0] if pad is None else int(pad), dtype=np.int64)
    tail[:1] = model.eos_ids[0]
    return tail


def _constraints(model, layout: Layout) -> np.ndarray:
    """The layout rounded up to whole canvases, the rest closed."""
    C = model.canvas_length
    n = math.ceil(layout.length / C) * C
    return np.concatenate([layout.tokens, _closing(model, n - layout.length)])


def _region_text(model, tokens: Sequence[int], close: tuple[int, ...]) -> str:
    """A free region's text: its tokens up to the first end or pad token."""
    out = []
    for t in tokens:
        if t in close:
            break
        out.append(int(t))
    return model.detokenize(out)


def _text_tokens(model, text: str) -> list[int]:
    # no BOS, and text that looks like a special token stays text
    return model.tokenize(text, add_special=False, parse_special=False)


def _check_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be text, got {type(value).__name__}")
    return value


def _spans(spans, n_chars: int) -> list[tuple[int, int]]:
    """Sorted, checked (start, end) character spans: within the text, not overlapping."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence) or not spans:
        raise ConfigError(f"spans are a non-empty list of (start, end) character offsets, got {spans!r:.60}")
    out = []
    for span in spans:
        if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 2 or not all(
                checks.is_integer(v) for v in span):
            raise ConfigError(f"a span is (start, end), two integers, got {span!r:.60}")
        start, end = int(span[0]), int(span[1])
        if not 0 <= start <= end <= n_chars:
            raise ConfigError(f"span ({start}, {end}) is outside the text of {n_chars} characters")
        out.append((start, end))
    out.sort()
    for (a0, a1), (b0, b1) in zip(out, out[1:]):
        if b0 < a1:
            raise ConfigError(f"spans ({a0}, {a1}) and ({b0}, {b1}) overlap")
    return out


@dataclass
class Request:
    """A planned edit or infill: the prompt and generate options to run, and how to read the Completion."""

    model: object
    prompt: object
    options: dict
    layout: Layout
    kind: str  # "edit" or "infill"
    text: str = ""  # edit: the input
    spans: list | None = None
    suffix: str = ""

    def result(self, completion: Completion):
        close = self.options["fillers"]
        tokens = completion.tokens
        parts = [_region_text(self.model, tokens[a:b], close) for a, b in self.layout.regions]
        if self.kind == "infill":
            return Infilled(parts[0], parts[0] + self.suffix, completion)
        changes, pieces, at = [], [], 0
        for (start, end), new in zip(self.spans, parts):
            pieces += [self.text[at:start], new]
            changes.append(Change(start, end, self.text[start:end], new))
            at = end
        return Edited("".join(pieces) + self.text[at:], changes, completion)

    def generated(self, completion: Completion) -> int:
        """The tokens the model wrote: each free region's, up to its first end or pad token (the pinned text and
        the fillers are not the completion's)."""
        close, tokens, n = set(self.options["fillers"]), completion.tokens, 0
        for a, b in self.layout.regions:
            region = tokens[a:b]
            n += next((i for i, t in enumerate(region) if t in close), len(region))
        return n


def edit_request(model, text: str, spans, *, prompt=None, room: int = 0, **options) -> Request:
    """Re-noise the character `spans` of `text` and denoise them with everything else pinned. `prompt`: what comes
    before the text (default: just BOS). `room`: free positions added to each span beyond its own tokens, for a
    longer replacement (unused ones close with end or pad tokens)."""
    text = _check_text(text, "the text to edit")
    spans, room = _spans(spans, len(text)), checks.integer("room", room, 0, MAX_ROOM)
    tokens, regions, at = [], [], 0
    for start, end in spans:
        tokens += _text_tokens(model, text[at:start])
        n = len(_text_tokens(model, text[start:end])) + room
        regions.append((len(tokens), len(tokens) + n))
        tokens += [-1] * n
        at = end
    tokens += _text_tokens(model, text[at:])
    layout = Layout(np.asarray(tokens, dtype=np.int64), regions)
    return Request(model, _context(model, prompt), _layout_options(model, layout, options), layout, "edit",
                   text=text, spans=spans)


def infill_request(model, prefix: str, suffix: str, *, max_middle: int | None = None, **options) -> Request:
    """The middle between `prefix` (the context, encoded) and `suffix` (pinned after the middle's free positions,
    as much of it as the middle's last canvas holds). `max_middle`: free positions for the middle (default: what
    one canvas leaves beside the suffix, at least half a canvas)."""
    prefix, suffix = _check_text(prefix, "input_prefix"), _check_text(suffix, "input_suffix")
    C = model.canvas_length
    tail = _text_tokens(model, suffix)
    if max_middle is None:
        max_middle = max(C - len(tail), C // 2)
    F = checks.integer("max_middle", max_middle, 1, 1 << 24)
    n = math.ceil((F + min(len(tail), C // 2)) / C) * C  # at least half a canvas of the suffix beside the middle
    head = tail[: n - F]
    layout = Layout(np.asarray([-1] * F + head, dtype=np.int64), [(0, F)])
    return Request(model, _context(model, prefix), _layout_options(model, layout, options), layout, "infill",
                   suffix=suffix)


def _context(model, prompt):
    """What the layout follows: the prompt, or BOS alone where there is none (a canvas needs a token to attend to)."""
    if prompt is None or (isinstance(prompt, str) and not prompt):
        return model.tokenize("", add_special=True, parse_special=False) or [model.eos_ids[0]]
    return prompt


def _layout_options(model, layout: Layout, options: dict) -> dict:
    for key in ("constraints", "fillers", "max_new_tokens", "draft"):
        if key in options:
            raise ConfigError(f"{key} is set by the edit's layout, not by the caller")
    return dict(options, constraints=_constraints(model, layout), fillers=fillers(model), max_new_tokens=layout.length)
