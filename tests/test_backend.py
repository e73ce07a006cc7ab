"""The patched llama.cpp backend against the reference, on the tiny random checkpoint converted to f32 GGUF.

Every number compared here comes from the reference (tests/reference_harness.py drives the real transformers
model exactly as its `generate` does); nothing is compared with values produced by dglocal itself.
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from reference_harness import ReferenceModel, encoder_logits

from dglocal.errors import ConfigError, BackendError, ContextError, ModelError

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

W = tiny.TEXT["sliding_window"]
C = tiny.CANVAS
ATOL = 2e-4  # fp32 conversions match the reference to ~1e-4 (docs/quantization.md)


@pytest.fixture(scope="module")
def ref(tiny_model):
    return ReferenceModel(tiny_model)


@pytest.fixture
def model(llama_model):
    return llama_model


def prompt(n, seed=1):
    return np.random.default_rng(seed).integers(3, tiny.VOCAB, n).tolist()


def canvas(seed):
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, C).astype(np.int32)


def test_metadata(model):
    assert model.canvas_length == C
    assert model.n_vocab == tiny.VOCAB
    assert model.metadata["general.architecture"] == "diffusion-gemma"


@pytest.mark.parametrize("n_prompt", [5, W + 13])  # within and beyond the sliding window
def test_denoise_matches_reference(model, ref, n_prompt):
    """Two decoder steps (the second self-conditioned on the first) and a commit, then a second canvas."""
    seq, rseq = model.sequence(), ref.sequence()
    p = prompt(n_prompt)
    seq.prefill(p)
    rseq.prefill(p)
    u = np.random.default_rng(7).random(C)
    for step, (cv, temp, sc) in enumerate([(canvas(1), 0.8, False), (canvas(2), 0.55, True)]):
        got = seq.denoise(cv, temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
        want = rseq.denoise(cv, temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
        np.testing.assert_allclose(got.logits / temp, want.logits, atol=ATOL, rtol=0, err_msg=f"step {step}")
        np.testing.assert_array_equal(got.argmax, want.argmax)
        np.testing.assert_array_equal(got.sampled, want.sampled)
        np.testing.assert_allclose(got.entropy, want.entropy, atol=1e-4, rtol=1e-4)
        assert seq.n_past == n_prompt  # the decoder never writes the cache

    seq.commit(got.argmax)
    rseq.commit(want.argmax)
    assert seq.n_past == n_prompt + C
    got = seq.denoise(canvas(3), temperature=0.7, return_logits=True, self_condition=False)
    want = rseq.denoise(canvas(3), temperature=0.7, return_logits=True, self_condition=False)
    np.testing.assert_allclose(got.logits / 0.7, want.logits, atol=ATOL, rtol=0)


def test_encoder_logits_match_reference(model, tiny_model):
    """The encoder pass with the LM head: the autoregressive view of the same weights."""
    p = prompt(W + 5, seed=3)
    got = model.sequence().prefill(p, logits_last=True)
    np.testing.assert_allclose(got, encoder_logits(tiny_model, p)[-1], atol=ATOL, rtol=0)


def test_encoder_logits_of_every_token_match_reference(model, tiny_model):
    """prefill(logits_all=True): the next-token logits after every prompt token (bench's LM-head measure)."""
    p = prompt(W + 5, seed=5)
    seq = model.sequence()
    got = seq.prefill(p, logits_all=True)
    assert got.shape == (len(p), model.n_vocab) and seq.n_past == len(p)
    np.testing.assert_allclose(got, encoder_logits(tiny_model, p), atol=ATOL, rtol=0)


def test_encoder_logits_of_a_long_prompt_match_reference(model, tiny_model):
    """100 tokens at once: each of the 8 experts gets ~25 rows, the size at which the CPU backend runs an expert as
    one gathered GEMM rather than dot products (and every projection takes the blocked GEMM)."""
    p = prompt(100, seed=8)
    got = model.sequence().prefill(p, logits_all=True)
    np.testing.assert_allclose(got, encoder_logits(tiny_model, p), atol=ATOL, rtol=0)


def test_denoise_leaves_cache_intact(model, ref):
    """Many canvases at advancing positions, then a commit: the next canvas still sees the same prefix."""
    seq, rseq = model.sequence(), ref.sequence()
    p = prompt(3 * W, seed=4)
    seq.prefill(p)
    rseq.prefill(p)
    for i in range(5):
        seq.denoise(canvas(10 + i), temperature=0.5, self_condition=i > 0)
    assert seq.n_past == len(p)
    got = seq.denoise(canvas(20), temperature=0.5, self_condition=False, return_logits=True)
    want = rseq.denoise(canvas(20), temperature=0.5, self_condition=False, return_logits=True)
    np.testing.assert_allclose(got.logits / 0.5, want.logits, atol=ATOL, rtol=0)


def test_truncate_then_continue(model, ref):
    seq, rseq = model.sequence(), ref.sequence()
    p = prompt(2 * W + 3, seed=5)
    seq.prefill(p)
    seq.truncate(W + 1)
    seq.prefill(p[W + 1:])
    rseq.prefill(p)
    got = seq.denoise(canvas(5), temperature=0.6, self_condition=False, return_logits=True)
    want = rseq.denoise(canvas(5), temperature=0.6, self_condition=False, return_logits=True)
    np.testing.assert_allclose(got.logits / 0.6, want.logits, atol=ATOL, rtol=0)


def test_invalid_arguments_raise(model):
    seq = model.sequence()
    seq.prefill(prompt(4))
    bad = [
        (dict(canvas=np.full(C, tiny.VOCAB, np.int32)), r"canvas ids must be in \[0, 512\), got 512"),
        (dict(canvas=np.full(C, 2**32, np.int64)), r"got 4294967296"),  # no wrap to 0
        (dict(canvas=np.full(C, 3.7)), "canvas ids must be integers"),  # no truncation to 3
        (dict(canvas=canvas(1)[:-1]), f"the canvas has {C - 1} tokens, the model's canvas_length is {C}"),
        (dict(canvas=np.zeros(model.n_ubatch + 1, np.int32)), "canvas_length"),
        (dict(temperature=0.0), r"temperature must be a number in \[0.0001, 10000\], got 0.0"),
        (dict(temperature=1e-45), "temperature must be"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(uniforms=np.full(C, 2.0)), r"uniforms must be 16 numbers in \[0, 1\]"),
        (dict(uniforms=np.zeros(C - 1)), "uniforms must be"),
    ]
    for kw, message in bad:
        args = dict(canvas=canvas(1), temperature=1.0) | kw
        with pytest.raises(ConfigError, match=message):
            seq.denoise(args.pop("canvas"), **args)
    assert seq.n_past == 4
    # the sequence still works after the refusals
    seq.denoise(canvas(1), temperature=1.0, self_condition=False)


def test_context_overflow_is_refused(model):
    seq = model.sequence()
    seq.prefill(prompt(model.n_ctx - C + 1))
    with pytest.raises(ContextError):
        seq.denoise(canvas(1), temperature=1.0)
    with pytest.raises(ContextError):
        seq.prefill(prompt(C))


def test_bad_files_are_refused(tmp_path, tiny_vocab):
    import dglocal

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelError, match="junk.gguf"):
        dglocal.load(junk)
    with pytest.raises(ModelError, match="architecture"):
        dglocal.load(tiny_vocab)  # a valid GGUF of another architecture
    with pytest.raises(ModelError, match="no such file"):
        dglocal.load(tmp_path / "missing.gguf")


def test_tokenize_more_tokens_than_bytes(model):
    # byte fallback: the 512-token cut of the Gemma 4 vocabulary has no "▁" (its escaped space), so a space
    # costs the three byte tokens of "▁" and comes back as "▁", exactly as llama.cpp's own detokenizer does
    text = "a é ✓ " * 20
    toks = model.tokenize(text, add_special=False)
    assert len(toks) > len(text.encode())
    assert model.detokenize(toks) == text.replace(" ", "\u2581")


def test_load_seed_makes_generations_reproducible(tiny_f32_gguf):
    import dglocal

    opts = dict(max_new_tokens=16, max_denoising_steps=3)
    runs = []
    for _ in range(2):
        with dglocal.load(tiny_f32_gguf, n_ctx=256, n_threads=2, seed=123) as m:
            runs.append([m.generate([2, 10, 11, 12], **opts).tokens for _ in range(2)])
    assert runs[0] == runs[1]  # same load seed: the same sequence of answers
    assert runs[0][0] != runs[0][1]  # but each call draws a fresh seed from it


def test_precision_option(tiny_f32_gguf):
    """precision: "auto" or "f32" (f32 device math, decided once per process); anything else names the value."""
    import dglocal

    with pytest.raises(ConfigError, match=r"precision must be one of \['auto', 'f32'\], got 'f16'"):
        dglocal.load(tiny_f32_gguf, precision="f16")
    with dglocal.load(tiny_f32_gguf, n_ctx=256, n_threads=1, precision="f32") as m:
        assert m.sequence().prefill([2, 10, 11], logits_last=True).shape == (tiny.VOCAB,)


def test_two_models_in_one_process_keep_their_own_parameters(tiny_f32_gguf, ref):
    """The soft embedding's type, the precision and the reductions' shape are context parameters
    (llama_dg_params), not process-wide switches: two models loaded side by side each get their own, and each
    matches the reference (the f16 copy of E within its rounding, on the self-conditioned step it feeds)."""
    import dglocal
    from dglocal.runtime.diagnostics import memory_breakdown

    common = dict(n_ctx=256, kv_type="f32", n_threads=2, flash_attn=False)
    with dglocal.load(tiny_f32_gguf, soft_embedding="f32", precision="f32", **common) as a, \
            dglocal.load(tiny_f32_gguf, soft_embedding="f16", reductions="chain", **common) as b:
        held = [sum(d["model"] for d in memory_breakdown(m.model).values()) for m in (a, b)]
        assert held[0] - held[1] == tiny.VOCAB * tiny.TEXT["hidden_size"] * 2  # E^T in f32 beside E^T in f16
        p, u = prompt(9), np.random.default_rng(7).random(C)
        logits = []
        for m, tol in ((a, ATOL), (b, 1e-2)):  # f16's 5e-4 relative on the soft embedding: ~3e-3 here
            seq, rseq = m.sequence(), ref.sequence()
            seq.prefill(p)
            rseq.prefill(p)
            for cv, temp, sc in [(canvas(1), 0.8, False), (canvas(2), 0.55, True)]:
                got = seq.denoise(cv, temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
                want = rseq.denoise(cv, temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
                np.testing.assert_allclose(got.logits / temp, want.logits, atol=ATOL if not sc else tol, rtol=0)
            logits.append(got.logits)
            seq.release()
        assert not np.array_equal(logits[0], logits[1])  # the f16 copy is what b's second step saw


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("reductions", ["auto", "chain"])
def test_logprobs_are_the_references_on_the_device(tiny_f32_gguf, ref, reductions):
    """The top ids and log-probabilities of the model's own distribution (softcapped logits at temperature 1, no
    filter), the canvas token's and the argmax', against log_softmax of the reference's logits: on the fused CPU
    op and on the op chain, unfiltered and under top-k and a token mask (the values stay the model's, the argmax
    the filtered one's), self-conditioned too."""
    import dglocal
    from dglocal.runtime.filters import Filters

    k = 5
    with dglocal.load(tiny_f32_gguf, n_ctx=256, kv_type="f32", n_threads=2, flash_attn=False,
                      reductions=reductions) as m:
        seq, rseq = m.sequence(), ref.sequence()
        p, u = prompt(9), np.random.default_rng(7).random(C)
        seq.prefill(p)
        rseq.prefill(p)
        banned = np.full((1, (tiny.VOCAB + 31) // 32), 0xFFFFFFFF, dtype=np.uint32)
        banned[0, :4] = 0  # ids 0 to 127 masked: the argmax moves, the model's log-probabilities do not
        masked = Filters(top_k=7, allow=banned, allow_row=np.zeros(C, dtype=np.int32))
        for cv, temp, sc, filters in [(canvas(1), 0.8, False, None), (canvas(2), 0.55, True, None),
                                      (canvas(4), 0.6, True, masked)]:
            want = rseq.denoise(cv, temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
            got = seq.denoise(cv, temperature=temp, uniforms=u, self_condition=sc, filters=filters, n_probs=k)
            lp = _log_softmax(want.logits * temp)  # the reference's logits are the processed ones, raw / T
            order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(got.top_ids, order)
            np.testing.assert_allclose(got.top_logprobs, np.take_along_axis(lp, order, 1), atol=2e-4, rtol=0)
            rows = np.arange(C)
            np.testing.assert_allclose(got.token_logprob, lp[rows, cv], atol=2e-4, rtol=0)
            np.testing.assert_allclose(got.argmax_logprob, lp[rows, got.argmax], atol=2e-4, rtol=0)
            if filters is None:
                np.testing.assert_array_equal(got.argmax, want.argmax)
            assert np.all(np.diff(got.top_logprobs, axis=1) <= 0)  # most likely first
        seq.release()


def test_logprobs_out_of_range_are_refused(model):
    seq = model.sequence()
    seq.prefill(prompt(4))
    for bad in (-1, 21, 2.5):
        with pytest.raises(ConfigError, match="n_probs"):
            seq.denoise(canvas(1), temperature=0.8, n_probs=bad)
    seq.release()
