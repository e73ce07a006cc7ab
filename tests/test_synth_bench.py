"""`dglocal.convert.synth` (random-weight GGUFs with the real shapes) and `dglocal.tools.bench` (issue 7): correctness, not speed.

The 26B-A4B figures are written out here from the vocab-only Gemma 4 GGUF's own keys and docs/model.md and docs/gguf.md, not from
synth's table, so a mis-read hyperparameter fails.
"""

import functools
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from dglocal.convert import schema
from dglocal.convert.writer import quantize_gguf
from dglocal.errors import ConvertError
from dglocal.runtime.gguf import read_header
from dglocal.convert.synth import preset_params, synth, vocab_path

pytestmark = pytest.mark.slow  # full-size shapes and several quant types: the full tier

N_VOCAB = 262144


@pytest.fixture(scope="module")
def vocab_kv():
    return read_header(vocab_path()).kv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(preset, type) -> synthetic GGUF: small f32/q8_0 for shapes and values, tiny f32/q4_k_m for the K-quant mix."""
    out = tmp_path_factory.mktemp("synth")
    made = {}
    for preset, type_name in [("small", "f32"), ("small", "q8_0"), ("tiny", "f32")]:
        made[preset, type_name] = synth(preset, type_name, out / f"{preset}-{type_name}.gguf").path
    return made


@pytest.fixture(scope="module")
def tiny_q4km(tmp_path_factory):
    return synth("tiny", "q4_k_m", tmp_path_factory.mktemp("synth_q") / "tiny-q4_k_m.gguf").path


@functools.lru_cache(maxsize=8)
def header(path):
    return read_header(path)


def tensor_values(path, name) -> np.ndarray:
    """One tensor read back and dequantized with gguf-py (numpy order)."""
    ti = next(t for t in header(path).tensors if t.name == name)
    raw = np.fromfile(path, dtype=np.uint8, count=ti.nbytes, offset=ti.offset)
    if ti.type == Q.F32:
        return raw.view(np.float32).reshape(tuple(reversed(ti.shape)))
    if ti.type == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(tuple(reversed(ti.shape)))
    rows = int(np.prod(ti.shape[1:]))
    return quants.dequantize(raw.reshape(rows, -1), ti.type).reshape(tuple(reversed(ti.shape)))


# --- presets --------------------------------------------------------------------------------------------------

def test_26b_preset_is_the_vocab_files_hyperparameters(vocab_kv):
    p = preset_params("26b-a4b", vocab_kv)
    g = lambda k: vocab_kv[f"gemma4.{k}"]  # noqa: E731
    assert (p.vocab_size, p.hidden_size, p.num_hidden_layers) == (N_VOCAB, g("embedding_length"), g("block_count"))
    assert (p.hidden_size, p.num_hidden_layers, p.num_experts, p.top_k_experts) == (2816, 30, 128, 8)
    assert (p.intermediate_size, p.moe_intermediate_size, p.num_attention_heads) == (2112, 704, 16)
    assert (p.head_dim, p.global_head_dim, p.sliding_window) == (256, 512, 1024)
    assert list(p.head_count_kv) == g("attention.head_count_kv")
    assert [p.is_swa(i) for i in range(30)] == g("attention.sliding_window_pattern")
    assert sum(not p.is_swa(i) for i in range(30)) == 5  # 5 of every 6 layers slide
    assert p.canvas_length == 256 and p.partial_rotary_factor == 0.25

    plan = {t.name: t.ggml_shape for t in schema.tensor_plan(p)}
    assert len(plan) == 692  # as the community files (docs/gguf.md)
    assert plan["token_embd.weight"] == (2816, N_VOCAB)
    assert plan["blk.0.ffn_gate_up_exps.weight"] == (2816, 1408, 128)
    assert plan["blk.0.ffn_down_exps.weight"] == (704, 2816, 128)
    assert plan["blk.5.attn_k.weight"] == (2816, 1024) and "blk.5.attn_v.weight" not in plan
    assert plan["blk.0.attn_q.weight"] == (2816, 4096) and plan["blk.5.attn_output.weight"] == (8192, 2816)


@pytest.mark.parametrize("preset", ["small", "tiny"])
def test_scaled_presets_keep_the_vocabulary_and_both_layer_kinds(preset, vocab_kv):
    p = preset_params(preset, vocab_kv)
    assert p.vocab_size == N_VOCAB and p.hidden_size % 256 == 0
    assert {p.is_swa(i) for i in range(p.num_hidden_layers)} == {True, False}
    assert p.num_experts != 8  # llama-quant special-cases 8 experts; the 26B has 128


def test_bad_arguments_leave_nothing(tmp_path):
    with pytest.raises(ConvertError, match="unknown preset"):
        synth("70b", "f32", tmp_path / "x.gguf")
    with pytest.raises(ConvertError, match="unknown type"):
        synth("tiny", "q9_z", tmp_path / "x.gguf")
    (tmp_path / "y.gguf").write_bytes(b"keep")
    with pytest.raises(ConvertError, match="already exists"):
        synth("tiny", "f32", tmp_path / "y.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.gguf"]


# --- the files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["f32", "q8_0"])
def test_small_names_shapes_types_metadata(files, vocab_kv, type_name):
    path = files["small", type_name]
    h = read_header(path)
    p = preset_params("small", vocab_kv)
    plan = schema.tensor_plan(p)
    assert [(t.name, t.shape) for t in h.tensors] == [(t.name, t.ggml_shape) for t in plan]
    base = Q.F32 if type_name == "f32" else Q.Q8_0
    assert {t.name: t.type for t in h.tensors} == {t.name: schema.tensor_type(t, base) for t in plan}
    kv = h.kv
    assert kv["general.architecture"] == "diffusion-gemma" and kv["dglocal.synth.preset"] == "small"
    assert kv["diffusion.canvas_length"] == 256 and kv["diffusion-gemma.block_count"] == 6
    assert kv["diffusion-gemma.embedding_length"] == 256 and kv["diffusion-gemma.expert_count"] == 16
    assert kv["tokenizer.ggml.tokens"] == vocab_kv["tokenizer.ggml.tokens"]
    assert kv["tokenizer.chat_template"] == vocab_kv["tokenizer.chat_template"]
    assert kv["diffusion.eos_token_ids"] == [1, 106, 50]
    assert 0 <= h.file_size - (h.tensors[-1].offset + h.tensors[-1].nbytes) < 32  # only the alignment padding


@pytest.mark.parametrize("type_name", ["f32", "q8_0"])
def test_small_values_are_sane(files, type_name):
    path = files["small", type_name]
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.5.ffn_gate_up_exps.weight",
                 "blk.3.ffn_down_exps.weight", "self_cond_down.weight"]:
        w = tensor_values(path, name)
        assert np.all(np.isfinite(w)), name
        fan_in = w.shape[-1]
        assert abs(w.std() * fan_in ** 0.5 - 1) < 0.05, (name, w.std())  # ~N(0, 1/fan_in)
        assert abs(w.mean()) < 0.05 * w.std(), name
        rows = w.reshape(-1, fan_in)
        assert len(np.unique(rows[:512], axis=0)) == min(512, len(rows)), name  # no repeated rows
    for name in ["output_norm.weight", "blk.2.attn_q_norm.weight", "blk.1.ffn_down_exps.scale",
                 "blk.4.layer_output_scale.weight", "blk.4.enc_layer_output_scale.weight"]:
        v = tensor_values(path, name)
        assert np.all((v >= 0.8) & (v <= 1.2)), name
    rope = tensor_values(path, "rope_freqs.weight")
    assert np.array_equal(rope, np.array([1.0] * 32 + [1e30] * 96, np.float32))  # global head dim 256, proportional 0.25


def test_the_k_quant_mix_is_llama_cpps(files, tiny_q4km, tmp_path):
    """The probe's per-tensor types equal a full-size llama_model_quantize of the same preset."""
    full = tmp_path / "full-q4_k_m.gguf"
    quantize_gguf(files["tiny", "f32"], full, "q4_k_m")
    want = {(t.name, t.shape, t.type) for t in read_header(full).tensors}
    got = read_header(tiny_q4km)
    assert {(t.name, t.shape, t.type) for t in got.tensors} == want
    assert {t.type for t in got.tensors} >= {Q.Q4_K, Q.Q6_K}
    assert got.kv["general.file_type"] == 15  # MOSTLY_Q4_K_M
    for name in ["token_embd.weight", "blk.0.ffn_gate_up_exps.weight", "blk.1.ffn_down_exps.weight"]:
        w = tensor_values(tiny_q4km, name)
        assert np.all(np.isfinite(w)) and abs(w.std() * w.shape[-1] ** 0.5 - 1) < 0.1, name


# --- the backend ----------------------------------------------------------------------------------------------

@pytest.mark.backend
def test_small_loads_and_runs(files):
    import dglocal

    for type_name in ("q8_0", "f32"):
        with dglocal.load(files["small", type_name], n_ctx=512, n_threads=2) as m:
            assert m.n_vocab == N_VOCAB and m.canvas_length == 256
            seq = m.sequence()
            prompt = m.tokenize("The sea was calm that night.")
            logits = seq.prefill(prompt, logits_last=True)
            assert np.all(np.isfinite(logits)) and 0.3 < logits.std() < 3  # unit-scale logits, softcap 30 idle
    # one denoise step (f32: the fastest on a CPU) of a full 256-token canvas
    with dglocal.load(files["small", "f32"], n_ctx=512, n_threads=2) as m:
        seq = m.sequence()
        prompt = m.tokenize("The sea was calm that night.")
        seq.prefill(prompt)
        canvas = np.random.default_rng(0).integers(0, N_VOCAB, 256)
        out = seq.denoise(canvas, temperature=0.8, uniforms=np.full(256, 0.5), self_condition=False)
        assert np.all(np.isfinite(out.entropy)) and np.all(out.entropy > 0)
        assert out.argmax.min() >= 0 and out.argmax.max() < N_VOCAB
        assert seq.n_past == len(prompt)


@pytest.mark.backend
def test_k_quant_file_loads(tiny_q4km):
    import dglocal

    with dglocal.load(tiny_q4km, n_ctx=256, n_threads=2) as m:
        logits = m.sequence().prefill(m.tokenize("Hello"), logits_last=True)
        assert np.all(np.isfinite(logits)) and 0.3 < logits.std() < 3


@pytest.mark.backend
def test_bench_returns_sane_numbers(files):
    from dglocal.tools.bench import bench

    r = bench(files["tiny", "f32"], threads=2, steps=(2,), adaptive=True, adaptive_steps=3, prompt_tokens=12, ar_tokens=4,
              commit_reps=2)
    json.dumps(r)  # --json must serialise
    assert r["canvas_length"] == 32 and r["prompt_tokens"] == 12 and r["synthetic"]
    assert r["file_type"] == "ALL_F32"
    fixed, adaptive = r["runs"]
    assert (fixed["mode"], fixed["max_steps"], fixed["steps_per_canvas"]) == ("fixed", 2, 2.0)
    assert adaptive["mode"] == "adaptive" and 1 <= adaptive["steps_per_canvas"] <= 3
    for run in r["runs"]:
        assert run["tokens"] == 32 and run["canvases"] == 1
        for key in ("ms_per_step", "ttft_s", "wall_tok_s", "canvas_tok_s", "commit_ms", "vs_ar"):
            assert run[key] > 0, key
        expect = 32 / ((run["steps_per_canvas"] * run["ms_per_step"] + run["commit_ms"]) / 1000)
        assert run["canvas_tok_s"] == pytest.approx(expect)
        assert run["vs_ar"] == pytest.approx(run["canvas_tok_s"] / r["autoregressive"]["tok_s"])
        assert run["ttft_s"] > run["prefill_s"] > 0
        assert run["step_vs_floor"] == pytest.approx(run["ms_per_step"] / r["floor"]["floor_ms"])
    f = r["floor"]
    assert f["transformer_ms"] == r["commit_ms"] > 0 and f["lm_head_ms"] >= 0
    assert f["floor_ms"] == pytest.approx(f["transformer_ms"] + 2 * f["lm_head_ms"])
    assert not r["offloaded"] and r["step_io_bytes"]["to_host"] > 0  # the last step's reductions came back
    ar = r["autoregressive"]
    assert ar["tokens"] == 4 and ar["tok_s"] > 0 and ar["ms_per_token"] > 0
    assert r["peak_rss_mib"] > 50 and r["n_ctx"] >= 12 + 2 * 32


def test_bench_runs_both_samplers_and_times_active_sets(files):
    """--sampler fast: every run again with the fast sampler beside the reference one, in the same result; --active
    N: a step with N positions run (the rest frozen) beside a whole reference step."""
    from dglocal.tools.bench import bench

    r = bench(files["tiny", "f32"], threads=2, steps=(2,), adaptive=False, prompt_tokens=12, ar_tokens=2,
              commit_reps=2, sampler="fast", fast_k=16, active=(32, 8), batch=2)
    json.dumps(r)
    assert [(x["mode"], x["sampler"]) for x in r["runs"]] == [("fixed", "reference"), ("fixed", "fast")]
    ref, fast = r["runs"]
    assert ref["forward_positions_per_canvas"] == 2 * 32  # the reference runs the whole canvas every step
    assert 0 < fast["forward_positions_per_canvas"] <= 2 * 32 and fast["tokens"] == 32
    assert [a["active"] for a in r["active"]] == [32, 8]
    assert r["batched"]["batch"] == r["batched_fast"]["batch"] == 2 and r["batched_fast"]["canvas_tok_s"] > 0
    for a in r["active"]:
        assert a["ms_per_step"] > 0 and a["full_step_ms"] > 0
        assert a["vs_full_step"] == pytest.approx(a["ms_per_step"] / a["full_step_ms"])
