"""The block loop against the reference `generate` on a tiny random checkpoint, fed identical noise.

`ReferenceModel` is the real torch model in the backend's shape (tests/reference_harness.py); the same tests
can run over the llama.cpp backend by swapping the model object.
"""

import numpy as np
import pytest
from reference_harness import ReferenceModel, reference_generate
from tiny import tiny_model
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from dglocal.generation.config import GenerationConfig
from dglocal.errors import ConfigError, ContextError
from dglocal.generation.chat import ChatSession
from dglocal.generation.driver import generate, stream
from dglocal.generation.events import BlockText, Step
from dglocal.generation.sampler import SeededNoise, accept_mask

pytestmark = pytest.mark.gpu_tier

V, C = 512, 16
PROMPT = [2] + list(range(10, 30))  # 21 tokens: beyond the sliding window of 8
BASE = dict(max_new_tokens=48, max_denoising_steps=6, entropy_bound=0.1, t_min=0.4, t_max=0.8,
            stability_threshold=1, confidence_threshold=0.005)
# argmax converges (near-greedy, everything accepted): the stable-and-confident stop fires mid-block
EARLY = dict(BASE, max_denoising_steps=8, entropy_bound=1000.0, t_min=0.01, t_max=0.05, confidence_threshold=0.05)


@pytest.fixture(scope="module")
def tm():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def reference_model(tm):
    template = ("{% for m in messages %}<{{ 'model' if m['role'] == 'assistant' else m['role'] }}>"
                "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<model>{% endif %}")
    return ReferenceModel(tm, n_ctx=1024, eos_ids=(1, 106, 50), metadata={"tokenizer.chat_template": template})


@pytest.fixture(params=["reference", "llama.cpp"])
def model(request, reference_model):
    """The driver runs over the reference in the backend's shape, and over the real patched llama.cpp."""
    return reference_model if request.param == "reference" else request.getfixturevalue("llama_model")


def run_reference(tm, seed, eos=None, **cfg):
    kw = dict(cfg)
    kw["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=kw.pop("entropy_bound"))
    return reference_generate(tm, PROMPT, SeededNoise(V, seed), eos_token_id=eos, pad_token_id=0, **kw)


def run_driver(model, seed, eos=(), **cfg):
    """The block loop after a prompt the sequence already holds (nothing left to encode): its blocks, whole canvases
    (BlockText.canvas), and its steps."""
    seq = model.sequence()
    seq.prefill(PROMPT)
    GenerationConfig(**cfg)
    events = list(stream(model, PROMPT, seq=seq, eos_token_id=eos, noise=SeededNoise(V, seed), **cfg))
    blocks = [e for e in events if isinstance(e, BlockText)]
    return blocks, [e for e in events if isinstance(e, Step)], seq


def padded_after_eos(tokens, eos):
    """What the reference returns: tokens after the first EOS replaced by pad (0)."""
    hits = [i for i, t in enumerate(tokens) if t in eos]
    return tokens if not hits else tokens[: hits[0] + 1] + [0] * (len(tokens) - hits[0] - 1)


@pytest.mark.parametrize("seed,cfg,early", [
    (0, BASE, False), (1, dict(BASE, entropy_bound=0.4, t_min=0.2, t_max=1.2), False),
    (2, EARLY, True), (3, dict(EARLY, stability_threshold=2), True),
])
def test_trajectory_parity(tm, model, seed, cfg, early):
    ref_tokens, ref_steps = run_reference(tm, seed, **cfg)
    blocks, steps, seq = run_driver(model, seed, **cfg)
    assert len(blocks) == 3
    assert np.concatenate([b.canvas for b in blocks]).tolist() == ref_tokens
    assert [b.steps for b in blocks] == ref_steps
    assert seq.n_denoise == sum(ref_steps) and seq.n_past == len(PROMPT) + 2 * C  # last block not encoded
    if early:
        assert min(ref_steps) < cfg["max_denoising_steps"]  # the early stop did fire
        assert [s.early_stop for s in steps].count(True) == sum(s < cfg["max_denoising_steps"] for s in ref_steps)


def test_trajectory_parity_eos_inside_a_block(tm, model):
    blocks = run_driver(model, 0, **BASE)[0]  # its sequence given back at once
    out = np.concatenate([b.canvas for b in blocks]).tolist()
    # an EOS id the model does produce: the first token of block 1 (after position 3) not seen before it
    p = next(i for i in range(C + 3, 2 * C) if out[i] not in out[:i])
    eos = (out[p],)
    ref_tokens, ref_steps = run_reference(tm, 0, eos=list(eos), **BASE)
    blocks = run_driver(model, 0, eos=eos, **BASE)[0]
    assert len(ref_steps) == 2 and [b.steps for b in blocks] == ref_steps
    assert [b.eos for b in blocks] == [False, True]
    assert padded_after_eos(np.concatenate([b.canvas for b in blocks]).tolist(), eos) == ref_tokens
    # the public layer: EOS and what follows it dropped
    done = generate(model, PROMPT, noise=SeededNoise(V, 0), eos_token_id=eos, **BASE)
    assert done.finish_reason == "eos" and done.tokens == out[:p] and done.text == model.detokenize(out[:p])
    assert done.stats.steps_per_canvas == ref_steps and done.stats.canvases == 2


def test_seed_reproducible_and_max_new_tokens_trimmed(model):
    a = generate(model, PROMPT, seed=11, eos_token_id=(), **dict(BASE, max_new_tokens=20))
    b = generate(model, PROMPT, noise=SeededNoise(V, 11), eos_token_id=(), **dict(BASE, max_new_tokens=20))
    assert a.tokens == b.tokens and len(a.tokens) == 20 and a.finish_reason == "length"
    assert a.stats.canvases == 2 and a.stats.generated_tokens == 20


def test_constraints_hold_and_free_positions_follow_the_rule(model):
    pinned = {0: 7, 5: 9, 17: 100, 31: 2}

    class Spy:  # records what the driver sends and gets back
        def __init__(self, model):
            self.model, self.calls = model, []

        def __getattr__(self, name):
            return getattr(self.model, name)

        def denoise_batch(self, requests, **kw):
            outs = self.model.denoise_batch(requests, **kw)
            self.calls += [(np.array(r[1]), out) for r, out in zip(requests, outs)]
            return outs

    seq = model.sequence()
    seq.prefill(PROMPT)
    spy = Spy(model)
    cfg = GenerationConfig(**dict(BASE, max_new_tokens=32, entropy_bound=0.3))
    table = np.full(32, -1)
    for p, t in pinned.items():
        table[p] = t
    events = list(stream(spy, PROMPT, seq=seq, eos_token_id=(), noise=SeededNoise(V, 4), constraints=table,
                         **dict(BASE, max_new_tokens=32, entropy_bound=0.3)))
    steps = [e for e in events if isinstance(e, Step)]
    blocks = [e for e in events if isinstance(e, BlockText)]
    assert len(steps) == len(spy.calls) == sum(b.steps for b in blocks)
    for s, (canvas, out) in zip(steps, spy.calls):
        here = {p - s.block * C: t for p, t in pinned.items() if p // C == s.block}
        held = np.zeros(C, bool)
        held[list(here)] = True
        assert all(canvas[p] == t and s.argmax[p] == t and s.accepted[p] for p, t in here.items())
        # free positions: the reference rule on their own entropies (pinned ones count as zero)
        assert (s.accepted[~held] == accept_mask(out.entropy[~held], cfg.entropy_bound)).all()
        assert (s.argmax[~held] == out.argmax[~held]).all()
    committed = np.concatenate([b.canvas for b in blocks])
    assert all(committed[p] == t for p, t in pinned.items())
    seq.release()  # the model's one sequence: generate() below leases it
    # the public API takes the same mapping
    done = generate(model, PROMPT, noise=SeededNoise(V, 4), constraints=pinned, eos_token_id=(),
                    **dict(BASE, max_new_tokens=32, entropy_bound=0.3))
    assert done.tokens == committed.tolist()
    with pytest.raises(ConfigError, match="position 40"):
        generate(model, PROMPT, constraints={40: 1}, **dict(BASE, max_new_tokens=32))


def test_stop_string_across_blocks(model):
    full = generate(model, PROMPT, seed=5, eos_token_id=(), **BASE)
    edge = len(model.detokenize(full.tokens[:C]))  # where block 1's text begins
    start = next(i for i in range(edge - 3, edge) if full.text.find(full.text[i:i + 4]) == i)
    stop = full.text[start:start + 4]  # straddles the boundary between blocks 0 and 1
    events = list(stream(model, PROMPT, seed=5, eos_token_id=(), stop=[stop], **BASE))
    done = events[-1]
    assert done.finish_reason == "stop" and done.text == full.text[:start]
    # the tokens kept are those whose text lies before the stop string
    kept = len(done.tokens)
    assert done.tokens == full.tokens[:kept] and full.text[:start].startswith(model.detokenize(done.tokens))
    assert len(model.detokenize(full.tokens[:kept + 1])) > start
    shown = "".join(e.text for e in events if isinstance(e, BlockText))
    assert shown == done.text  # no part of the stop string was ever streamed
    assert done.stats.canvases == 2


def test_context_error_before_any_work(tm):
    small = ReferenceModel(tm, n_ctx=60)
    seq = small.sequence()
    with pytest.raises(ContextError, match="n_ctx 60"):
        next(stream(small, PROMPT, seq=seq, **BASE))  # 21 + 3 * 16 = 69 > 60
    assert seq.n_encoded == 0 and seq.n_denoise == 0


def test_break_leaves_the_sequence_consistent(model):
    seq = model.sequence()
    it = stream(model, PROMPT, seq=seq, seed=3, eos_token_id=(), **BASE)
    for e in it:
        if isinstance(e, Step) and e.block == 1 and e.step == 2:
            break
    it.close()
    assert seq.n_past == len(seq.tokens) == len(PROMPT) + C and seq.tokens[: len(PROMPT)] == PROMPT

    class Interrupting:  # KeyboardInterrupt from inside the backend call
        def __init__(self, model, after):
            self.model, self.after = model, after

        def __getattr__(self, name):
            return getattr(self.model, name)

        def denoise_batch(self, *a, **kw):
            self.after -= 1
            if self.after < 0:
                raise KeyboardInterrupt
            return self.model.denoise_batch(*a, **kw)

    with pytest.raises(KeyboardInterrupt):
        list(stream(Interrupting(model, 9), PROMPT, seq=seq, seed=3, eos_token_id=(), **BASE))
    assert seq.n_past == len(seq.tokens) == len(PROMPT) + C  # block 0 committed, block 1 never finished
    # the sequence is still usable: it reuses the whole prompt and gives the fresh-sequence answer
    again = generate(model, PROMPT, seq=seq, seed=3, eos_token_id=(), **BASE)
    assert again.stats.prefilled_tokens == 0
    seq.release()  # the model's one sequence: the fresh run below leases it
    assert again.tokens == generate(model, PROMPT, seed=3, eos_token_id=(), **BASE).tokens


def test_chat_reuses_the_cache_and_equals_a_fresh_session(model):
    opts = dict(BASE, max_new_tokens=32, eos_token_id=())
    chat = ChatSession(model, **opts)
    first = chat.send("hi there", seed=1)
    held = list(chat.seq.tokens)
    before = chat.seq.n_encoded
    second = chat.send("and then?", seed=2)
    prompt2 = chat.prompt_tokens(chat.messages[:-1])
    lcp = next((i for i, (a, b) in enumerate(zip(held, prompt2)) if a != b), min(len(held), len(prompt2)))
    if isinstance(model, ReferenceModel):  # its template renders the history exactly as it was generated
        assert lcp >= len(chat.prompt_tokens(chat.messages[:1])) + C  # turn 1 prompt and its committed block
    else:  # Gemma 4's template drops the generation prompt's empty thought channel from the history
        turn1 = chat.template.render(messages=chat.messages[:1], add_generation_prompt=False, bos_token="")
        assert lcp >= len(model.tokenize(turn1, add_special=True))  # still, the whole first user turn is reused
    committed = C * (second.stats.canvases - 1)  # the blocks before the last, which is never encoded
    assert chat.seq.n_encoded - before - committed == second.stats.prefilled_tokens == len(prompt2) - lcp
    fresh = ChatSession(model, messages=chat.messages[:2], **opts).send("and then?", seed=2)
    assert fresh.tokens == second.tokens and fresh.text == second.text
    assert first.text == chat.messages[1]["content"]
    chat.reset()
    assert chat.messages == []
    if isinstance(model, ReferenceModel):
        assert chat.seq.n_past == 0 and chat.seq.tokens == []
    else:  # one sequence: `fresh` took it while `chat` was idle, so the chat holds none and re-encodes next time
        assert chat.seq is None
