"""The block-diffusion loop: a stack of generators, as mlx-lm's generate.

`generate_steps` is the reference `generate` loop (generation_diffusion_gemma.py) over a backend sequence;
`stream` adds the prompt cache (longest common prefix), detokenizing, stop strings, timing and stats;
`generate` keeps the final `Completion`; `ChatSession` applies the GGUF chat template across turns.
The caller stops by breaking out: the sequence then holds the prompt and the committed blocks, no more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import checks
from .config import GenerationConfig
from .errors import BackendError, ConfigError, ContextError, ModelError
from .sampler import (
    Noise, SeededNoise, StabilityHistory, accept_mask, find_stop, is_confident, stop_holdback, temperature,
    trim_eos,
)


@dataclass
class Step:
    """One denoising step: the draft (argmax canvas) and which positions were accepted."""

    block: int
    step: int  # 1-based within the block
    argmax: np.ndarray
    accepted: np.ndarray
    temperature: float
    mean_entropy: float
    early_stop: bool
    seconds: float  # the denoise call plus the host-side sampler work
    guided: np.ndarray | None = None  # positions the guide re-noised at this step (None without a guide)


@dataclass
class Block:
    """A finished canvas: the argmax of its last step (all of it, before any trimming)."""

    block: int
    tokens: np.ndarray
    steps: int
    eos: bool  # an EOS id inside the part of the block that counts towards max_new_tokens


@dataclass
class BlockText:
    """Stream event for a committed block: the new tokens and text it adds to the output."""

    block: int
    tokens: list[int]
    text: str
    steps: int


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


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "eos", "length" or "stop"
    stats: Stats = field(repr=False)


@dataclass
class DenoiseCall:
    """A decoder pass a generation needs; the driver answers it with the Denoised result (batched or not)."""

    seq: object
    canvas: np.ndarray
    temperature: float
    uniforms: np.ndarray
    self_condition: bool

    def request(self) -> tuple:
        return self.seq, self.canvas, self.temperature, self.uniforms, self.self_condition

    def run(self):
        return self.seq.denoise(self.canvas, temperature=self.temperature, uniforms=self.uniforms,
                                self_condition=self.self_condition)


@dataclass
class EncodeCall:
    """A causal encoder pass a generation needs (its prompt, or a finished block): `kind` is prefill or commit."""

    seq: object
    tokens: list[int]
    kind: str

    def run(self):
        (self.seq.prefill if self.kind == "prefill" else self.seq.commit)(self.tokens)

    @staticmethod
    def run_batch(model, calls: list["EncodeCall"]) -> None:
        """Several sequences' encoder passes in as few llama_decode calls as fit (Model.encode_batch)."""
        model.encode_batch([(c.seq, c.tokens, c.kind) for c in calls])


CALLS = (DenoiseCall, EncodeCall)


def serve_single(calls: Iterator):
    """Drive a generator that yields DenoiseCalls (answered one at a time, here) among its events."""
    result = None
    try:
        while True:
            item = calls.send(result)
            result = None
            if isinstance(item, CALLS):
                result = item.run()
            else:
                yield item
    except StopIteration:
        return
    finally:
        calls.close()


def generate_steps(seq, config: GenerationConfig, **kwargs) -> Iterator[Step | Block]:
    """`canvas_steps` with each denoise call run on `seq` as it comes."""
    return serve_single(canvas_steps(seq, config, **kwargs))


def canvas_steps(
    seq, config: GenerationConfig, *, canvas_length: int, eos_ids: Sequence[int], noise: Noise,
    constraints: np.ndarray | None = None, guide: Guide | None = None, guide_restarts: int = 0,
) -> Iterator[DenoiseCall | EncodeCall | Step | Block]:
    """Denoise canvases after what `seq` holds; yields a DenoiseCall per step (send it the result), every Step,
    then the Block. Ends after an EOS block or ceil(max_new_tokens / C) blocks. A block is committed when the next
    one starts, as the reference does, so the last block is never encoded. `constraints`: int64[blocks * C], -1
    where free. `guide(draft, accepted)`: positions an outside rule finds wrong (see docs/guides.md); a canvas it
    still objects to at the step cap is denoised again from fresh noise, up to `guide_restarts` times. Commits are
    yielded as EncodeCalls (the driver runs them, batched across generations or not)."""
    C = canvas_length
    n_blocks = math.ceil(config.max_new_tokens / C)
    block_tokens = None
    for b in range(n_blocks):
        if block_tokens is not None:
            yield EncodeCall(seq, [int(t) for t in block_tokens], "commit")
        pinned = None if constraints is None else constraints[b * C:(b + 1) * C]
        steps = 0
        for _attempt in range(1 + (guide_restarts if guide is not None else 0)):
            block_tokens, n, objects = yield from _denoise_canvas(seq, config, noise, b, C, pinned, guide, steps)
            steps += n
            if not objects:  # a canvas the guide still objects to at the step cap starts again from fresh noise
                break
        counted = block_tokens[: config.max_new_tokens - b * C]
        eos = trim_eos(counted, eos_ids)[1]
        yield Block(b, block_tokens, steps, eos)
        if eos:
            return


def _denoise_canvas(seq, config: GenerationConfig, noise: Noise, b: int, C: int, pinned, guide, step0: int):
    """One canvas from fresh noise to its last step: (argmax of the last step, steps, the guide still objects)."""
    N = config.max_denoising_steps
    held = None if pinned is None else pinned >= 0
    history = StabilityHistory(config.stability_threshold, C) if config.early_stop else None
    canvas = noise.tokens(C)
    objects = False
    for i, s in enumerate(range(N, 0, -1)):
        t0 = time.perf_counter()
        if held is not None:
            canvas = np.where(held, pinned, canvas)
        T = temperature(s, N, config.t_min, config.t_max)
        out = yield DenoiseCall(seq, canvas, T, noise.uniforms(C), i > 0)
        argmax = np.asarray(out.argmax, dtype=np.int64)
        sampled = np.asarray(out.sampled, dtype=np.int64)
        entropy = np.asarray(out.entropy, dtype=np.float32)
        if held is not None:  # pinned tokens count as accepted, with zero entropy
            argmax, sampled = np.where(held, pinned, argmax), np.where(held, pinned, sampled)
            entropy = np.where(held, np.float32(0), entropy)
        accepted = accept_mask(entropy, config.entropy_bound)
        flagged = guide_mask(guide, argmax, accepted, C)
        objects = flagged is not None and bool(flagged.any())
        if flagged is not None:
            accepted = accepted & ~flagged  # re-noised instead of kept
        canvas = np.where(accepted, sampled, noise.tokens(C))  # re-noise everything not accepted
        stop = False
        if history is not None:
            stable = history.update(argmax)  # updated every step, as the reference
            stop = stable and is_confident(entropy, config.confidence_threshold) and not objects
        yield Step(b, step0 + i + 1, argmax, accepted, T, float(entropy.mean()), stop, time.perf_counter() - t0,
                   flagged)
        if stop:
            break
    return argmax, i + 1, objects


Guide = Callable[[np.ndarray, np.ndarray], Iterable[int]]


def guide_mask(guide, draft: np.ndarray, accepted: np.ndarray, C: int) -> np.ndarray | None:
    """The guide's verdict on a draft as a boolean mask over the canvas (None without a guide)."""
    if guide is None:
        return None
    positions = guide(draft.copy(), accepted.copy())
    mask = np.zeros(C, dtype=bool)
    idx = np.fromiter((int(p) for p in positions), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= C):
        raise ConfigError(f"the guide returned position {int(idx.min() if idx.min() < 0 else idx.max())} outside "
                          f"the canvas of {C}")
    mask[idx] = True
    return mask


def constraint_table(constraints, n_positions: int, n_vocab: int) -> np.ndarray | None:
    """{output position: token} or an int array (-1 = free) -> int64[n_positions], -1 where free."""
    if constraints is None:
        return None
    table = np.full(n_positions, -1, dtype=np.int64)
    if isinstance(constraints, Mapping):
        items = [(int(p), int(t)) for p, t in constraints.items()]
    else:
        arr = np.asarray(constraints, dtype=np.int64).ravel()
        items = [(int(p), int(arr[p])) for p in np.flatnonzero(arr >= 0)]
        if len(arr) > n_positions:
            raise ConfigError(f"constraints cover {len(arr)} positions, the generation only {n_positions}")
    for p, t in items:
        if not 0 <= p < n_positions:
            raise ConfigError(f"constraint position {p} is outside the generation (0..{n_positions - 1})")
        if not 0 <= t < n_vocab:
            raise ConfigError(f"constraint token {t} at position {p} is outside the vocabulary (0..{n_vocab - 1})")
        table[p] = t
    return table


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if len(mismatch) else n


def stream(model, prompt: str | Sequence[int], **kwargs) -> Iterator[Step | BlockText | Completion]:
    """Generate after `prompt`; yields Step drafts, BlockText per committed block, and a final Completion.

    `seq`: a sequence to reuse: only the part of the prompt after the longest common prefix with the tokens it
    holds (`seq.tokens`) is encoded, unless cache_prompt=False (llama-server's field: encode it all afresh).
    `guide`: see canvas_steps. Options are GenerationConfig fields.
    """
    return serve_single(stream_calls(model, prompt, **kwargs))


def stream_calls(
    model, prompt: str | Sequence[int], *, seq=None, noise: Noise | None = None, constraints=None, guide=None,
    guide_restarts: int = 0, cache_prompt: bool = True, **options,
) -> Iterator[DenoiseCall | Step | BlockText | Completion]:
    """`stream` with its DenoiseCalls left to the driver (dglocal.schedule batches them across generations)."""
    t_start = time.perf_counter()
    config = GenerationConfig.from_metadata(model.metadata, **options)
    eos_ids = config.eos_token_id if config.eos_token_id is not None else tuple(model.eos_ids)
    checks.token_ids(list(eos_ids), model.n_vocab, "eos_token_id")
    C = model.canvas_length
    if isinstance(prompt, str):
        tokens = model.tokenize(prompt, add_special=True, parse_special=True)
    else:
        tokens = checks.token_ids(prompt, model.n_vocab, "prompt token ids").tolist()
    if not tokens:
        raise ConfigError("the prompt is empty: the canvas needs at least one token to attend to")
    n_blocks = math.ceil(config.max_new_tokens / C)
    needed = len(tokens) + n_blocks * C
    if needed > model.n_ctx:
        raise ContextError(
            f"prompt ({len(tokens)} tokens) + {n_blocks} canvases of {C} = {needed} tokens > n_ctx {model.n_ctx}"
        )
    fixed = constraint_table(constraints, n_blocks * C, model.n_vocab)
    noise = noise if noise is not None else SeededNoise(model.n_vocab, config.seed)
    if seq is None:
        seq = model.sequence()

    # prompt cache: encode only what follows the longest common prefix with what the sequence holds
    keep = _common_prefix(seq.tokens, tokens) if cache_prompt else 0
    if seq.n_past > keep:
        keep = seq.rewind(keep)  # below keep when a windowed cache must re-encode from a checkpoint
    out: list[int] = []
    steps: list[int] = []
    step_seconds = 0.0
    text, finish, t_first, t_gen, events = "", "length", None, None, None
    try:
        if len(tokens) > keep:
            yield EncodeCall(seq, tokens[keep:], "prefill")
        t_gen = time.perf_counter()
        events = canvas_steps(seq, config, canvas_length=C, eos_ids=eos_ids, noise=noise, constraints=fixed,
                              guide=guide, guide_restarts=guide_restarts)
        for event in _relay(events):
            if isinstance(event, CALLS):
                event.result = yield event
                continue
            if isinstance(event, Step):
                step_seconds += event.seconds
                yield event
                continue
            steps.append(event.steps)
            new, eos = trim_eos(event.tokens[: config.max_new_tokens - len(out)], eos_ids)
            out += [int(t) for t in new]
            full = model.detokenize(out)
            stop_at = find_stop(full, config.stop, len(text)) if config.stop else -1
            if stop_at >= 0:
                full, finish, out = full[:stop_at], "stop", _tokens_for_text(model, out, stop_at)
            elif eos:
                finish = "eos"
            last = finish != "length" or event.block == n_blocks - 1
            # hold back a tail that may begin a stop string, or an incomplete UTF-8 character
            shown = full if last else full[: len(full) - stop_holdback(full, config.stop)].rstrip("\ufffd")
            t_first = t_first if t_first is not None else time.perf_counter()
            yield BlockText(event.block, [int(t) for t in new], shown[len(text):], event.steps)
            text = shown
            if last:
                break
    finally:
        if events is not None:
            events.close()

    t_end = time.perf_counter()
    n_steps = sum(steps)
    gen_time = t_end - (t_gen or t_end)
    stats = Stats(
        prompt_tokens=len(tokens), prefilled_tokens=len(tokens) - keep, generated_tokens=len(out),
        canvases=len(steps), steps_per_canvas=steps,
        tokens_per_forward=len(out) / n_steps if n_steps else 0.0,
        ms_per_step=1000 * step_seconds / n_steps if n_steps else 0.0,
        tokens_per_second=len(out) / gen_time if gen_time > 0 else 0.0,
        time_to_first_token=(t_first or t_end) - t_start, prefill_seconds=(t_gen or t_end) - t_start,
        total_seconds=t_end - t_start,
    )
    yield Completion(text, out, finish, stats)


def _relay(calls: Iterator):
    """Iterate a call-yielding generator from a for loop: a DenoiseCall's answer is read back from its `result`
    attribute (set by the loop body) and sent on."""
    result = None
    while True:
        try:
            item = calls.send(result)
        except StopIteration:
            return
        yield item
        result = getattr(item, "result", None) if isinstance(item, CALLS) else None


def _tokens_for_text(model, tokens: list[int], n_chars: int) -> list[int]:
    """The longest prefix of `tokens` whose text fits in the first `n_chars` characters."""
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(model.detokenize(tokens[:mid])) <= n_chars:
            lo = mid
        else:
            hi = mid - 1
    return tokens[:lo]


def generate(model, prompt: str | Sequence[int], **kwargs) -> Completion:
    """Run `stream` to the end and return its Completion."""
    for event in stream(model, prompt, **kwargs):
        pass
    return event


class ChatSession:
    """Multi-turn chat over one sequence: renders the GGUF chat template (jinja2) and encodes only what
    differs from what the sequence already holds (longest common prefix)."""

    def __init__(self, model, messages: Sequence[dict] | None = None, **options):
        template = model.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError("this model has no tokenizer.chat_template")
        self.model, self.options = model, options
        self.template = _jinja_env().from_string(template)
        self.initial = [dict(m) for m in messages or ()]
        self.messages = [dict(m) for m in self.initial]
        self.seq = model.sequence()

    def prompt_tokens(self, messages: Sequence[dict]) -> list[int]:
        # BOS comes from the tokenizer (add_special), not from the template's bos_token
        text = self.template.render(messages=list(messages), add_generation_prompt=True, bos_token="")
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def stream(self, content: str, **options) -> Iterator[Step | BlockText | Completion]:
        """One user turn; the reply joins the history when the turn completes (not when it is broken off)."""
        messages = self.messages + [{"role": "user", "content": content}]
        self._ensure_sequence()
        options = {**self.options, **options}
        if options.get("seed") is None and hasattr(self.model, "next_seed"):
            options["seed"] = self.model.next_seed()  # reproducible under the model's load seed
        events = stream(self.model, self.prompt_tokens(messages), seq=self.seq, **options)
        try:
            for event in events:
                if isinstance(event, Completion):
                    self.messages = messages + [{"role": "assistant", "content": event.text}]
                yield event
        finally:
            events.close()

    def send(self, content: str, **options) -> Completion:
        for event in self.stream(content, **options):
            pass
        return event

    def reset(self) -> None:
        """Forget the conversation (back to the initial messages) and empty the cache."""
        self.messages = [dict(m) for m in self.initial]
        self._ensure_sequence()
        self.seq.truncate(0)

    def _ensure_sequence(self) -> None:
        # a model has one cache: if something else took it over, start a fresh sequence (full re-prefill)
        if getattr(self.model, "closed", False):
            raise BackendError("the model is closed")
        if not getattr(self.seq, "live", True):
            self.seq = self.model.sequence()


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env
