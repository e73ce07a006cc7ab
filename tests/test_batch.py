"""Several sequences per forward: batched denoise against single-sequence runs and the reference, the step
scheduler (joins, leaves, cancellation), determinism across batch sizes, and rule-guided re-noising."""

from __future__ import annotations

import re

import numpy as np
import pytest
from reference_harness import ReferenceModel, reference_generate
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import tiny
from dglocal.errors import ConfigError
from dglocal.generation.events import Completion, Step
from dglocal.generation.sampler import SeededNoise
from dglocal.generation.driver import Driver, run_many, start, stream
from dglocal.generation.request import derive_seed

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

V, C = tiny.VOCAB, tiny.CANVAS
PROMPTS = [[2] + list(range(10, 10 + n)) for n in (3, 9, 13, 20, 30)]  # some beyond the sliding window (8)
BASE = dict(max_new_tokens=48, max_denoising_steps=6, entropy_bound=0.1, t_min=0.4, t_max=0.8,
            stability_threshold=1, confidence_threshold=0.005)
EARLY = dict(BASE, max_denoising_steps=8, entropy_bound=1000.0, t_min=0.01, t_max=0.05, confidence_threshold=0.05)
OPTS = dict(n_ctx=5 * 256, kv_type="f32", flash_attn=False, n_threads=2)


@pytest.fixture(scope="module")
def batched(tiny_f32_gguf):
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_seq_max=5, n_ubatch=5 * C, **OPTS)
    yield m
    m.close()


def canvas(k):
    return np.random.default_rng(100 + k).integers(0, V, C).astype(np.int32)


@pytest.mark.parametrize("B", [1, 2, 3, 5])
def test_batched_logits_equal_single_and_reference(batched, llama_model, tiny_model, B):
    """B sequences with different prompt lengths in one pass: each sequence's logits equal its run alone and the
    reference's; a second step mixes self-conditioned sequences with one that starts a fresh canvas."""
    seqs = [batched.sequence(i) for i in range(B)]
    for s, p in zip(seqs, PROMPTS):
        s.prefill(p)
    steps = [[(s, canvas(i), 0.9, None, False) for i, s in enumerate(seqs)],
             [(s, canvas(10 + i), 0.7, None, i != B - 1) for i, s in enumerate(seqs)]]
    got = [batched.denoise_batch(reqs, return_logits=True) for reqs in steps]
    for i, p in enumerate(PROMPTS[:B]):
        with llama_model.sequence() as single:
            single.prefill(p)
            ref = ReferenceModel(tiny_model).sequence()
            ref.prefill(p)
            for step, reqs in enumerate(steps):
                _, cv, T, _, sc = reqs[i]
                alone = single.denoise(cv, temperature=T, self_condition=sc, return_logits=True).logits
                want = ref.denoise(cv, temperature=T, self_condition=sc, return_logits=True).logits * np.float32(T)
                np.testing.assert_allclose(got[step][i].logits, alone, atol=1e-4, rtol=0)
                np.testing.assert_allclose(got[step][i].logits, want, atol=1e-4, rtol=0)
    assert [s.n_past for s in seqs] == [len(p) for p in PROMPTS[:B]]  # every cache untouched


def reference_run(tm, prompt, seed, **cfg):
    kw = dict(cfg)
    kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=kw.pop("entropy_bound"))
    return reference_generate(tm, prompt, SeededNoise(V, seed), eos_token_id=None, pad_token_id=0, **kw)


@pytest.mark.parametrize("cfg", [BASE, EARLY], ids=["fixed", "early-stop"])
def test_generate_many_equals_each_alone_and_the_reference(batched, llama_model, tiny_model, cfg):
    """Five prompts through the scheduler (three canvases each, different early stops): tokens and steps equal
    each prompt run alone with the same noise, and the reference generate."""
    specs = [(p, dict(cfg, eos_token_id=(), noise=SeededNoise(V, 40 + i))) for i, p in enumerate(PROMPTS)]
    many = run_many(batched, specs)
    for i, (p, _) in enumerate(specs):
        alone = llama_model.generate(p, **dict(cfg, eos_token_id=(), noise=SeededNoise(V, 40 + i)))
        assert many[i].tokens == alone.tokens and many[i].stats.steps_per_canvas == alone.stats.steps_per_canvas
        ref_tokens, ref_steps = reference_run(tiny_model, p, 40 + i, **cfg)
        assert many[i].tokens == ref_tokens and many[i].stats.steps_per_canvas == ref_steps
    if cfg is EARLY:
        assert len({tuple(c.stats.steps_per_canvas) for c in many}) > 1  # the generations did stop differently


def test_more_prompts_than_slots_and_seeds_independent_of_batch(batched, tiny_f32_gguf):
    """Eight prompts over 5 slots (three join as others leave, one ends at an EOS) equal the same prompts over 2
    slots and alone: with a seed, prompt i's noise comes from (seed, i)."""
    import dglocal

    prompts = PROMPTS + [[2, 5, 6], [2] * 12, [2, 7]]
    opts = dict(BASE, max_new_tokens=32, eos_token_id=[1, 106, 50] + list(range(200, 260)))
    five = batched.generate_many(prompts, seed=11, **opts)
    with dglocal.load(tiny_f32_gguf, n_seq_max=2, n_ubatch=2 * C, **OPTS) as two:
        pair = two.generate_many(prompts, seed=11, **opts)
    with dglocal.load(tiny_f32_gguf, **OPTS) as one:
        alone = [one.generate(p, seed=derive_seed(11, i), **opts) for i, p in enumerate(prompts)]
    for a, b, c in zip(five, pair, alone):
        assert a.tokens == b.tokens == c.tokens and a.finish_reason == b.finish_reason == c.finish_reason
    assert "eos" in {c.finish_reason for c in five}  # one left early


def test_join_leave_and_cancel_leave_the_others_unchanged(batched):
    """A generation that joins mid-way, one cancelled mid-canvas: the others give what they give alone."""
    opts = dict(BASE, eos_token_id=())
    sched = Driver(batched)
    out = {}

    def keep(name):
        return lambda e: out.__setitem__(name, e) if isinstance(e, Completion) else None

    a = sched.add(start(batched, PROMPTS[0], batched.sequence(0), noise=SeededNoise(V, 1), **opts), keep("a"))
    doomed = sched.add(start(batched, PROMPTS[1], batched.sequence(1), noise=SeededNoise(V, 2), **opts),
                       keep("doomed"))
    for _ in range(3):
        sched.tick()
    sched.cancel(doomed)
    sched.add(start(batched, PROMPTS[2], batched.sequence(2), noise=SeededNoise(V, 3), **opts), keep("c"))
    while sched.jobs:
        sched.tick()
    assert a.done and "doomed" not in out
    for name, p, seed in [("a", PROMPTS[0], 1), ("c", PROMPTS[2], 3)]:
        alone = [e for e in stream(batched, p, seq=batched.sequence(4), noise=SeededNoise(V, seed), **opts)][-1]
        assert out[name].tokens == alone.tokens and out[name].stats.steps_per_canvas == alone.stats.steps_per_canvas
    assert doomed.gen.seq.n_past == len(PROMPTS[1])  # the cancelled one holds its prompt, no canvas


# -- rule-guided re-noising ------------------------------------------------------------------------------------

def test_a_guide_that_flags_nothing_changes_nothing(llama_model):
    opts = dict(EARLY, eos_token_id=())
    plain = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), **opts))
    seen = []
    guided = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), guide=lambda d, a: seen.append(1) or [],
                         **opts))
    steps = lambda ev: [(s.argmax.tolist(), s.accepted.tolist()) for s in ev if isinstance(s, Step)]  # noqa: E731
    assert steps(plain) == steps(guided) and plain[-1].tokens == guided[-1].tokens and seen


def test_a_guide_re_noises_and_holds_off_the_early_stop(llama_model):
    """Flagged positions are never accepted, and a canvas runs to the step cap while the guide objects."""
    opts = dict(EARLY, eos_token_id=(), max_new_tokens=16)
    plain = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), **opts))
    assert plain[-1].stats.steps_per_canvas[0] < EARLY["max_denoising_steps"]  # it stops early on its own
    guided = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), guide=lambda d, a: [0, 5], **opts))
    steps = [e for e in guided if isinstance(e, Step)]
    assert len(steps) == EARLY["max_denoising_steps"] and not any(s.early_stop for s in steps)
    assert all(not s.accepted[0] and not s.accepted[5] and s.guided[[0, 5]].all() for s in steps)


def test_prefill_and_commit_of_several_sequences_in_one_decode(batched, llama_model):
    """Model.encode_batch: the commits of three sequences (a canvas each) in one llama_decode call, their prompts
    of different lengths one call each (llama.cpp would cut them into equal pieces of each sequence, other
    micro-batches than alone); every cache then holds what a prefill of its own gives (same denoise logits)."""
    from dglocal.runtime import native

    calls = []
    real = batched.model.native

    def counting(fn, *args):
        calls.append(fn)
        return real(fn, *args)

    seqs = [batched.sequence(i) for i in range(3)]
    commits = [canvas(20 + i).tolist() for i in range(3)]
    batched.model.native = counting
    try:
        batched.encode_batch([(s, p) for s, p in zip(seqs, PROMPTS[1:4])])
        assert calls.count(native.llama_decode) == 3
        batched.encode_batch([(s, c) for s, c in zip(seqs, commits)])
        assert calls.count(native.llama_decode) == 4
    finally:
        del batched.model.native
    assert [s.tokens for s in seqs] == [p + c for p, c in zip(PROMPTS[1:4], commits)]
    got = batched.denoise_batch([(s, canvas(i), 1.0, None, False) for i, s in enumerate(seqs)], return_logits=True)
    for i, p in enumerate(PROMPTS[1:4]):
        with llama_model.sequence() as single:
            single.prefill(p + commits[i])
            want = single.denoise(canvas(i), temperature=1.0, self_condition=False, return_logits=True).logits
        np.testing.assert_allclose(got[i].logits, want, atol=1e-4, rtol=0)


def test_guide_restarts_a_canvas_it_still_objects_to(llama_model):
    """guide_restarts=K: a canvas still flagged at the step cap is denoised again from fresh noise, K more times
    at most; steps count across the attempts."""
    opts = dict(EARLY, eos_token_id=(), max_new_tokens=16)
    events = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), guide=lambda d, a: [0], guide_restarts=2,
                         **opts))
    steps = [e for e in events if isinstance(e, Step)]
    n = EARLY["max_denoising_steps"]
    assert [s.step for s in steps] == list(range(1, 3 * n + 1)) and events[-1].stats.steps_per_canvas == [3 * n]
    settled = []  # objects during the first attempt only: no restart once it has nothing to say

    def once(draft, accepted):
        settled.append(1)
        return [0] if len(settled) <= n else []

    events = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), guide=once, guide_restarts=2, **opts))
    assert n < events[-1].stats.steps_per_canvas[0] <= 2 * n


def test_a_guide_may_watch_the_first_attempt_then_restart_cooler_and_shorter(llama_model):
    """A guide with `first_alone` leaves a block's first attempt exactly as the model alone runs it (its own early
    stop, nothing re-noised), then restarts the canvas it objects to; `temperatures` and `steps` are the restarts'
    schedule and step cap."""
    from dglocal.generation.sampler import temperature

    class Watcher:
        first_alone, temperatures, steps = True, (0.1, 0.2), 5

        def __call__(self, draft, accepted):
            return [0]  # always objects: every attempt it may restart, it does

    opts = dict(EARLY, eos_token_id=(), max_new_tokens=16)
    alone = [e for e in stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), **opts) if isinstance(e, Step)]
    steps = [e for e in stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), guide=Watcher(), guide_restarts=2,
                               **opts) if isinstance(e, Step)]
    first, rest = steps[:len(alone)], steps[len(alone):]
    for a, g in zip(alone, first):
        np.testing.assert_array_equal(a.argmax, g.argmax)
        assert a.temperature == g.temperature and g.guided is None
    assert len(alone) < EARLY["max_denoising_steps"]  # the model stopped early alone
    n = Watcher.steps  # each restart ran to the guide's cap, flagged, at the guide's schedule over that cap
    assert len(rest) == 2 * n and all(s.guided[0] for s in rest)
    assert [s.temperature for s in rest] == pytest.approx([temperature(n - i, n, 0.1, 0.2) for i in range(n)] * 2)


def test_a_guide_s_step_cap_is_checked(llama_model):
    for bad, message in [(0, "a guide's steps must be in 1..65536, got 0"), (2.5, "must be an integer, got 2.5"),
                         (True, "must be an integer, got True"), (70000, "must be in 1..65536, got 70000")]:
        guide = type("Guide", (), {"steps": bad, "__call__": lambda self, draft, accepted: []})()
        with pytest.raises(ConfigError, match=message):
            list(stream(llama_model, PROMPTS[3], guide=guide, **dict(EARLY, max_new_tokens=16)))


def test_a_guide_s_temperatures_are_checked(llama_model):
    """As the request's own schedule (config.check_schedule), with the request's temperature factor on it, before
    the first pass."""
    for bad, options, message in [
            ((0.7, 0.3), {}, "a guide's t_max must be > t_min, got t_max=0.3 and t_min=0.7"),
            ((0.5, 0.5), {}, "a guide's t_max must be > t_min, got t_max=0.5 and t_min=0.5"),
            ((-0.1, 0.3), {}, "a guide's temperatures must be in [0.0001, 10000] (the logits are divided by them), "
                              "got t_min=-0.1 and t_max=0.3"),
            ((0.0, 0.3), {}, "a guide's temperatures must be in [0.0001, 10000]"),
            ((0.3, 1e9), {}, "a guide's temperatures must be in [0.0001, 10000]"),
            ((0.005, 0.5), {"temperature": 0.015}, "temperature 0.015 puts a guide's schedule 0.005..0.5 outside "
                                                   "[0.0001, 10000]"),
            ((0.1, float("nan")), {}, "a guide's temperatures must be finite, got t_min=0.1 and t_max=nan"),
            ((0.1, float("inf")), {}, "must be finite"), ((0.1, 0.2, 0.3), {}, "a pair"), (0.5, {}, "a pair"),
            (("a", 1.0), {}, "a pair"), ((True, 1.0), {}, "a pair")]:
        guide = type("Guide", (), {"temperatures": bad, "__call__": lambda self, draft, accepted: []})()
        events = stream(llama_model, PROMPTS[3], guide=guide, **dict(EARLY, max_new_tokens=16, **options))
        with pytest.raises(ConfigError, match=re.escape(message)):
            next(events)  # checked before any pass: no step comes first


def test_a_guide_s_view_restates_the_problem_and_maps_the_drafts_back(llama_model):
    """A View from the guide's view(attempt, seed): the restart denoises the view's prompt (re-encoded after the
    prefix it shares), and the guide, the events and the output see its drafts in the world's positions and tokens.
    The model's side of that attempt is exactly a plain generation over the view's prompt, flagged where the view
    holds the world's flagged position, on the same cache with the same noise."""
    from dglocal.generation.views import View

    rng = np.random.default_rng(5)
    order, tokens = rng.permutation(C), rng.permutation(V)
    view = View(PROMPTS[3][:5] + [int(t) for t in rng.integers(10, V, 6)], order, tokens)
    n, flagged = EARLY["max_denoising_steps"], 3  # the guides always object: every attempt runs n steps

    class Restater:  # flags everything in the first attempt: the block ends with the second, the least flagged
        drafts: list = []

        def __call__(self, draft, accepted):
            self.drafts.append(draft.copy())
            return range(C) if len(self.drafts) <= n else [flagged]

        def view(self, attempt, seed):
            return view if attempt == 1 else None

    opts = dict(EARLY, eos_token_id=(), max_new_tokens=C, guide_restarts=1)
    seq, guide = llama_model.sequence(), Restater()
    events = list(stream(llama_model, PROMPTS[3], seq=seq, noise=SeededNoise(V, 9), guide=guide, **opts))
    assert seq.tokens == list(view.prompt)
    restated = [e for e in events if isinstance(e, Step)][n:]
    where = int(np.flatnonzero(order == flagged)[0])
    calls = []
    plain = list(stream(llama_model, view.prompt, seq=seq, noise=SeededNoise(V, 9),
                        guide=lambda d, a: calls.append(1) or (range(C) if len(calls) <= n else [where]), **opts))
    assert plain[-1].stats.prefilled_tokens == 0  # the same cache: nothing encoded again
    model_side = [e for e in plain if isinstance(e, Step)][n:]
    assert len(restated) == len(model_side) == n
    for mine, theirs, seen in zip(restated, model_side, guide.drafts[n:]):
        np.testing.assert_array_equal(mine.argmax, view.world(theirs.argmax))
        np.testing.assert_array_equal(seen, mine.argmax)
        np.testing.assert_array_equal(mine.accepted, view.world_mask(theirs.accepted))
        np.testing.assert_array_equal(mine.guided, view.world_mask(theirs.guided))
        assert mine.guided[flagged] and not mine.accepted[flagged] and mine.guided.sum() == 1
    assert events[-1].tokens == view.world(np.asarray(plain[-1].tokens)).tolist()
    assert not np.array_equal(restated[-1].argmax, model_side[-1].argmax)  # the mapping is not the identity


def test_views_are_checked(llama_model):
    from dglocal.generation.views import View

    for args, message in [(([], range(C), range(V)), "prompt must be a non-empty list"),
                          (([2], [0] * C, range(V)), "order must be a permutation"),
                          (([2], range(C), [1.5] * V), "tokens must be a 1-D list of integers")]:
        with pytest.raises(ConfigError, match=message):
            View(*args)

    def guide_with(view):
        return type("Guide", (), {"__call__": lambda self, d, a: [0], "view": lambda self, attempt, seed: view})()

    opts = dict(EARLY, max_new_tokens=C, guide_restarts=1)
    for view, message in [("turned", "returns a View or None, got str"),
                          (View([2], range(C + 1), range(V)), f"covers {C + 1} positions, the canvas has {C}")]:
        with pytest.raises(ConfigError, match=message):
            list(stream(llama_model, PROMPTS[3], guide=guide_with(view), **opts))
    with pytest.raises(ConfigError, match="a generation of one canvas"):
        list(stream(llama_model, PROMPTS[3], guide=guide_with(None), **dict(opts, max_new_tokens=2 * C)))


def test_a_block_still_objected_to_ends_with_its_least_flagged_attempt(llama_model):
    """Out of restarts, the block is the last draft of the attempt the guide flagged the fewest positions of (the
    earliest of equals), not the last attempt's."""
    n = EARLY["max_denoising_steps"]
    flags = [[0, 1, 2], [0], [0, 1], [4]]  # always objects, so every attempt runs n steps
    drafts = []

    def guide(draft, accepted):
        drafts.append(draft.copy())
        return flags[(len(drafts) - 1) // n]

    opts = dict(EARLY, eos_token_id=(), max_new_tokens=16, guide_restarts=3)
    events = list(stream(llama_model, PROMPTS[3], noise=SeededNoise(V, 9), guide=guide, **opts))
    assert len(drafts) == 4 * n
    assert events[-1].tokens == drafts[2 * n - 1][:16].tolist()
    assert events[-1].tokens != drafts[-1][:16].tolist()  # the last attempt ended elsewhere
