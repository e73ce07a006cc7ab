"""The windowed sliding-layer cache against the reference: long prompts, chats, and truncations into the window.

The tiny model's window is 8 tokens; with micro-batches of 16 the windowed cache has 256 cells per sequence, so
prompts of a few hundred tokens make llama.cpp overwrite sliding keys. Every comparison is with the reference
(the real transformers model, which keeps every key).
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from reference_harness import ReferenceModel

import dglocal
from dglocal.runtime import swa
from dglocal.generation.driver import generate

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

W, C, V = tiny.TEXT["sliding_window"], tiny.CANVAS, tiny.VOCAB
ATOL = 2e-4
GEN = dict(max_new_tokens=32, max_denoising_steps=4, entropy_bound=0.1, t_min=0.4, t_max=0.8,
           stability_threshold=1, confidence_threshold=0.005, eos_token_id=())


@pytest.fixture(scope="module")
def ref(tiny_model):
    return ReferenceModel(tiny_model)


def windowed(path, **opts):
    return dglocal.load(path, n_ctx=1024, n_ubatch=16, kv_type="f32", n_threads=2, flash_attn=False,
                        swa_full=False, **opts)


@pytest.fixture(scope="module")
def win(tiny_f32_gguf):
    m = windowed(tiny_f32_gguf, swa_checkpoints=32)
    yield m
    m.close()


def tokens(n, seed):
    return np.random.default_rng(seed).integers(3, V, n).tolist()


def canvas(seed):
    return np.random.default_rng(seed).integers(0, V, C).astype(np.int32)


def assert_same_denoise(seq, ref, held, seed):
    """The next canvas' logits over `held` (what seq should hold) equal the reference's over the same tokens."""
    assert seq.tokens == held
    rseq = ref.sequence()
    rseq.prefill(held)
    got = seq.denoise(canvas(seed), temperature=0.6, self_condition=False, return_logits=True)
    want = rseq.denoise(canvas(seed), temperature=0.6, self_condition=False, return_logits=True)
    np.testing.assert_allclose(got.logits / 0.6, want.logits, atol=ATOL, rtol=0)


def pos_min(seq):
    return seq._nat.llama_memory_seq_pos_min(seq._mem, seq.seq_id)


def grown(win, n_prompt=300, n_commits=20):
    """A sequence of a long prompt and committed blocks, far past the windowed cache's 256 cells."""
    seq = win.sequence()
    seq.prefill(tokens(n_prompt, 1))
    for k in range(n_commits):
        seq.commit(canvas(100 + k))
    assert pos_min(seq) >= len(seq.tokens) - 256 > 0  # llama.cpp has overwritten the oldest sliding keys
    return seq


def test_long_sequences_are_exact(win, ref):
    seq = grown(win, n_commits=3)
    assert_same_denoise(seq, ref, list(seq.tokens), 1)


def test_truncation_into_the_window_restores_a_checkpoint(win, ref):
    """Cut back past what the window still holds: the latest checkpoint at or before the cut, then re-encoding."""
    seq = grown(win)
    held = list(seq.tokens)
    n = 300 + 2 * C + 5  # 5 tokens after the checkpoint taken at the second commit
    assert pos_min(seq) > n - W + 1  # the keys position n reads are gone
    assert seq.truncate(n) == 5
    assert_same_denoise(seq, ref, held[:n], 2)


def test_truncation_without_a_checkpoint_re_encodes_from_the_start(tiny_f32_gguf, ref):
    """Today's failure: llama_memory_seq_rm reports success though the sliding keys are gone."""
    m = windowed(tiny_f32_gguf, swa_checkpoints=0)
    try:
        seq = grown(m)
        held = list(seq.tokens)
        assert seq.truncate(2 * W) == 2 * W
        assert_same_denoise(seq, ref, held[:2 * W], 3)
        seq.truncate(0)
        assert seq.tokens == [] and pos_min(seq) == -1
    finally:
        m.close()


def test_truncation_the_window_still_covers_re_encodes_nothing(win, ref):
    seq = grown(win)
    held = list(seq.tokens)
    n = len(held) - C - 3
    assert seq.truncate(n) == 0
    assert_same_denoise(seq, ref, held[:n], 4)


def test_chat_turns_cutting_into_the_window_equal_the_reference(win, ref):
    """generate's prompt cache. Turn 2 shares only the first 200 of turn 1's 600 tokens (~400 behind the window,
    before any checkpoint): re-encoded from the start. Turn 3 cuts 10 tokens after turn 2's prompt, ~300 behind
    the window: the checkpoint taken after that prompt serves it."""
    first, second = tokens(600, 5), tokens(200, 5) + tokens(150, 6)
    seq = win.sequence()
    generate(win, first, seq=seq, seed=1, **GEN)
    got = generate(win, second, seq=seq, seed=2, **dict(GEN, max_new_tokens=20 * C))
    assert got.stats.prefilled_tokens == len(second)
    third = seq.tokens[:len(second) + 10] + tokens(20, 7)
    again = generate(win, third, seq=seq, seed=3, **GEN)
    assert again.stats.prefilled_tokens == 30
    for prompt, out, opts in [(second, got, dict(seed=2, max_new_tokens=20 * C)), (third, again, dict(seed=3))]:
        assert out.tokens == generate(ref, prompt, **dict(GEN, **opts)).tokens


def test_default_is_full_for_short_contexts_and_windowed_for_long(tiny_f32_gguf):
    assert swa.full_by_default(3072, 1024, 512)  # 26B: windowed, its sliding layers take 1536 cells
    assert not swa.full_by_default(4096, 1024, 512)
    assert swa.full_by_default(1 << 20, 0, 512)  # nothing slides
    for n_ctx, full in [(512, True), (2048, False)]:
        m = dglocal.load(tiny_f32_gguf, n_ctx=n_ctx, n_ubatch=16, n_threads=1)
        try:
            assert m.swa_full is full
            seq = m.sequence()
            assert (seq._window is None) is full
        finally:
            m.close()
