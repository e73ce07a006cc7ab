"""Warm starts, edits and infills on the tiny random checkpoint.

A warm start is checked against the reference `generate(decoder_input_ids=...)` fed identical noise, step for
step. Edits and infills are fixed layouts of pinned and free positions: the pinned ones must come back
byte-identical, only the free ones may change, and the suffix of an infill must stand in the canvas as given.
"""

import numpy as np
import pytest
import torch
from reference_harness import reference_generate
from test_generate import BASE, C, EARLY, PROMPT, V, model, reference_model, tm  # noqa: F401 (fixtures)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from dglocal.errors import ConfigError
from dglocal.generation.driver import generate, stream
from dglocal.generation.editing import edit_request, fillers, infill_request
from dglocal.generation.events import BlockText, Step
from dglocal.generation.sampler import SeededNoise

pytestmark = pytest.mark.gpu_tier


@pytest.mark.parametrize("seed,cfg,n_draft", [(0, BASE, C), (1, EARLY, C), (2, BASE, 5), (3, EARLY, 11)])
def test_warm_start_equals_the_reference(tm, model, seed, cfg, n_draft):
    """The first canvas starts from the draft (a short one padded with the noise it would have started from),
    the later ones from noise, as the reference's decoder_input_ids; whole canvases and steps equal."""
    draft = [int(t) for t in np.random.default_rng(seed).integers(5, V, n_draft)]
    start = draft + SeededNoise(V, seed).tokens(C)[n_draft:].tolist()  # what the padded draft is
    kw = dict(cfg, sampler_config=EntropyBoundSamplerConfig(entropy_bound=cfg["entropy_bound"]))
    del kw["entropy_bound"]
    ref_tokens, ref_steps = reference_generate(tm, PROMPT, SeededNoise(V, seed), eos_token_id=None, pad_token_id=0,
                                               decoder_input_ids=torch.tensor([start]), **kw)
    seq = model.sequence()
    seq.prefill(PROMPT)
    events = list(stream(model, PROMPT, seq=seq, eos_token_id=(), noise=SeededNoise(V, seed), draft=draft, **cfg))
    blocks = [e for e in events if isinstance(e, BlockText)]
    assert np.concatenate([b.canvas for b in blocks]).tolist() == ref_tokens
    assert [b.steps for b in blocks] == ref_steps
    cold, _ = reference_generate(tm, PROMPT, SeededNoise(V, seed), eos_token_id=None, pad_token_id=0, **kw)
    assert cold != ref_tokens  # the draft did change the trajectory
    if cfg is EARLY:
        assert min(ref_steps) < cfg["max_denoising_steps"]


def test_a_draft_longer_than_the_generation_is_cut_and_bad_ones_are_named(llama_model):
    out = generate(llama_model, PROMPT, seed=0, draft=list(range(5, 5 + 3 * C)), max_new_tokens=C,
                   max_denoising_steps=2)
    assert out.stats.canvases == 1
    text = generate(llama_model, PROMPT, seed=0, draft="Once upon a time", max_new_tokens=C, max_denoising_steps=2)
    assert text.stats.canvases == 1
    for bad, words in [([V + 3], "draft token 515"), ([[1, 2]], "drafts are .* 1-D list"), (b"abc", "draft is text"),
                       ({0: 5}, "draft is text")]:
        with pytest.raises(ConfigError, match=words):
            generate(llama_model, PROMPT, seed=0, draft=bad, max_new_tokens=C)


TEXT = "The quick brown fox jumps over the lazy dog, and then it sleeps under the old oak tree by the river."


def _edit(model, text, spans, **kw):
    req = edit_request(model, text, spans, **kw)
    done = generate(model, req.prompt, **req.options, **dict(seed=kw.get("seed", 0), max_denoising_steps=6))
    return req, req.result(done)


@pytest.mark.parametrize("spans, room", [([(4, 9)], 0), ([(0, 3), (40, 44), (60, 75)], 0), ([(10, 10)], 3),
                                         ([(16, 19), (94, 100)], 2)])
def test_an_edit_changes_only_its_spans(llama_model, spans, room):
    req, result = _edit(llama_model, TEXT, spans, room=room)
    assert req.layout.length > C  # the text spans several canvases
    pinned = req.layout.tokens >= 0
    assert (np.asarray(result.completion.tokens)[pinned] == req.layout.tokens[pinned]).all()
    # the text outside the spans is byte-identical, in order, and each change is the new text of its span
    rebuilt, at = [], 0
    for (start, end), change in zip(sorted(spans), result.changes):
        assert (change.start, change.end, change.old) == (start, end, TEXT[start:end])
        rebuilt += [TEXT[at:start], change.new]
        at = end
    assert result.text == "".join(rebuilt) + TEXT[at:]
    assert result.text.startswith(TEXT[:sorted(spans)[0][0]]) and result.text.endswith(TEXT[sorted(spans)[-1][1]:])
    assert not any(t in fillers(llama_model) for t in llama_model.tokenize(result.changes[0].new, add_special=False,
                                                                           parse_special=False))


@pytest.mark.parametrize("spans, words", [([], "non-empty list"), ([(5, 2)], "outside the text"),
                                          ([(0, 500)], "outside the text"), ([(0, 5), (3, 8)], "overlap"),
                                          ([("a", 2)], "two integers"), ("0-5", "non-empty list")])
def test_bad_spans_are_named(llama_model, spans, words):
    with pytest.raises(ConfigError, match=words):
        edit_request(llama_model, TEXT, spans)


def test_an_edit_sets_its_own_layout(llama_model):
    with pytest.raises(ConfigError, match="constraints is set by the edit"):
        edit_request(llama_model, TEXT, [(0, 3)], constraints={0: 5})
    with pytest.raises(ConfigError, match="room"):
        edit_request(llama_model, TEXT, [(0, 3)], room=-1)


def _pairs(n):
    rng = np.random.default_rng(11)
    words = ["alpha", "beta", " gamma", "(x)", "\n", "return", " = ", "ünï", "42", "{", "}", "\"q\"", "  "]
    def text():
        return "".join(rng.choice(words) for _ in range(int(rng.integers(0, 8))))
    return [(text(), text()) for _ in range(n)]


@pytest.mark.cpu_only  # the layout is the driver's, the same on every device; 100 generations on lavapipe take ~30 min
def test_the_suffix_stands_in_every_infill(llama_model):
    """100 random prefix/suffix pairs: the suffix (all of it, or the head the canvas holds) is pinned right after
    the middle's free positions, the answer ends with the suffix, and the middle holds no end or pad token."""
    close = fillers(llama_model)
    for i, (prefix, suffix) in enumerate(_pairs(100)):
        req = infill_request(llama_model, prefix, suffix, max_middle=[4, 8, 12, 20][i % 4])
        done = generate(llama_model, req.prompt, seed=i, max_denoising_steps=4, **req.options)
        result = req.result(done)
        F = req.layout.regions[0][1]
        head = req.layout.tokens[F:]
        assert done.tokens[F:F + len(head)] == head.tolist()
        assert head.tolist() == llama_model.tokenize(suffix, add_special=False, parse_special=False)[:len(head)]
        assert result.text == result.middle + suffix and result.text.endswith(suffix)
        assert not set(llama_model.tokenize(result.middle, add_special=False, parse_special=False)) & set(close)
        assert len(done.tokens) == req.layout.length


def test_a_suffix_longer_than_a_canvas_keeps_its_head_in_the_canvas(llama_model):
    suffix = " and".join(["x"] * 40)
    req = infill_request(llama_model, "def f():", suffix, max_middle=6)
    assert req.layout.length == C  # one canvas: the middle and as much of the suffix as it holds
    assert len(req.layout.tokens[6:]) == C - 6
    result = req.result(generate(llama_model, req.prompt, seed=0, max_denoising_steps=3, **req.options))
    assert result.text.endswith(suffix)
