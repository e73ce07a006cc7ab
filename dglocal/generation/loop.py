"""One generation as an explicit state object: the reference `generate` loop (generation_diffusion_gemma.py)
over one sequence, with the prompt cache, detokenizing, stop strings and statistics.

    gen = Generation(model, plan, seq)       # plan: dglocal.generation.request.plan(...)
    while gen.pending is not None:           # the call it needs next: an EncodeCall or a DenoiseCall
        events = gen.take(answer(gen.pending))   # Step, BlockText and, at the end, Completion

It never calls the backend: the driver (dglocal.generation.driver) answers the calls of one or many generations,
batched. A block is committed when the next one starts, as the reference does, so the last is never encoded; a
generation dropped half-way leaves its sequence holding the prompt and the committed blocks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..runtime import checks
from ..runtime.filters import Filters, sampling
from .config import MAX_STEPS, GenerationConfig, check_schedule
from ..runtime.fastpass import FastPass
from .events import BlockText, Completion, Event, Stats, Step, TokenLogprob
from .fast import Freezer
from .grammar import CanvasGrammar, GrammarSpec
from .request import RequestPlan, common_prefix, cut_back, reuse
from .sampler import (
    Noise, SeededNoise, StabilityHistory, accept_mask, find_stop, is_confident, stop_holdback, temperature,
    trim_eos,
)
from .views import View

MAX_LOGPROBS = 20  # the most likely ids a token's log-probabilities list at most (the backend's LLAMA_DG_MAX_PROBS)


@dataclass
class EncodeCall:
    """A causal encoder pass a generation needs: its prompt (what the cache lacks of it), or a finished block."""

    seq: object
    tokens: list[int]


@dataclass
class DenoiseCall:
    """A decoder pass over a canvas; the answer is a Denoised (argmax, sampled, entropy)."""

    seq: object
    canvas: np.ndarray
    temperature: float
    uniforms: np.ndarray | None  # None: greedy (temperature 0), the draw is the argmax
    self_condition: bool
    filters: Filters | None = None
    n_probs: int = 0  # log-probabilities a position (Denoised.top_ids ...), 0: none
    fast: FastPass | None = None  # the fast sampler's positions and reductions (dglocal.generation.fast)

    def request(self) -> tuple:
        return (self.seq, self.canvas, self.temperature, self.uniforms, self.self_condition, self.filters,
                self.n_probs, self.fast)


OWN_OPTIONS = ("noise", "constraints", "draft", "fillers", "guide", "guide_restarts", "time_limit", "grammar",
               "lora", "logprobs")  # Generation's; the rest: the plan's


def split_options(options: dict) -> tuple[dict, dict]:
    """(the plan's options, Generation's own) of a stream-style options dict."""
    return ({k: v for k, v in options.items() if k not in OWN_OPTIONS},
            {k: v for k, v in options.items() if k in OWN_OPTIONS})


class Generation:
    """`noise`: all the randomness (default: seeded by the plan's seed). `constraints`: {output position: token}
    pinned in the canvas. `guide(draft, accepted)`: positions an outside rule finds wrong, re-noised (see
    docs/guides.md); a canvas it still objects to at the step cap starts again, up to `guide_restarts` times and
    while `time_limit` seconds (from the start of the generation) are not used up: from fresh noise, or, where the
    guide has a `restart(draft, attempt)` method, from the positions of the last draft it returns (a warm start);
    where it has a `view(attempt, seed)` method, a View it returns restates the problem from that attempt on
    (dglocal.generation.views: the prompt is re-encoded, the drafts mapped back). A block the guide still objects
    to when the restarts run out ends with the attempt it flagged the fewest positions of.
    A guide with `first_alone = True` only judges a block's first attempt (nothing re-noised, the model's own
    early stop); with `temperatures = (t_min, t_max)` its guided attempts use that schedule, with `steps = N` that
    step cap.
    `grammar`: a GrammarSpec the output must match (dglocal.generation.grammar).
    `draft`: tokens (-1 free) each canvas starts from instead of noise, the reference's `decoder_input_ids`
    (block b from positions b*C..(b+1)*C). `fillers`: token ids (the end and pad tokens) that may fill free
    positions of a fixed layout (an edit, an infill): the generation then runs every canvas and an EOS does not
    end it; the Completion's tokens are the whole layout, its text that without the fillers. `lora`: scales of
    the model's LoRA adapters for this generation ({id: scale} or [{"id", "scale"}]) over the loaded ones."""

    def __init__(self, model, plan: RequestPlan, seq, *, noise: Noise | None = None, constraints=None,
                 draft=None, fillers: tuple[int, ...] | None = None, guide: Guide | None = None,
                 guide_restarts: int = 0, time_limit: float | None = None, grammar: GrammarSpec | None = None,
                 lora=None, logprobs: int | None = None):
        self.model, self.plan, self.seq, self.config = model, plan, seq, plan.config
        self.C = C = model.canvas_length
        self.noise = noise if noise is not None else SeededNoise(model.n_vocab, plan.config.seed)
        self.fixed = constraint_table(constraints, plan.n_blocks * C, model.n_vocab)
        self.start = draft_table(model, draft, plan.n_blocks * C)
        self.fillers = None if fillers is None else np.asarray(sorted(set(fillers)), dtype=np.int64)
        adapters = getattr(model, "adapters", None)
        if lora is not None and adapters is None:
            raise ConfigError("this model takes no LoRA adapters")
        self.lora = adapters.scales(lora) if adapters is not None else ()  # what the driver sets for its passes
        self.guide, self.restarts = guide, guide_restarts if guide is not None else 0
        self.guide_steps, self.guide_temperatures = _guide_steps(guide), _guide_temperatures(guide, self.config)
        self.view: View | None = None  # how the current attempt states the problem; None: as the request does
        self.restating = False  # the pending encode is a view's prompt
        if getattr(guide, "view", None) is not None and (plan.n_blocks != 1 or grammar is not None):
            raise ConfigError("a guide's views restate the prompt: they need a generation of one canvas and no "
                              "grammar")
        self.time_limit = _time_limit(time_limit)
        # log-probabilities of the output tokens with this many of the most likely ids a position (None: none),
        # from each canvas' last pass (its Denoised and input canvas)
        self.logprobs = None if logprobs is None else checks.integer("logprobs", logprobs, 0, MAX_LOGPROBS)
        if self.logprobs is not None and getattr(guide, "view", None) is not None:
            raise ConfigError("logprobs are not returned for a guide with views: its passes see a restated canvas")
        self.last_pass = None
        self.out_logprobs: list[TokenLogprob] = []
        self.last: np.ndarray | None = None  # the last draft of a canvas the guide still objected to
        cfg = plan.config
        self.sampling = sampling(cfg.top_k, cfg.top_p, cfg.min_p)
        self.sampling = self.sampling if self.sampling.active else None
        if grammar is not None and not isinstance(grammar, (GrammarSpec, CanvasGrammar)):
            raise ConfigError(f"grammar must be a GrammarSpec, got {type(grammar).__name__}")
        if isinstance(grammar, GrammarSpec):
            grammar = CanvasGrammar(model, grammar, plan.eos_ids, max_tokens=plan.config.max_new_tokens)
        self.grammar = grammar  # or one compiled when the request was prepared (serving.prepare), for this plan
        # fast_k >= n_vocab keeps every id: the whole vocabulary's reductions compute that, at less cost
        self.freezer = None if cfg.sampler == "reference" else Freezer(
            self.C, cfg.fast_k if cfg.fast_k < model.n_vocab else 0, cfg.freeze,
            cfg.confidence_threshold if cfg.confidence_threshold is not None else cfg.entropy_bound, plan.eos_ids)
        self.t_start = time.perf_counter()
        self.cached = reuse(seq, plan, self.lora)  # prompt tokens the sequence already holds
        self.out: list[int] = []
        self.text, self.finish = "", "length"
        self.steps: list[int] = []  # per finished block
        self.forward_positions = 0  # canvas positions run through the forward (Stats.forward_positions)
        self.step_seconds, self.t_first, self.t_gen = 0.0, None, None
        self.block = 0
        self.pending: EncodeCall | DenoiseCall | None = None
        if len(plan.tokens) > self.cached:
            self.pending = EncodeCall(seq, plan.tokens[self.cached:])
        else:
            self._begin_block()

    # -- the state machine -----------------------------------------------------------------------------------

    def take(self, result=None) -> list[Event]:
        """The answer to `pending` (None for an encode): the events it produces; `pending` is the next call, or
        None once the Completion is among them."""
        call, self.pending = self.pending, None
        if isinstance(call, EncodeCall):  # the prompt, the previous block or a view's prompt: a canvas starts
            self._begin_canvas() if self.restating else self._begin_block()
            self.restating = False
            return []
        if not isinstance(call, DenoiseCall):
            raise ConfigError("this generation has ended: it needs no more calls")
        return self._stepped(call, result)

    def _begin_block(self) -> None:
        if self.t_gen is None:
            self.t_gen = time.perf_counter()
        self.block_steps, self.attempt = 0, 0
        self.best: tuple[int, np.ndarray] | None = None  # (positions flagged, draft) of the block's best attempt
        b, C = self.block, self.C
        self.pinned = None if self.fixed is None else self.fixed[b * C:(b + 1) * C]
        self.held = None if self.pinned is None else self.pinned >= 0
        self.repairs = 0
        self._begin_canvas()

    def _begin_canvas(self) -> None:
        """A canvas from fresh noise (the block's first attempt, or a restart the guide asked for)."""
        cfg = self.config
        # a window past the step cap never fills: the same as one of N steps, without its memory
        window = min(cfg.stability_threshold, self._cap()) if cfg.early_stop else 0
        self.history = StabilityHistory(window, self.C) if cfg.early_stop else None
        # drawn even when a draft replaces it, as the reference draws its canvas before it looks at its argument
        self.canvas = self.noise.tokens(self.C)
        if self.start is not None and self.attempt == 0:
            b, C = self.block, self.C
            self.canvas = np.where(self.start[b * C:(b + 1) * C] >= 0, self.start[b * C:(b + 1) * C], self.canvas)
        elif self.attempt > 0 and getattr(self.guide, "restart", None) is not None:  # what it keeps of the last
            keep = guide_mask(self.guide.restart, self.last, self.attempt, self.C)
            if self.view is not None:
                keep, last = self.view.model_mask(keep), self.view.model(self.last)
            else:
                last = self.last
            self.canvas = np.where(keep, last, self.canvas)
        self.draft = None
        self.i = 0
        if self.freezer is not None:
            self.freezer.reset()
        self._next_denoise()

    def _next_denoise(self) -> None:
        self._t0 = time.perf_counter()
        if self.held is not None:
            self.canvas = np.where(self.held, self.pinned, self.canvas)
        cfg = self.config
        N = self._cap()
        t_min, t_max = cfg.t_min, cfg.t_max
        if not self._alone() and self.guide_temperatures is not None:
            t_min, t_max = self.guide_temperatures
        T = temperature(max(N - self.i, 1), N, t_min, t_max)  # repair passes past the cap: the last T
        if cfg.temperature not in (0.0, 1.0):
            T = float(np.float32(T) * np.float32(cfg.temperature))
        uniforms = self.noise.uniforms(self.C)
        filters = self.sampling
        if self.grammar is not None:
            filters = self.grammar.filters(self.draft if self.draft is not None else self.canvas, self.sampling)
        self.pending = DenoiseCall(self.seq, self.canvas, T, uniforms if cfg.temperature > 0 else None, self.i > 0,
                                   filters, 0 if self.logprobs is None else max(self.logprobs, 1),
                                   None if self.freezer is None else self.freezer.call(self.held))

    def _stepped(self, call: DenoiseCall, out) -> list[Event]:
        cfg, C = self.config, self.C
        ran = self.freezer.passed(call.fast) if self.freezer is not None else None
        self.forward_positions += C if ran is None else int(ran.sum())
        if call.n_probs:
            self.last_pass = _merged(self.last_pass, (call.canvas, out), ran if self.i > 0 else None)
        argmax = np.asarray(out.argmax, dtype=np.int64)
        sampled = argmax if out.sampled is None else np.asarray(out.sampled, dtype=np.int64)
        entropy = np.asarray(out.entropy, dtype=np.float32)
        if self.freezer is not None and self.freezer.freeze:  # frozen tokens stay, with zero entropy
            frozen = self.freezer.frozen
            argmax, sampled = np.where(frozen, call.canvas, argmax), np.where(frozen, call.canvas, sampled)
            entropy = np.where(frozen, np.float32(0), entropy)
        if self.held is not None:  # pinned tokens count as accepted, with zero entropy
            argmax, sampled = np.where(self.held, self.pinned, argmax), np.where(self.held, self.pinned, sampled)
            entropy = np.where(self.held, np.float32(0), entropy)
        accepted = accept_mask(entropy, cfg.entropy_bound)
        # the guide, the events and the output see the world's canvas; a view's model holds a permutation of it
        view = self.view
        draft = argmax if view is None else view.world(argmax)
        verdict = guide_mask(self.guide, draft, accepted if view is None else view.world_mask(accepted), C)
        flagged = verdict if verdict is None or view is None else view.model_mask(verdict)
        alone = self._alone()  # the guide judges this attempt's result only
        valid = C
        if self.grammar is not None:  # from the first position that breaks the grammar on, re-noised
            self.draft = argmax
            valid = self.grammar.valid_prefix(argmax)
            broken = np.arange(C) >= valid
            flagged = broken if flagged is None else flagged | broken
        objects = flagged is not None and bool(flagged.any())
        if flagged is not None and not alone:
            accepted = accepted & ~flagged  # re-noised instead of kept
        self.canvas = np.where(accepted, sampled, self.noise.tokens(C))  # re-noise everything not accepted
        stop = False
        if self.history is not None:
            stable = self.history.update(argmax)  # updated every step, as the reference
            stop = stable and is_confident(entropy, cfg.confidence_threshold) and (alone or not objects)
        if self.freezer is not None:
            self.freezer.settle(accepted, entropy, None if alone else flagged)
            stop = stop or (self.freezer.finished(self.canvas) and (alone or not objects))
        self.i += 1
        seconds = time.perf_counter() - self._t0
        self.step_seconds += seconds
        shown = (accepted, flagged) if view is None else (view.world_mask(accepted), view.world_mask(flagged))
        events: list[Event] = [Step(self.block, self.block_steps + self.i, draft, shown[0], call.temperature,
                                    float(entropy.mean()), stop, seconds, None if alone else shown[1])]
        if not stop and self.i < self._cap():
            self._next_denoise()
            return events
        # breaks the grammar (or leaves no time to end) at the cap: its valid prefix pinned, once more; a position
        # may take two passes, the second with the closing forced (grammar.CanvasGrammar.valid_prefix)
        if valid < C and self.repairs < 2 * C:
            self._repair(argmax, valid)
            return events
        self.block_steps += self.i
        if objects:  # still broken at the step cap
            n = int(flagged.sum())
            if self.best is None or n < self.best[0]:
                self.best = (n, draft)
            if self.attempt < self.restarts and not self._out_of_time():
                self.attempt += 1
                self.last = draft
                self._restart()
                return events
            draft = self.best[1]  # out of attempts: the one the guide objected to least
        return events + self._end_block(draft)

    def _restart(self) -> None:
        """The next attempt: in the view the guide gives for it (its prompt encoded first), or as the last."""
        view = self.guide.view(self.attempt, self.config.seed) if getattr(self.guide, "view", None) else None
        if view is None:
            self._begin_canvas()
            return
        if not isinstance(view, View):
            raise ConfigError(f"a guide's view(attempt, seed) returns a View or None, got {type(view).__name__}")
        self.view = view.check(self.C, self.model.n_vocab)
        if self.fixed is not None:  # pinned positions, where this view's model holds them
            self.pinned = self.view.model(self.fixed[:self.C])
            self.held = self.pinned >= 0
        prompt = [int(t) for t in view.prompt]
        kept = cut_back(self.seq, common_prefix(self.seq.tokens, prompt))  # the cache is this generation's own
        if kept == len(prompt):
            self._begin_canvas()
            return
        self.pending, self.restating = EncodeCall(self.seq, prompt[kept:]), True

    def _alone(self) -> bool:
        """A guide with `first_alone` set lets each block's first attempt run as the model alone."""
        return self.attempt == 0 and bool(getattr(self.guide, "first_alone", False))

    def _cap(self) -> int:
        """The step cap of this attempt: the guide's `steps` for its guided attempts, else the request's."""
        return self.config.max_denoising_steps if self.guide_steps is None or self._alone() else self.guide_steps

    def _out_of_time(self) -> bool:
        return self.time_limit is not None and time.perf_counter() - self.t_start >= self.time_limit

    def _repair(self, draft: np.ndarray, valid: int) -> None:
        """Another pass with the grammar-valid prefix of `draft` pinned: the next position's mask then follows
        from tokens that cannot change, so each pass makes at least one more position valid."""
        self.repairs += 1
        prefix = np.arange(self.C) < valid
        pinned = self.pinned if self.pinned is not None else np.full(self.C, -1, dtype=np.int64)
        self.pinned = np.where(prefix, draft, pinned)
        self.held = self.pinned >= 0
        self._next_denoise()

    def _end_block(self, canvas: np.ndarray) -> list[Event]:
        """The block's text (EOS, max_new_tokens and stop strings applied), then a commit or the Completion."""
        cfg, model = self.config, self.model
        self.steps.append(self.block_steps)
        new = canvas[: cfg.max_new_tokens - len(self.out)]
        eos = False
        if self.fillers is None:
            new, eos = trim_eos(new, self.plan.eos_ids)
        self.out += [int(t) for t in new]
        if self.grammar is not None:
            self.grammar.commit(new)
            eos = eos or (self.fillers is None and self.grammar.ended)  # nothing but an EOS may follow: done
        full = model.detokenize(self._text_tokens())
        stop_at = find_stop(full, cfg.stop, len(self.text)) if cfg.stop else -1
        if stop_at >= 0:
            full, self.finish, self.out = full[:stop_at], "stop", _tokens_for_text(model, self._text_tokens(), stop_at)
        elif eos:
            self.finish = "eos"
        last = self.finish != "length" or self.block == self.plan.n_blocks - 1
        # hold back a tail that may begin a stop string, or an incomplete UTF-8 character
        shown = full if last else full[: len(full) - stop_holdback(full, cfg.stop)].rstrip("\ufffd")
        if self.t_first is None:
            self.t_first = time.perf_counter()
        logprobs = None
        if self.logprobs is not None:  # of the tokens a stop string left
            whole = (self.out_logprobs + self._logprobs(new))[:len(self.out)]
            logprobs, self.out_logprobs = whole[len(self.out_logprobs):], whole
        events: list[Event] = [BlockText(self.block, [int(t) for t in new], shown[len(self.text):], self.block_steps,
                                         canvas, eos, logprobs)]
        self.text = shown
        if last:
            return events + [self._completion()]
        self.block += 1
        self.pending = EncodeCall(self.seq, [int(t) for t in canvas])
        return events

    def _logprobs(self, tokens) -> list[TokenLogprob]:
        """The log-probabilities of a block's tokens from its last pass: a token is that pass' argmax or, pinned,
        its input; one a guide's earlier attempt chose may be neither (then among the most likely ids, or None)."""
        given, out = self.last_pass
        k = self.logprobs
        entries = []
        for i, t in enumerate(int(t) for t in tokens):
            top = tuple(zip(out.top_ids[i].tolist(), out.top_logprobs[i].tolist()))
            if t == int(out.argmax[i]):
                lp = float(out.argmax_logprob[i])
            elif t == int(given[i]):
                lp = float(out.token_logprob[i])
            else:
                lp = next((v for u, v in top if u == t), None)
            entries.append(TokenLogprob(t, lp, top[:k]))
        return entries

    def _text_tokens(self) -> list[int]:
        """The output tokens that make its text: all of them, or without the fillers of a fixed layout."""
        if self.fillers is None:
            return self.out
        return [t for t in self.out if t not in self.fillers]

    def _completion(self) -> Completion:
        t_end = time.perf_counter()
        n_steps, n_out = sum(self.steps), len(self.out)
        t_gen = self.t_gen or t_end
        stats = Stats(
            prompt_tokens=len(self.plan.tokens), prefilled_tokens=len(self.plan.tokens) - self.cached,
            generated_tokens=n_out, canvases=len(self.steps), steps_per_canvas=list(self.steps),
            tokens_per_forward=n_out / n_steps if n_steps else 0.0,
            ms_per_step=1000 * self.step_seconds / n_steps if n_steps else 0.0,
            tokens_per_second=n_out / (t_end - t_gen) if t_end > t_gen else 0.0,
            time_to_first_token=(self.t_first or t_end) - self.t_start, prefill_seconds=t_gen - self.t_start,
            total_seconds=t_end - self.t_start, seed=self.config.seed, forward_positions=self.forward_positions,
        )
        return Completion(self.text, list(self.out), self.finish, stats,
                          None if self.logprobs is None else self.out_logprobs[:len(self.out)])


# -- guides and constraints -------------------------------------------------------------------------------------

Guide = Callable[[np.ndarray, np.ndarray], Iterable[int]]


def _merged(last, new, ran):
    """The log-probabilities of a canvas' last pass over each position: a sparse pass (`ran`: the positions it
    ran) updates those it ran; None, a whole pass, replaces them."""
    if ran is None or last is None or ran.all():
        return new
    (given, old), (canvas, out) = last, new
    merged = dataclasses.replace(old, argmax=np.where(ran, out.argmax, old.argmax))
    for name in ("top_ids", "top_logprobs"):
        setattr(merged, name, np.where(ran[:, None], getattr(out, name), getattr(old, name)))
    for name in ("token_logprob", "argmax_logprob"):
        setattr(merged, name, np.where(ran, getattr(out, name), getattr(old, name)))
    return np.where(ran, canvas, given), merged


def guide_mask(guide, draft: np.ndarray, accepted, C: int) -> np.ndarray | None:
    """The guide's verdict on a draft as a boolean mask over the canvas (None without a guide); `accepted` is
    what the entropy rule keeps (or, for a guide's restart, the attempt number)."""
    if guide is None:
        return None
    positions = guide(draft.copy(), accepted.copy() if isinstance(accepted, np.ndarray) else accepted)
    mask = np.zeros(C, dtype=bool)
    for p in _positions(positions):
        if not 0 <= p < C:
            raise ConfigError(f"the guide returned position {p} outside the canvas of {C}")
        mask[p] = True
    return mask


def _time_limit(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value == float("inf"):
        raise ConfigError(f"time_limit must be a positive number of seconds, got {value!r:.40}")
    return float(value)


def _positions(positions) -> list[int]:
    """A guide's answer: an iterable of integer positions (a list, a set, a numpy array, ...)."""
    if isinstance(positions, (str, bytes, Mapping)) or not isinstance(positions, Iterable):
        raise ConfigError(f"a guide returns the positions it finds wrong (a list of ints), got "
                          f"{type(positions).__name__}: {positions!r:.60}")
    out = []
    for p in positions:
        if not checks.is_integer(p):
            raise ConfigError(f"a guide's positions must be integers, got {type(p).__name__}: {p!r:.40}")
        out.append(int(p))
    return out


def draft_table(model, draft, n_positions: int) -> np.ndarray | None:
    """A warm start's tokens (text, or ids with -1 for noise) -> int64[n_positions], -1 where the canvas starts
    from noise: a short draft is padded with noise, a long one cut to the generation's canvases."""
    if draft is None:
        return None
    if isinstance(draft, str):
        draft = model.tokenize(draft, add_special=False, parse_special=False)
    elif isinstance(draft, (bytes, Mapping)) or not isinstance(draft, Iterable):
        raise ConfigError(f"a draft is text or a list of token ids, got {type(draft).__name__}")
    return constraint_table(list(draft)[:n_positions], n_positions, model.n_vocab, "draft")


def constraint_table(constraints, n_positions: int, n_vocab: int, what: str = "constraint") -> np.ndarray | None:
    """{output position: token} or a 1-D int array (-1 = free) -> int64[n_positions], -1 where free. `what`
    names the argument in errors."""
    if constraints is None:
        return None
    table = np.full(n_positions, -1, dtype=np.int64)
    if isinstance(constraints, Mapping):
        items = [(_whole(p, f"{what} position"), _whole(t, f"{what} token")) for p, t in constraints.items()]
    else:
        arr = np.asarray(constraints, dtype=object)
        if arr.ndim != 1:
            raise ConfigError(f"{what}s are {{position: token}} or a 1-D list of tokens (-1 free), got "
                              f"{arr.ndim}-D {type(constraints).__name__}")
        values = [_whole(t, f"{what} token") for t in arr.tolist()]
        if len(values) > n_positions:
            raise ConfigError(f"{what}s cover {len(values)} positions, the generation only {n_positions}")
        items = [(p, t) for p, t in enumerate(values) if t >= 0]
    for p, t in items:
        if not 0 <= p < n_positions:
            raise ConfigError(f"{what} position {p} is outside the generation (0..{n_positions - 1})")
        if not 0 <= t < n_vocab:
            raise ConfigError(f"{what} token {t} at position {p} is outside the vocabulary (0..{n_vocab - 1})")
        table[p] = t
    return table


def _guide_steps(guide) -> int | None:
    steps = getattr(guide, "steps", None)
    if steps is None:
        return None
    return checks.integer("a guide's steps", steps, 1, MAX_STEPS)


def _guide_temperatures(guide, config: GenerationConfig) -> tuple[float, float] | None:
    """A guide's (t_min, t_max), checked as the request's own schedule is (config.check_schedule), with the
    request's temperature factor on it."""
    pair = getattr(guide, "temperatures", None)
    if pair is None:
        return None
    try:
        t_min, t_max = (float(t) for t in pair if not isinstance(t, (bool, str, bytes)))
    except (TypeError, ValueError):
        raise ConfigError(f"a guide's temperatures must be a pair (t_min, t_max), got {pair!r:.60}") from None
    if not (math.isfinite(t_min) and math.isfinite(t_max)):
        raise ConfigError(f"a guide's temperatures must be finite, got t_min={t_min} and t_max={t_max}")
    check_schedule(t_min, t_max, config.temperature, "a guide's ")
    return t_min, t_max


def _whole(value, what: str) -> int:
    if not checks.is_integer(value):
        raise ConfigError(f"{what} must be an integer, got {type(value).__name__}: {value!r:.40}")
    return int(value)


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
