"""One request, planned once for every entry point (the Python API, the chat, the server's slots): its prompt
tokens, its settings with the seed resolved, the context it needs, and which cached tokens it reuses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ContextError
from ..runtime import checks
from ..runtime.vision import MARKER, load_image
from .config import GenerationConfig


class SeedSource:
    """Where the seeds of requests that give none come from: a generator seeded once (a load seed makes a run's
    answers repeat) or from the OS. The one place a seed is drawn."""

    def __init__(self, seed: int | None = None):
        self.seed = checks.seed_value(seed)
        self._rng = np.random.default_rng(self.seed)

    def next(self) -> int:
        return int(self._rng.integers(2**63))


def derive_seed(seed: int, index: int) -> int:
    """The seed of request `index` under a run seed: its noise does not depend on what shares its forwards."""
    words = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


@dataclass(frozen=True)
class RequestPlan:
    tokens: list[int]
    config: GenerationConfig  # seed resolved
    eos_ids: tuple[int, ...]
    canvas_length: int
    cache_prompt: bool = True  # llama-server's field: False encodes the whole prompt afresh
    images: tuple = ()  # the embeddings of the prompt's images, held while the plan lives (runtime.vision)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.config.max_new_tokens / self.canvas_length)

    @property
    def n_ctx_needed(self) -> int:
        """The prompt and every canvas the request may commit: the context it must fit."""
        return len(self.tokens) + self.n_blocks * self.canvas_length

    def check_fits(self, n_ctx: int) -> None:
        if self.n_ctx_needed > n_ctx:
            raise ContextError(f"the prompt ({len(self.tokens)} tokens) and {self.n_blocks} canvases of "
                               f"{self.canvas_length} need {self.n_ctx_needed} tokens, over n_ctx {n_ctx}")


def plan(model, prompt: str | Sequence[int], *, seeds: SeedSource | None = None, cache_prompt: bool = True,
         images: Sequence = (), to_context: bool = False, **options) -> RequestPlan:
    """The plan of one request on `model`; ContextError when it cannot fit the model's context. `images` (paths,
    bytes, PIL images) go where the text prompt has `<|image|>`, in order. `to_context`: no length of its own, the
    generation may take every canvas the context has room for after the prompt (it ends at its EOS), as
    llama-server and OpenAI run a request without max_tokens."""
    config = GenerationConfig.from_metadata(model.metadata, **options)
    if config.seed is None:
        config = config.replace(seed=(seeds or SeedSource()).next())
    eos_ids = config.eos_token_id if config.eos_token_id is not None else tuple(model.eos_ids)
    checks.token_ids(list(eos_ids), model.n_vocab, "eos_token_id")
    embeddings = ()
    if images:
        tokens, embeddings = image_prompt(model, prompt, images)
    elif isinstance(prompt, str):
        tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    else:
        tokens = checks.token_ids(prompt, model.n_vocab, "prompt token ids").tolist()
    if not tokens:
        raise ConfigError("the prompt is empty: the canvas needs at least one token to attend to")
    if to_context:
        C = model.canvas_length
        config = config.replace(max_new_tokens=max(C, (model.n_ctx - len(tokens)) // C * C))
    out = RequestPlan(tokens, config, tuple(eos_ids), model.canvas_length, bool(cache_prompt), embeddings)
    out.check_fits(model.n_ctx)
    return out


def image_prompt(model, prompt: str, images: Sequence) -> tuple[list[int], tuple]:
    """The tokens of a text prompt whose `<|image|>` markers each take an image (BOI, the image's positions, EOI,
    as the reference processor expands them), and the images' embeddings."""
    vision = getattr(model, "vision", None)
    if vision is None:
        raise ConfigError("this model was loaded without a vision tower: load it with mmproj= (--mmproj) to give "
                          "it images")
    if not isinstance(prompt, str):
        raise ConfigError("a prompt with images is text, with <|image|> where each image goes")
    pieces = prompt.split(MARKER)
    if len(pieces) - 1 != len(images):
        raise ConfigError(f"the prompt has {len(pieces) - 1} {MARKER} markers for {len(images)} images")
    tokens = model.tokenize(pieces[0], add_special=True, parse_special=True)
    embeddings = []
    for image, text in zip(map(load_image, images), pieces[1:]):
        embeddings.append(vision.embed(image))
        tokens += vision.tokens(image) + model.tokenize(text, add_special=False, parse_special=True)
    return tokens, tuple(embeddings)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if len(mismatch) else n


def pick_slot(sequences: dict, tokens: Sequence[int]) -> int:
    """Of the free sequences {index: Sequence}, the one whose cache shares the longest prefix with `tokens`
    (llama-server's slot choice: a conversation's next turn encodes only its new tokens)."""
    shared = {i: common_prefix(seq.tokens, tokens) for i, seq in sequences.items()}
    return max(shared, key=shared.get)


def reuse(seq, plan: RequestPlan, lora: tuple = ()) -> int:
    """Cut `seq` back to what it shares with the plan's prompt (everything, with cache_prompt off, or when its
    cache was encoded with other LoRA scales than `lora`); returns how many prompt tokens it still holds: the rest
    must be encoded. A windowed cache may keep fewer than it shares."""
    same = getattr(seq, "lora", ()) == lora
    keep = common_prefix(seq.tokens, plan.tokens) if plan.cache_prompt and same else 0
    seq.lora = lora  # what the cache holds from here on is encoded with these scales
    return cut_back(seq, keep)


def cut_back(seq, n: int) -> int:
    """Cut `seq` back to at most `n` cached tokens; returns how many it holds: n, or fewer where a windowed cache
    cannot continue from n (Sequence.rewind)."""
    return seq.rewind(n) if seq.n_past > n else n
