"""The fast sampler (docs/sampler.md#the-fast-sampler) against the reference on the tiny random checkpoint.

Without freezing it is the reference sampler: with the whole vocabulary token for token and step for step, with
fast_k < n_vocab the reference run on logits truncated to each position's fast_k largest (what the top-K
reductions mean). Freezing is what changes the trajectory. The backend's part: a pass over some positions with
the others' keys and values kept from an earlier pass gives those positions exactly what the whole pass gave."""

import os

import numpy as np
import pytest
import torch
from reference_harness import ReferenceModel
from test_generate import BASE, C, EARLY, PROMPT, V, run_driver, run_reference, tm  # noqa: F401 (tm: a fixture)

import dglocal
from dglocal.errors import BackendError, ConfigError
from dglocal.generation.config import GenerationConfig
from dglocal.generation.driver import generate, generate_many, stream
from dglocal.generation.sampler import SeededNoise
from dglocal.runtime.fastpass import FastPass

pytestmark = pytest.mark.gpu_tier

CONFIGS = [(0, BASE), (1, dict(BASE, entropy_bound=0.4, t_min=0.2, t_max=1.2)), (2, EARLY),
           (3, dict(EARLY, stability_threshold=2))]
K = 24  # a top-K well inside the 512-token vocabulary


def canvases(blocks) -> list[int]:
    return np.concatenate([b.canvas for b in blocks]).tolist()


@pytest.mark.parametrize("seed,cfg", CONFIGS)
def test_without_freezing_it_is_the_reference_trajectory(tm, llama_model, seed, cfg):  # noqa: F811
    ref_tokens, ref_steps = run_reference(tm, seed, **cfg)
    blocks, _, _ = run_driver(llama_model, seed, sampler="fast", fast_k=V, freeze=False, **cfg)
    assert canvases(blocks) == ref_tokens
    assert [b.steps for b in blocks] == ref_steps


class TruncatedReference(ReferenceModel):
    """The reference model whose every step keeps each position's k largest processed logits (the rest -inf)
    before the argmax, the draw, the entropy and the next step's self-conditioning."""

    def __init__(self, tm, k, **kw):
        super().__init__(tm, **kw)
        self.k = k

    def sequence(self):
        seq = super().sequence()
        step = seq.denoise

        def denoise(canvas, **kw):
            kw.pop("return_logits", None)
            out = step(canvas, **kw, return_logits=True)
            x = out.logits.astype(np.float64)
            # the k largest, ties to the lower id (a stable sort of -x)
            keep = np.zeros_like(x, dtype=bool)
            np.put_along_axis(keep, np.argsort(-x, axis=-1, kind="stable")[:, :self.k], True, axis=-1)
            x = np.where(keep, x, -np.inf)
            logp = x - x.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            p = np.exp(logp)
            seq._sc = torch.as_tensor(np.where(keep, out.logits, -np.inf), dtype=torch.float32).unsqueeze(0)
            u = kw.get("uniforms")
            out.argmax = x.argmax(-1).astype(np.int32)
            out.sampled = None if u is None else np.minimum(
                (np.cumsum(p, -1) < np.asarray(u, np.float64)[:, None]).sum(-1), V - 1).astype(np.int32)
            out.entropy = (-(p * np.where(keep, logp, 0.0)).sum(-1)).astype(np.float32)
            return out

        seq.denoise = denoise
        return seq


@pytest.mark.parametrize("seed,cfg", CONFIGS[:3])
def test_top_k_without_freezing_is_the_reference_on_truncated_logits(tm, llama_model, seed, cfg):  # noqa: F811
    truncated = TruncatedReference(tm, K, n_ctx=1024, eos_ids=(1, 106, 50))
    ref_blocks, _, _ = run_driver(truncated, seed, **cfg)
    blocks, _, _ = run_driver(llama_model, seed, sampler="fast", fast_k=K, freeze=False, **cfg)
    assert canvases(blocks) == canvases(ref_blocks)
    assert [b.steps for b in blocks] == [b.steps for b in ref_blocks]


def test_freezing_is_what_changes_it_and_it_saves_work(tm, llama_model):  # noqa: F811
    differs = 0
    for seed, cfg in CONFIGS:
        ref_tokens, ref_steps = run_reference(tm, seed, **cfg)
        done = generate(llama_model, PROMPT, noise=SeededNoise(V, seed), eos_token_id=(), sampler="fast", fast_k=V,
                        **cfg)
        s = done.stats
        assert len(done.tokens) == cfg["max_new_tokens"] and s.canvases == 3
        assert s.forward_positions <= C * sum(s.steps_per_canvas)
        differs += done.tokens != ref_tokens[:cfg["max_new_tokens"]] or s.steps_per_canvas != ref_steps
    assert differs  # freezing changes the trajectory (random weights barely settle: the near-greedy ones do)
    # near-greedy: the positions freeze within a few steps, and the canvas ends when all have
    _, ref_steps = run_reference(tm, 2, **EARLY)
    done = generate(llama_model, PROMPT, noise=SeededNoise(V, 2), eos_token_id=(), sampler="fast", **EARLY)
    assert sum(done.stats.steps_per_canvas) < sum(ref_steps)
    assert done.stats.forward_positions < C * sum(ref_steps)
    # some positions frozen before others: passes that run part of the canvas
    slow = dict(EARLY, confidence_threshold=0.002, max_denoising_steps=12)
    done = generate(llama_model, PROMPT, noise=SeededNoise(V, 2), eos_token_id=(), sampler="fast", **slow)
    assert done.stats.forward_positions < C * sum(done.stats.steps_per_canvas)


# a device runs the op chain whichever is asked: the GPU tier takes that path once
@pytest.fixture(scope="module", params=["chain"] if os.environ.get("DGLOCAL_TEST_DEVICE") else ["auto", "chain"])
def two_paths(request, tiny_f32_gguf):
    """The tiny model with each reductions path (the fused CPU op or the op chain)."""
    m = dglocal.load(tiny_f32_gguf, n_ctx=1024, kv_type="f32", n_threads=2, flash_attn=False, n_seq_max=3,
                     reductions=request.param)
    yield m
    m.close()


def _pass_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, C).astype(np.int32), rng.random(C).astype(np.float32)


def test_kept_keys_reproduce_the_whole_pass(two_paths):
    """Positions run again while the rest of the canvas is frozen (its K/V kept by a first pass over the same
    tokens) get what the whole pass gave them: the sliding window (8 < the 21-token prefix) is taken from the
    canvas' first position, and the kept cells are attended to as the canvas' own."""
    model = two_paths
    canvas, u = _pass_inputs()
    with model.sequence() as seq:
        seq.prefill(PROMPT)
        whole = seq.denoise(canvas, temperature=0.7, uniforms=u, self_condition=False, return_logits=True)
        keep = np.arange(C) > 0
        kept = seq.denoise(canvas, temperature=0.7, uniforms=u, self_condition=False, return_logits=True,
                           fast=FastPass(keep=keep))
        np.testing.assert_array_equal(kept.logits, whole.logits)
        idx = np.array([0, 3, 7, 12], np.int32)
        part = seq.denoise(canvas, temperature=0.7, uniforms=u, self_condition=False, return_logits=True,
                           fast=FastPass(idx, np.zeros(idx.size, bool), frozen=True))
        scale = np.abs(whole.logits).max()
        np.testing.assert_allclose(part.logits[idx], whole.logits[idx], rtol=0, atol=1e-5 * scale)
        assert np.isnan(part.logits[1]).all()  # not run
        np.testing.assert_array_equal(part.argmax[idx], whole.argmax[idx])
        np.testing.assert_array_equal(part.sampled[idx], whole.sampled[idx])
        np.testing.assert_allclose(part.entropy[idx], whole.entropy[idx], atol=1e-5)
        # the positions not run: their own tokens, entropy 0
        rest = np.setdiff1d(np.arange(C), idx)
        np.testing.assert_array_equal(part.argmax[rest], canvas[rest])
        assert (part.entropy[rest] == 0).all()
        # a new canvas drops what the last one kept: the cache holds the prompt again
        seq.denoise(canvas, temperature=0.7, uniforms=u, self_condition=False)
        assert _last_position(model, seq) == len(PROMPT) - 1


def _last_position(model, seq) -> int:
    return model.native(model._nat.llama_memory_seq_pos_max, seq._mem, seq.seq_id)


def test_top_k_of_the_whole_vocabulary_is_the_whole_pass(two_paths):
    """fast_k = n_vocab through the top-K reductions: the same argmax and draw, the entropy and the next step's
    self-conditioned logits within float rounding."""
    model = two_paths
    canvas, u = _pass_inputs(1)
    nxt, _ = _pass_inputs(2)
    with model.sequence() as seq:
        seq.prefill(PROMPT)
        outs = []
        for fast in (None, FastPass(fast_k=V)):
            first = seq.denoise(canvas, temperature=0.7, uniforms=u, self_condition=False, fast=fast)
            second = seq.denoise(nxt, temperature=0.7, uniforms=u, self_condition=True, return_logits=True)
            outs.append((first, second))
        (a, a2), (b, b2) = outs
        np.testing.assert_array_equal(b.argmax, a.argmax)
        np.testing.assert_array_equal(b.sampled, a.sampled)
        np.testing.assert_allclose(b.entropy, a.entropy, atol=1e-5)
        np.testing.assert_allclose(b2.logits, a2.logits, rtol=0, atol=1e-5 * np.abs(a2.logits).max())


def test_batched_equals_single(two_paths):
    prompts = [PROMPT, PROMPT[:15], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48]]
    opts = dict(seed=5, max_new_tokens=2 * C, max_denoising_steps=6, eos_token_id=(), sampler="fast", fast_k=K,
                **{k: EARLY[k] for k in ("entropy_bound", "t_min", "t_max", "confidence_threshold")})
    together = generate_many(two_paths, prompts, **opts)  # prompt i draws from (seed, i) either way
    with two_paths.sequence() as one:
        alone = generate_many(two_paths, prompts, sequences=[one], **opts)  # one at a time
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.stats.steps_per_canvas for c in together] == [c.stats.steps_per_canvas for c in alone]
    assert [c.stats.forward_positions for c in together] == [c.stats.forward_positions for c in alone]


def test_a_dropped_generation_leaves_no_canvas_cells(llama_model):
    with llama_model.sequence() as seq:
        seq.prefill(PROMPT)
        events = stream(llama_model, PROMPT, seq=seq, noise=SeededNoise(V, 0), eos_token_id=(), sampler="fast",
                        **dict(BASE, max_denoising_steps=8))
        steps = 0
        for e in events:
            steps += e.kind == "step"
            if steps == 3:  # mid-canvas, positions frozen
                break
        events.close()
        # the next generation on the sequence starts clean and equals one on a fresh sequence
        again = generate(llama_model, PROMPT, seq=seq, noise=SeededNoise(V, 4), eos_token_id=(), sampler="fast",
                         **EARLY)
        assert _last_position(llama_model, seq) == len(seq.tokens) - 1
    fresh = generate(llama_model, PROMPT, noise=SeededNoise(V, 4), eos_token_id=(), sampler="fast", **EARLY)
    assert again.tokens == fresh.tokens


def test_a_failed_pass_ends_the_generation_and_drops_its_canvas(llama_model, monkeypatch):
    """A failure at the native boundary mid-canvas: a clear error, and the cache holds the committed tokens only."""
    nat = llama_model._nat
    real, calls = nat.llama_dg_denoise_batch, []

    def failing(ctx, cs, n, logits):
        calls.append(n)
        if len(calls) == 4:
            real(ctx, cs, n, logits)  # its cells go in, then it "fails": the library drops them itself
            return -6
        return real(ctx, cs, n, logits)

    monkeypatch.setattr(nat, "llama_dg_denoise_batch", failing)
    with llama_model.sequence() as seq:
        with pytest.raises(BackendError, match="denoise failed"):
            generate(llama_model, PROMPT, seq=seq, noise=SeededNoise(V, 0), eos_token_id=(), sampler="fast",
                     **dict(BASE, entropy_bound=1.0))
        assert not seq._cells.kept
        monkeypatch.setattr(nat, "llama_dg_denoise_batch", real)
        seq.rewind(len(PROMPT))
        assert _last_position(llama_model, seq) == len(PROMPT) - 1


@pytest.mark.parametrize("fast,needle", [
    (FastPass(index=np.array([1, 2])), "index must rise from 0"),
    (FastPass(index=np.array([0, 2, 2])), "index must rise from 0"),
    (FastPass(index=np.array([0, C])), "index must rise from 0"),
    (FastPass(keep=np.ones(3, bool)), "keep needs one flag per evaluated position"),
    (FastPass(fast_k=V + 1), "fast_k must be in 0..512"),
])
def test_bad_fast_passes_name_the_field(llama_model, fast, needle):
    with llama_model.sequence() as seq:
        seq.prefill(PROMPT)
        with pytest.raises(ConfigError, match=needle):
            seq.denoise(np.zeros(C, np.int32), temperature=1.0, self_condition=False, fast=fast)
        with pytest.raises(BackendError, match="frozen positions are no longer cached"):
            seq.denoise(np.zeros(C, np.int32), temperature=1.0, self_condition=True,
                        fast=FastPass(np.arange(4, dtype=np.int32), np.zeros(4, bool), frozen=True))


@pytest.mark.parametrize("change,needle", [
    (dict(sampler="turbo"), "sampler must be one of"), (dict(fast_k=0), "fast_k must be in"),
    (dict(freeze="yes"), "freeze must be true or false"),
])
def test_bad_settings_name_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle):
        GenerationConfig(**change)
