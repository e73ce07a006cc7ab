"""Graph walks without running (`diagnostics.graph_nodes`, no_alloc loads), `bench --roofline` and `synth --shapes-only`.

The cost model itself is arithmetic on published peaks; what is tested here is that it reads the graphs llama.cpp
really builds (the FLOPs of the matmuls it contains equal the model's shapes), that a walk leaves the context as
it was, that a no_alloc load predicts the buffers a real load allocates, and that a shapes-only file has the real
file's tensor table.
"""

import json
import os
import subprocess

import numpy as np
import pytest
from test_cli import DGLOCAL

import dglocal
from dglocal.errors import ConfigError
from dglocal.runtime.diagnostics import graph_nodes, memory_breakdown
from dglocal.runtime.gguf import read_header
from dglocal.convert.synth import synth



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("roof")
    return {t: synth("tiny", t, d / f"tiny-{t}.gguf").path for t in ("f32", "q8_0")}


def test_denoise_graph_flops_are_the_models_matmuls(tiny):
    """The walked denoise graph holds the LM head and the soft embedding, 2·C·V·H FLOPs each, at their sizes."""
    with dglocal.load(tiny["f32"], n_ctx=256, n_threads=2) as m:
        H = int(m.metadata["diffusion-gemma.embedding_length"])  # noqa: N806
        C, V = m.canvas_length, m.n_vocab
        nodes = graph_nodes(m, "denoise", C)
        mm = [n for n in nodes if n[0] == "MUL_MAT" and n[3] == 2.0 * C * V * H]
        assert len(mm) == 2, [n for n in nodes if n[0] == "MUL_MAT"][-4:]
        # the encoder computes the LM head for its last token only; the rest scales with the tokens
        head = 2.0 * V * H
        enc = graph_nodes(m, "encode", 1)
        assert len(enc) > 10 and all(n[3] >= 0 and n[4] > 0 for n in enc)
        assert sum(n[0] == "MUL_MAT" and n[3] == head for n in enc) == 1
        assert sum(n[3] for n in graph_nodes(m, "encode", C)) - head > 10 * (sum(n[3] for n in enc) - head)


def test_a_walk_leaves_the_context_as_it_was(tiny):
    """Walking reserves graphs on the context's scheduler: the next steps must equal those of a fresh context."""
    def steps(walk: bool):
        with dglocal.load(tiny["q8_0"], n_ctx=256, n_threads=2) as m:
            seq, rng = m.sequence(), np.random.default_rng(1)
            seq.prefill(list(rng.integers(0, m.n_vocab, 20)))
            canvas = rng.integers(0, m.n_vocab, m.canvas_length)
            a = seq.denoise(canvas, temperature=0.8, self_condition=False, return_logits=True).logits
            if walk:
                graph_nodes(m, "denoise", m.canvas_length)
                graph_nodes(m, "encode", 1)
            b = seq.denoise(canvas, temperature=0.8, return_logits=True).logits
            seq.commit(canvas)
            c = seq.denoise(canvas, temperature=0.8, self_condition=False, return_logits=True).logits
            return a, b, c
    for x, y in zip(steps(False), steps(True)):
        np.testing.assert_array_equal(x, y)


def test_no_alloc_predicts_what_a_real_load_allocates(tiny):
    """Weights, KV cache + denoise state, compute buffers: a no_alloc load reports what a real one allocates."""
    def breakdown(**opts):
        with dglocal.load(tiny["q8_0"], n_ctx=512, n_threads=2, **opts) as m:
            return memory_breakdown(m)
    # the sizing pass maps nothing: it predicts a load that reads the weights into llama.cpp's buffers (--no-mmap)
    real, sim = breakdown(mmap=False), breakdown(no_alloc=True)
    assert real.keys() == sim.keys()
    for buft, parts in real.items():
        for part, size in parts.items():
            assert sim[buft][part] == pytest.approx(size, rel=0.05, abs=4096), (buft, part, real, sim)
    assert sum(p["compute"] for p in real.values()) > 0 and sum(p["model"] for p in real.values()) > 0


def test_a_no_alloc_model_refuses_to_run(tiny):
    with dglocal.load(tiny["f32"], n_ctx=256, no_alloc=True) as m:
        with pytest.raises(ConfigError, match="no_alloc"):
            m.sequence()
        with pytest.raises(ConfigError, match="graph kind"):
            graph_nodes(m, "decode", 1)


def test_shapes_only_file_has_the_real_tensor_table(tiny, tmp_path):
    """Same keys (bar the marker), same tensors, types and offsets, same size; the data is a hole."""
    path = synth("tiny", "q8_0", tmp_path / "shapes.gguf", shapes_only=True).path
    real, shapes = read_header(tiny["q8_0"]), read_header(path)
    assert shapes.kv.pop("dglocal.synth.shapes_only") is True
    assert shapes.kv == real.kv
    def table(h):  # offsets from the data section's start: the extra key moves that start
        return [(t.name, t.type, t.shape, t.offset - h.tensors[0].offset, t.nbytes) for t in h.tensors]
    assert table(shapes) == table(real)
    assert path.stat().st_size - shapes.tensors[0].offset == tiny["q8_0"].stat().st_size - real.tensors[0].offset
    assert path.stat().st_blocks * 512 < path.stat().st_size / 2


@pytest.mark.slow
def test_bench_roofline_command(tiny, tmp_path):
    """`dglocal bench --roofline` on a shapes-only file: a GPU estimate, and the CPU one from measured peaks."""
    path = synth("tiny", "q8_0", tmp_path / "shapes.gguf", shapes_only=True).path
    for device in ("h100", "cpu"):
        r = subprocess.run([*DGLOCAL, "bench", str(path), "--roofline", device, "--json",
                            "-c", "512", "-t", "2"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_COLOR": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout)
        assert out["ms_per_step"] > 0 and out["commit_ms"] > 0 and out["ar_tok_s"] > 0
        assert out["canvas_tok_s"] == pytest.approx(32 / (16 * out["ms_per_step"] + out["commit_ms"]) * 1000)
        assert 0 < sum(n["share"] for n in out["top_nodes"]) <= 1.0001
    bad = subprocess.run([*DGLOCAL, "bench", str(path), "--roofline", "tpu"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "tpu" in bad.stderr + bad.stdout
