"""One owner per sequence and all-or-nothing runtime calls, checked by failing the native calls on purpose: every
chunk of a batched encode, every canvas of a batched denoise. A failure ends only its own generation, and never
leaves a cache holding what its tokens list does not say; a sequence is leased, never cleared under its holder."""

from __future__ import annotations

import dataclasses
import threading

import llama_cpp
import numpy as np
import pytest

import tiny
from dglocal.errors import BackendError, ConfigError
from dglocal.generation.driver import Driver, run_many, start
from dglocal.generation.request import common_prefix

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

V, C = tiny.VOCAB, tiny.CANVAS
OPTS = dict(kv_type="f32", flash_attn=False, n_threads=2)
GEN = dict(max_new_tokens=2 * C, max_denoising_steps=4, seed=3)


class Failing:
    """The native module with one function failing on chosen calls (by count, or by a predicate on its
    arguments); everything else passes through."""

    def __init__(self, nat, name: str, *, on=(), when=None, status=-1):
        self._nat, self.name, self.on, self.when, self.status, self.calls = nat, name, set(on), when, status, 0

    def __getattr__(self, attr):
        fn = getattr(self._nat, attr)
        if attr != self.name:
            return fn

        def failing(*args):
            self.calls += 1
            if self.calls in self.on or (self.when is not None and self.when(*args)):
                return self.status
            return fn(*args)
        return failing


@pytest.fixture(scope="module")
def pair(tiny_f32_gguf):
    """Two sequences, micro-batches of 4 canvases: a 150-token prompt takes three chunks."""
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_ctx=2 * 512, n_seq_max=2, n_ubatch=4 * C, **OPTS)
    yield m.model  # the runtime Model: its native calls are the ones failed on purpose
    m.close()


def prompts():
    rng = np.random.default_rng(0)
    return [[2] + rng.integers(10, V, 150).tolist(), [2] + rng.integers(10, V, 140).tolist()]


def fresh_logits(model, tokens):
    """What a clean cache gives after `tokens`: the reference point of every restored cache."""
    with model.sequence() as seq:
        return seq.prefill(tokens, logits_last=True)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_a_failed_batched_encode_leaves_every_sequence_as_it_was(pair, chunk):
    """Two prompts of ~150 tokens after a shared head, encoded together (four chunks of 64): a failure in any
    chunk leaves both sequences holding exactly their head, and the same call again gives what a clean cache gives.
    Before, the chunks that went in stayed, and the retry encoded them a second time."""
    a, b = prompts()
    head_a, head_b = a[:20], b[:20]
    with pair.sequence() as sa, pair.sequence() as sb:
        pair.encode_batch([(sa, head_a), (sb, head_b)])
        nat = pair._nat
        pair._nat = Failing(nat, "llama_decode", on={chunk})
        try:
            with pytest.raises(BackendError, match="encoder pass failed"):
                pair.encode_batch([(sa, a[20:]), (sb, b[20:])])
        finally:
            pair._nat = nat
        assert sa.tokens == head_a and sb.tokens == head_b
        for seq, head in ((sa, head_a), (sb, head_b)):  # the cache agrees: nothing past the head
            assert llama_cpp.llama_memory_seq_pos_max(seq._mem, seq.seq_id) == len(head) - 1
        sa.prefill(a[20:])
        got = np.ctypeslib.as_array(pair._nat.llama_get_logits_ith(pair._ctx, -1), shape=(V,)).copy()
    np.testing.assert_allclose(got, fresh_logits(pair, a), rtol=1e-5, atol=1e-5)


def alone(model, prompt, **options):
    with model.sequence() as seq:
        return run_many(model, [(prompt, dict(GEN, **options))], sequences=[seq])[0].tokens


def test_one_bad_canvas_ends_only_its_own_generation(pair):
    """A denoise that fails for one sequence's canvas (as a filter error or a full cache would): the batched pass
    is retried canvas by canvas, that generation ends with the error, the other completes as it would alone.
    Before, the failed batch ended every generation in it."""
    a, b = prompts()
    want = alone(pair, b)
    nat = pair._nat
    with pair.sequence() as sa, pair.sequence() as sb:
        bad = sa.seq_id
        pair._nat = Failing(nat, "llama_dg_denoise_batch", status=-1,
                            when=lambda ctx, canvases, n, logits: any(canvases[k].seq_id == bad for k in range(n)))
        try:
            driver = Driver(pair)
            ja = driver.add(start(pair, a, sa, **GEN))
            jb = driver.add(start(pair, b, sb, **GEN))
            done = []
            while driver.jobs:
                done += driver.tick()
        finally:
            pair._nat = nat
    assert ja.error is not None and "denoise failed" in str(ja.error)
    assert jb.error is None and jb.gen.out == want


def test_a_sequence_is_leased_and_never_cleared_under_its_holder(pair):
    with pair.sequence() as s0:
        s0.prefill([2, 11, 12])
        with pair.sequence() as s1:
            assert {s0.seq_id, s1.seq_id} == {0, 1}
            with pytest.raises(ConfigError, match="all 2 sequences of this model are held"):
                pair.sequence()
        with pytest.raises(ConfigError, match=f"sequence {s0.seq_id} is held"):
            pair.sequence(s0.seq_id)
        assert s0.tokens == [2, 11, 12] and s0.live
    assert not s0.live
    with pytest.raises(BackendError, match="released"):
        s0.prefill([3])


def test_a_chat_opened_from_another_thread_leaves_a_running_generation_alone(tiny_f32_gguf):
    """One sequence, an LLM generating on it; another thread opens a chat and resets it meanwhile. Before, the
    chat took sequence 0 at once (emptying it mid-denoise); now it leases one when its first turn runs, with the
    model held."""
    import dglocal

    with dglocal.load(tiny_f32_gguf, n_ctx=512, **OPTS) as llm:
        prompt = [2, 30, 31, 32]
        want = llm.generate(prompt, **GEN).tokens
        events = llm.stream(prompt, cache_prompt=False, **GEN)
        next(events)  # the first step has run: the model is held, the canvas half denoised
        opened = []
        t = threading.Thread(target=lambda: opened.append(llm.chat()))
        t.start()
        t.join(10)
        assert opened and opened[0].seq is None
        for event in events:
            pass
        assert event.tokens == want


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    from test_lora import ATTN_MLP, peft_adapter

    from dglocal.convert.lora import convert_lora

    d = tmp_path_factory.mktemp("lora")
    return convert_lora(peft_adapter(tiny_model, ATTN_MLP, 1, d / "attn"), d / "attn.gguf").path


def test_one_lora_scale_set_holds_for_a_whole_canvas(tiny_f32_gguf, adapter):
    """Two generations with different LoRA scales share the driver: the scales switch once a canvas (each switch
    makes llama.cpp reserve its graphs again), not once a step; both answers equal their runs alone."""
    import dglocal

    with dglocal.load(tiny_f32_gguf, n_ctx=2 * 512, n_seq_max=2, lora=[(str(adapter), 1.0)], **OPTS) as m:
        specs = [([2, 5, 9], dict(GEN, max_denoising_steps=6, stability_threshold=0, lora={0: s})) for s in (0.3, 1.0)]
        want = [run_many(m, [spec])[0].tokens for spec in specs]
        nat, switches = m.adapters._nat, []
        m.adapters._nat = Failing(nat, "llama_set_adapters_lora", when=lambda *a: switches.append(1) and False)
        try:
            got = [c.tokens for c in run_many(m, specs)]
        finally:
            m.adapters._nat = nat
    assert got == want
    # two generations of 2 canvases of 6 steps: a switch a step would be ~24; a canvas each, ~4
    assert 1 <= len(switches) <= 6, len(switches)


def test_shutdown_aborts_the_running_pass_and_leaves_the_model_usable(tiny_f32_gguf):
    import asyncio

    import dglocal
    from dglocal.generation.driver import prepare
    from dglocal.serving.engine import END, Engine, Request, ShuttingDown

    with dglocal.load(tiny_f32_gguf, n_ctx=4096, **OPTS) as llm:
        engine = Engine(llm, 1, 4)
        aborted = []
        abort = llm.model.abort
        llm.model.abort = lambda on=True: (aborted.append(on), abort(on))
        engine.start()
        loop = asyncio.new_event_loop()
        req = Request(prepare(llm, [2, 7, 8], max_new_tokens=64 * C, max_denoising_steps=48, seed=1), loop)
        engine.submit(req)
        while not llm.model.held() or not engine.driver.jobs:
            threading.Event().wait(0.01)
        engine.stop()
        assert not engine.thread.is_alive()
        items = []
        loop.run_until_complete(asyncio.sleep(0))
        while not req.events.empty():
            items.append(req.events.get_nowait())
        loop.close()
        assert aborted == [True, False]  # raised for the running pass, lowered once the engine ended
        assert isinstance(items[-2], ShuttingDown) and items[-1] is END
        assert not llm.model.held()  # the slots' leases went with the engine
        assert llm.generate([2, 7, 8], **GEN).tokens  # the flag is down again: the model still runs


def test_chat_edit_runs_on_the_conversation_and_counts_lines_after_the_thinking(tiny_f32_gguf, monkeypatch):
    """`/edit` in `dglocal run`: before, it took sequence 0 from the conversation (whose next turn re-encoded the
    whole history) and its line numbers counted the hidden thinking block."""
    import dglocal
    from test_cli import RecordingView

    from dglocal.cli import chat as cli_chat

    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1) as llm:
        view = RecordingView(["hello there", "/edit 1", "and again"])
        loop = cli_chat.ChatLoop(llm, view, max_new_tokens=32, max_denoising_steps=4, seed=1)
        loop.run()
        ends = [c[1][0] for c in view.calls if c[0] == "end_answer"]
        first, edit, third = ends
        assert first is not None and edit is not None and third is not None
        # the third turn encodes only what follows the prefix it shares with the edit's prompt (the first turn's)
        session = loop.session
        shared = common_prefix(session.prompt_tokens(session.messages[:1]), session.prompt_tokens(session.messages[:3]))
        assert 0 < shared and third.stats.prefilled_tokens == third.stats.prompt_tokens - shared

        seen = []
        monkeypatch.setattr(cli_chat, "edit_request", lambda model, text, spans, **kw: seen.append((text, spans)) or
                            (_ for _ in ()).throw(ConfigError("stop here")))
        thought = "<|channel>thought\nplan one\nplan two<channel|>"
        loop.last = dataclasses.replace(third, text=thought + "answer line\nsecond line")
        with pytest.raises(ConfigError, match="stop here"):
            loop.edit("2")
        text, spans = seen[0]
        assert [text[a:b] for a, b in spans] == ["second line"]


def test_a_completions_tool_call_ids_stay_what_they_were():
    """A tool reply is built from a call's id: before, each access to Completion.tool_calls minted new ones."""
    from dglocal.generation.events import Completion, Stats

    c = Completion('<|tool_call>call:f{x:1}<tool_call|>', [], "eos", Stats(*([0] * 12)))
    assert c.tool_calls and [t.id for t in c.tool_calls] == [t.id for t in c.tool_calls]


@pytest.fixture(scope="module")
def four(tiny_f32_gguf):
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_ctx=4 * 1024, n_seq_max=4, **OPTS)
    yield m.model
    m.close()


def test_a_prompt_encoded_beside_others_leaves_the_cache_it_leaves_alone(four):
    """Prompts of 187, 280 and 94 tokens and a commit encoded in one call: before, llama.cpp cut the call into
    equal pieces of each sequence, so the 187-token prompt went in other micro-batches than alone and its keys
    rounded otherwise (the next pass's logits moved by 6e-3: an answer depended on what shared its step)."""
    rng = np.random.default_rng(1)
    prompts = [[2] + rng.integers(10, V, n - 1).tolist() for n in (187, 280, 94, 94)]
    commit = rng.integers(10, V, C).tolist()
    cv = rng.integers(0, V, C).astype(np.int32)
    seqs = [four.sequence(k) for k in range(4)]

    def logits(batched):
        for s in seqs:
            s.rewind(0)
        seqs[3].prefill(prompts[3])
        if batched:
            four.encode_batch([(seqs[3], commit), (seqs[0], prompts[0]), (seqs[1], prompts[1]), (seqs[2], prompts[2])])
        else:
            seqs[0].prefill(prompts[0])
        return four.denoise_batch([(seqs[0], cv, 0.9, None, False)], return_logits=True)[0].logits

    np.testing.assert_array_equal(logits(True), logits(False))


def test_canvases_of_sequences_0_and_2_denoise_together_as_alone(four):
    """Self-conditioned canvases of sequences 0 and 2 in one call: before, llama.cpp put them in two micro-batches,
    the call failed ('did not fit one micro-batch') after the first one's pass had run, and that sequence's
    self-conditioning then came from the lost pass."""
    rng = np.random.default_rng(2)
    seqs = [four.sequence(k) for k in range(4)]
    for s in seqs:
        s.prefill([2] + rng.integers(10, V, 30).tolist())
    cv = [rng.integers(0, V, C).astype(np.int32) for _ in range(8)]

    def second(first, then):
        four.denoise_batch([(seqs[k], cv[k], 0.9, None, False) for k in first])
        out = four.denoise_batch([(seqs[k], cv[4 + k], 0.8, None, True) for k in then], return_logits=True)
        return out[then.index(0)].logits

    alone = second([0], [0])
    for first, then in (([0, 1, 2, 3], [0, 2]), ([3, 0], [2, 0]), ([2, 0], [0, 3])):
        np.testing.assert_array_equal(second(first, then), alone)
