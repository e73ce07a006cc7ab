"""The denoise pass on a GPU backend (the GPU tier: DGLOCAL_TEST_DEVICE, e.g. Vulkan0 on Mesa's lavapipe).

What only a device shows: which backend the scheduler gives each node, the bytes that cross between host and
device per step, weights too large for the device's buffers, and layers split between the device and the host,
each against the reference (or, for the real vocabulary, the same build's CPU backend). Deselected when no device
is under test (conftest.py), never skipped.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import tiny
from reference_harness import ReferenceModel

import dglocal
from dglocal.runtime.diagnostics import graph_nodes, last_io_bytes, memory_breakdown

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier, pytest.mark.gpu_only]

DEVICE = os.environ.get("DGLOCAL_TEST_DEVICE", "")
C, V, W = tiny.CANVAS, tiny.VOCAB, tiny.TEXT["sliding_window"]
ATOL = 2e-4
# the one node llama.cpp runs on the host by design: the token-embedding lookup (token_embd stays in host memory)
HOST_BY_DESIGN = {("GET_ROWS", "embd")}


def test_every_node_but_the_embedding_lookup_runs_on_the_device(llama_model):
    for kind, n in (("denoise", C), ("encode", C), ("encode", 1)):
        nodes = graph_nodes(llama_model, kind, n)
        off = [(x.op, x.name, x.backend) for x in nodes if x.backend != DEVICE and (x.op, x.name) not in HOST_BY_DESIGN]
        assert not off, f"{kind} graph nodes off {DEVICE}: {off}"
        assert sum(x.backend == DEVICE for x in nodes) > 100


def test_bytes_between_host_and_device_per_step_are_canvas_sized(llama_model):
    """What the scheduler copies between host and device for a denoise pass: the canvas' embeddings, positions
    and the attention masks (llama.cpp's, [n_kv, canvas] each), never a vocabulary-sized tensor; the reductions
    come back as 3 numbers per position."""
    nodes = graph_nodes(llama_model, "denoise", C)
    copies = {x.name: x.copied for x in nodes if x.copied}
    n_kv = llama_model.n_ctx
    masks = sum(b for name, b in copies.items() if name.startswith("kq_soft_max"))
    assert masks <= 2 * n_kv * C * 4, copies  # one mask per kind of layer (full, sliding)
    # the rest: the canvas' embeddings, positions, temperatures and cache indices, each at most a canvas of
    # hidden states, together under half of one canvas of logits
    n_embd = tiny.TEXT["hidden_size"]
    rest = {k: b for k, b in copies.items() if not k.startswith("kq_soft_max")}
    assert max(rest.values()) <= C * n_embd * 4 and sum(rest.values()) < C * V * 4 / 2, copies
    seq = llama_model.sequence()
    seq.prefill(list(range(3, 40)))
    seq.denoise(np.arange(C, dtype=np.int32), temperature=0.7, uniforms=np.full(C, 0.5))
    to_backend, to_host = last_io_bytes(llama_model)
    assert to_host <= 4 * C * 4 and 0 < to_backend <= 2 * n_kv * C * 4 + 64 * C


def parity_run(m, ref, n_prompt=W + 13):
    """Prefill, a plain and a self-conditioned step, a commit and a step after it: logits against the reference."""
    rng = np.random.default_rng(5)
    p = rng.integers(3, V, n_prompt).tolist()
    seq, rseq = m.sequence(), ref.sequence()
    seq.prefill(p)
    rseq.prefill(p)
    u = rng.random(C)
    for cv, temp, sc in ((rng.integers(0, V, C), 0.8, False), (rng.integers(0, V, C), 0.55, True)):
        got = seq.denoise(cv.astype(np.int32), temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
        want = rseq.denoise(cv.astype(np.int32), temperature=temp, uniforms=u, self_condition=sc, return_logits=True)
        np.testing.assert_allclose(got.logits / temp, want.logits, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(got.sampled, want.sampled)
    seq.commit(got.argmax)
    rseq.commit(want.argmax)
    cv = rng.integers(0, V, C).astype(np.int32)
    got = seq.denoise(cv, temperature=0.7, self_condition=False, return_logits=True)
    want = rseq.denoise(cv, temperature=0.7, self_condition=False, return_logits=True)
    np.testing.assert_allclose(got.logits / 0.7, want.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("placement", [dict(n_gpu_layers=3), dict(n_cpu_moe=2), dict(n_gpu_layers=5, n_cpu_moe=1)])
def test_layers_split_between_device_and_host_match_the_reference(tiny_f32_gguf, tiny_model, placement):
    """-ngl in the middle and --n-cpu-moe: the scheduler's splits between the device and the host, exact."""
    with dglocal.load(tiny_f32_gguf, n_ctx=1024, kv_type="f32", n_threads=2, flash_attn=False, **placement) as m:
        mem = memory_breakdown(m)
        assert mem[DEVICE]["model"] > 0 and sum(d["model"] for k, d in mem.items() if k != DEVICE) > 0, mem
        backends = {x.backend for x in graph_nodes(m, "denoise", C)}
        assert backends == {DEVICE, "CPU"}, backends
        parity_run(m, ReferenceModel(tiny_model))


def test_real_vocabulary_runs_and_matches_the_host(tmp_path_factory):
    """The real 262144-token vocabulary: on devices whose buffers cannot address the transposed embedding or a
    canvas of logits (lavapipe: 128 MiB), those live and run on the host instead of aborting the process. The same
    build's CPU backend (-ngl 0) is the judge."""
    from dglocal.convert.synth import synth

    path = tmp_path_factory.mktemp("real_vocab") / "tiny-real-f32.gguf"
    synth("tiny", "f32", path)
    runs = []
    for ngl in (-1, 0):
        with dglocal.load(path, n_ctx=1024, kv_type="f32", flash_attn=False, n_gpu_layers=ngl) as m:
            rng = np.random.default_rng(0)
            prompt = rng.integers(3, m.n_vocab, 40).tolist()
            canvases = [rng.integers(0, m.n_vocab, m.canvas_length).astype(np.int32) for _ in range(2)]
            u = rng.random(m.canvas_length)
            seq = m.sequence()
            seq.prefill(prompt)
            outs = [seq.denoise(cv, temperature=0.8, uniforms=u, self_condition=k > 0, return_logits=True)
                    for k, cv in enumerate(canvases)]
            runs.append(outs)
            if ngl == -1:
                assert memory_breakdown(m)[DEVICE]["context"] > 0
    for got, want in zip(*runs):
        scale = np.abs(want.logits).max()
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-4 * scale, rtol=0)
        assert (got.argmax == want.argmax).mean() > 0.99
        np.testing.assert_allclose(got.entropy, want.entropy, atol=1e-3, rtol=1e-3)
