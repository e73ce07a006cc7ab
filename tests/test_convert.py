"""Converter: tiny random checkpoints -> GGUF, read back with gguf-py's reader (issue 3, "Proof required").

Expected names and shapes are written out here from the reference modules (not from the
converter's own table), so a swapped or mis-shaped tensor fails.
"""

import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import tiny
from dglocal.convert import convert, dry_run, info
from dglocal.errors import ConvertError

TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tiny_vocab, tmp_path_factory):
    """type name -> GGUF converted from the per_layer-form checkpoint."""
    out = tmp_path_factory.mktemp("gguf")
    return {t: convert(tiny_checkpoint, out / f"tiny-{t}.gguf", t, tokenizer_from=tiny_vocab).path for t in TYPES}


def expected_tensors(model):
    """GGUF name -> (reference tensor in numpy order) for every tensor the file must hold."""
    dec, enc = model.model.decoder, model.model.encoder.language_model
    sc = dec.self_conditioning
    out = {
        "token_embd.weight": dec.embed_tokens.weight, "output_norm.weight": dec.norm.weight,
        "self_cond_pre_norm.weight": sc.pre_norm.weight, "self_cond_gate.weight": sc.gate_proj.weight,
        "self_cond_up.weight": sc.up_proj.weight, "self_cond_down.weight": sc.down_proj.weight,
    }
    for il, layer in enumerate(dec.layers):
        a = layer.self_attn
        blk = {
            "attn_norm": layer.input_layernorm.weight, "attn_q": a.q_proj.weight, "attn_k": a.k_proj.weight,
            "attn_output": a.o_proj.weight, "attn_q_norm": a.q_norm.weight, "attn_k_norm": a.k_norm.weight,
            "post_attention_norm": layer.post_attention_layernorm.weight,
            "ffn_norm": layer.pre_feedforward_layernorm.weight, "ffn_gate": layer.mlp.gate_proj.weight,
            "ffn_up": layer.mlp.up_proj.weight, "ffn_down": layer.mlp.down_proj.weight,
            "post_ffw_norm": layer.post_feedforward_layernorm.weight,
            "pre_ffw_norm_2": layer.pre_feedforward_layernorm_2.weight,
            "post_ffw_norm_1": layer.post_feedforward_layernorm_1.weight,
            "post_ffw_norm_2": layer.post_feedforward_layernorm_2.weight,
            "ffn_gate_inp": layer.router.proj.weight, "ffn_gate_up_exps": layer.experts.gate_up_proj,
            "ffn_down_exps": layer.experts.down_proj, "layer_output_scale": layer.layer_scalar,
            "enc_layer_output_scale": enc.layers[il].layer_scalar,
        }
        if a.v_proj is not None:
            blk["attn_v"] = a.v_proj.weight
        out.update({f"blk.{il}.{k}.weight": v for k, v in blk.items()})
        out[f"blk.{il}.ffn_gate_inp.scale"] = layer.router.scale
        out[f"blk.{il}.ffn_down_exps.scale"] = layer.router.per_expert_scale
    out["rope_freqs.weight"] = None  # generated, checked by value below
    return {k: (None if v is None else v.detach().numpy()) for k, v in out.items()}


def fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_metadata(converted, tiny_vocab):
    kv = fields(gguf.GGUFReader(converted["f16"]))
    a = "diffusion-gemma."
    expected = {
        "general.architecture": "diffusion-gemma", "general.type": "model", "general.file_type": 1,
        "general.quantization_version": 2,
        a + "block_count": 6, a + "context_length": 1024, a + "embedding_length": 64,
        a + "feed_forward_length": 128, a + "attention.head_count": 4,
        a + "attention.head_count_kv": [2, 2, 1, 2, 2, 1],
        a + "attention.key_length": 32, a + "attention.value_length": 32,
        a + "attention.key_length_swa": 16, a + "attention.value_length_swa": 16,
        a + "attention.sliding_window": 8,
        a + "attention.sliding_window_pattern": [True, True, False, True, True, False],
        a + "rope.freq_base": 1e6, a + "rope.freq_base_swa": 1e4,
        a + "rope.dimension_count": 32, a + "rope.dimension_count_swa": 16,
        a + "expert_count": 8, a + "expert_used_count": 2, a + "expert_feed_forward_length": 32,
        a + "final_logit_softcapping": 30.0, a + "attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        a + "attention.causal": False, a + "attention.shared_kv_layers": 0,
        a + "embedding_length_per_layer_input": 0,
        # tiny.GENERATION: explicit non-default values, so falling back to defaults fails here
        "diffusion.canvas_length": 16, "diffusion.eb_max_steps": 12,
        "diffusion.eb_t_min": pytest.approx(0.3), "diffusion.eb_t_max": pytest.approx(0.9),
        "diffusion.eb_entropy_bound": pytest.approx(0.2), "diffusion.eb_stability_threshold": 2,
        "diffusion.eb_confidence_threshold": pytest.approx(0.01), "diffusion.shift_logits": False,
        "diffusion.eos_token_ids": [1, 106, 50],
        "diffusion.boi_token_id": 6, "diffusion.image_token_id": 7, "diffusion.eoi_token_id": 8,
        "diffusion.vision_bidirectional": True,
    }
    for key, value in expected.items():
        assert key in kv, key
        assert kv[key] == value, key
    # the tokenizer is the --tokenizer-from file's, every key, value and type
    src = gguf.GGUFReader(tiny_vocab)
    src_tok = {k: v for k, v in fields(src).items() if k.startswith("tokenizer.")}
    assert {k: v for k, v in kv.items() if k.startswith("tokenizer.")} == src_tok
    out_fields = gguf.GGUFReader(converted["f16"]).fields
    for k in src_tok:
        assert out_fields[k].types == src.fields[k].types, k
    extra = set(kv) - set(expected) - set(src_tok) - {"general.name"}
    assert not extra, f"unexpected keys {extra}"


@pytest.mark.parametrize("type_name", list(TYPES))
def test_tensors_names_shapes_types(converted, tiny_model, type_name):
    reader = gguf.GGUFReader(converted[type_name])
    expected = expected_tensors(tiny_model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)
    assert "blk.2.attn_v.weight" not in got and "blk.5.attn_v.weight" not in got  # full layers: no v_proj
    for name, ref in expected.items():
        t = got[name]
        shape = (16,) if ref is None else ref.shape
        assert tuple(int(d) for d in t.shape) == tuple(reversed(shape)), name  # ggml ne order
        f32 = len(shape) == 1 or name.endswith("ffn_gate_inp.weight")
        assert t.tensor_type == (Q.F32 if f32 else TYPES[type_name]), name


def _tolerance(ref: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "f32":
        return np.zeros_like(ref)
    if type_name == "f16":
        return np.abs(ref) * 2.0 ** -11 + 2.0 ** -24
    if type_name == "bf16":
        return np.abs(ref) * 2.0 ** -8
    blocks = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True)  # q8_0: half a step of d = amax/127
    return np.broadcast_to(blocks / 127 * 0.5 * 1.01 + blocks * 2.0 ** -11, ref.reshape(-1, 32).shape).reshape(ref.shape)


@pytest.mark.parametrize("type_name", list(TYPES))
def test_values_within_type_error(converted, tiny_model, type_name):
    reader = gguf.GGUFReader(converted[type_name])
    expected = expected_tensors(tiny_model)
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        ref = expected[t.name]
        if ref is None:  # rope_freqs: 1 on the 0.25*32/2 = 4 rotated pairs, 1e30 on the other 12
            np.testing.assert_array_equal(got, np.array([1.0] * 4 + [1e30] * 12, dtype=np.float32))
            continue
        tol = np.zeros_like(ref) if t.tensor_type == Q.F32 else _tolerance(ref, type_name)
        err = np.abs(got - ref)
        assert np.all(err <= tol), f"{t.name}: max error {err.max()} over tolerance"


def test_both_config_forms_give_the_same_file(tiny_model, tiny_checkpoint, tiny_vocab, tmp_path):
    glob = tiny.save_checkpoint(tiny_model, tmp_path / "global", config_form="global")
    assert "global_head_dim" in json.loads((glob / "config.json").read_text())["text_config"]
    assert "per_layer_config" in json.loads((tiny_checkpoint / "config.json").read_text())["text_config"]
    a = convert(tiny_checkpoint, tmp_path / "a.gguf", "f32", tokenizer_from=tiny_vocab).path
    b = convert(glob, tmp_path / "b.gguf", "f32", tokenizer_from=tiny_vocab).path
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    fa, fb = fields(ra), fields(rb)
    fa.pop("general.name"), fb.pop("general.name")
    assert fa == fb
    assert [(t.name, t.data.tobytes()) for t in ra.tensors] == [(t.name, t.data.tobytes()) for t in rb.tensors]


def test_no_overwrite_without_force(converted, tiny_checkpoint, tiny_vocab):
    path = converted["q8_0"]
    before = path.read_bytes()
    with pytest.raises(ConvertError, match="already exists"):
        convert(tiny_checkpoint, path, "f32", tokenizer_from=tiny_vocab)
    assert path.read_bytes() == before
    convert(tiny_checkpoint, path, "q8_0", tokenizer_from=tiny_vocab, force=True)
    assert path.read_bytes() == before  # deterministic


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_safetensors(directory, edit):
    from safetensors.numpy import load_file, save_file
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _nothing_written(out):
    return not out.exists() and not list(out.parent.glob(out.name + "*"))


@pytest.mark.parametrize("case, message", [
    ("missing_tensor", "missing tensor model.decoder.layers.3.mlp.up_proj.weight"),
    ("nan_tensor", "model.decoder.layers.5.experts.down_proj has NaN"),
    ("truncated", "truncated: tensor"),
    ("missing_shard", "shard missing"),
    ("unknown_model_type", "model_type is 'gemma4'"),
    ("unreadable_config", "config.json: unreadable"),
    ("wrong_shape", "has shape"),
])
def test_bad_inputs_leave_nothing(case, message, tiny_checkpoint, tiny_vocab, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path / "ck")
    if case == "missing_tensor":
        _rewrite_safetensors(ck, lambda t: t.pop("model.decoder.layers.3.mlp.up_proj.weight"))
    elif case == "nan_tensor":  # fails half-way through writing: the .partial must go
        _rewrite_safetensors(ck, lambda t: t["model.decoder.layers.5.experts.down_proj"].__setitem__((1, 2, 3), np.nan))
    elif case == "wrong_shape":
        _rewrite_safetensors(ck, lambda t: t.__setitem__("model.decoder.norm.weight", np.ones(65, np.float32)))
    elif case == "truncated":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "missing_shard":
        (ck / "model.safetensors").rename(ck / "model-00001-of-00002.safetensors")
        weight_map = {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
        (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif case == "unknown_model_type":
        config = json.loads((ck / "config.json").read_text())
        config["model_type"] = "gemma4"
        (ck / "config.json").write_text(json.dumps(config))
    elif case == "unreadable_config":
        (ck / "config.json").write_text("{not json")
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    with pytest.raises(ConvertError, match=message):
        convert(ck, out, "q8_0", tokenizer_from=tiny_vocab)
    assert _nothing_written(out)


def test_tokenizer_from_vocab_mismatch(tiny_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    with pytest.raises(ConvertError, match="262144 tokens, the checkpoint's vocab_size is 512"):
        convert(tiny_checkpoint, out, "f16", tokenizer_from=tiny.vocab_gguf())
    assert _nothing_written(out)


def test_missing_tokenizer_is_a_clear_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ConvertError, match="no tokenizer.json"):
        convert(tiny_checkpoint, tmp_path / "model.gguf", "f16")


def test_unknown_type(tiny_checkpoint, tmp_path):
    with pytest.raises(ConvertError, match="unknown type 'q9_z'"):
        convert(tiny_checkpoint, tmp_path / "model.gguf", "q9_z")


@pytest.mark.parametrize("type_name", ["f32", "q8_0"])
def test_dry_run_matches_the_written_file(converted, tiny_checkpoint, type_name):
    plan = dry_run(tiny_checkpoint, type_name, context=64)
    reader = gguf.GGUFReader(converted[type_name])
    assert [(r.name, r.shape, r.type) for r in plan.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name) for t in reader.tensors]
    assert plan.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    # the estimate without --vram, f16 K+V: sliding layers keep min(64, window 8 + canvas 16) = 24 keys of
    # 2 heads x 16, full layers 64 keys of 1 head x 32
    assert plan.kv_cache_bytes == 4 * (24 * 2 * 16 * 2 * 2) + 2 * (64 * 1 * 32 * 2 * 2)
    assert plan.fits is None and not plan.estimated
    assert plan.generation["max_denoising_steps"] == 12


@pytest.mark.backend
@pytest.mark.slow
def test_dry_run_with_vram_is_dglocal_plan_on_the_converted_file(converted, tiny_checkpoint):
    """--vram: llama.cpp's own sizes for the file's shapes, the same computation as `dglocal plan`."""
    from dglocal.runtime.plan import plan as plan_file

    got = dry_run(tiny_checkpoint, "q8_0", vram="1G", context=1024)
    want = plan_file(converted["q8_0"], "1G", n_ctx=1024)
    strip = lambda c: {**c, "devices": sorted(c["devices"].values())}  # noqa: E731 (stand-in ports differ)
    assert strip(got.placement["choice"]) == strip(want["choice"]) and got.fits is True
    c = want["choice"]
    assert got.kv_cache_bytes == c["device"]["context"] + c["host"]["context"] > 0
    assert got.compute_bytes == c["device"]["compute"] + c["host"]["compute"] > 0
    tight = dry_run(tiny_checkpoint, "q8_0", vram="1M", context=1024)
    assert tight.fits is False and tight.placement["choice"]["n_gpu_layers"] == 0


def test_dry_run_26b_from_config_alone(tmp_path):
    """The published 26B config (global form), with no weights at all: 692 tensors as the community files."""
    text = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                moe_intermediate_size=704, max_position_embeddings=262144)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": text}))
    plan = dry_run(tmp_path, "q4_k_m", context=8192)
    assert len(plan.tensors) == 692 and plan.estimated
    by_name = {r.name: r for r in plan.tensors}
    assert by_name["blk.0.ffn_gate_up_exps.weight"].shape == (2816, 1408, 128)
    assert by_name["blk.5.attn_k.weight"].shape == (2816, 1024) and "blk.5.attn_v.weight" not in by_name
    assert by_name["rope_freqs.weight"].shape == (256,)
    assert 13e9 < plan.weights_bytes < 18e9  # community Q4_K_M: ~16 GB
    assert plan.generation["max_denoising_steps"] == 48  # no generation_config.json: reference defaults


def test_info(converted):
    i = info(converted["q8_0"])
    assert i.architecture == "diffusion-gemma" and i.n_tensors == 143
    assert i.quant_mix["Q8_0"]["tensors"] == 56  # 4 self-cond/embedding matrices + 6 layers x 8 or 9
    assert i.diffusion["canvas_length"] == 16
    assert i.tokenizer["n_tokens"] == 512 and i.tokenizer["eos"] == 1
    assert i.hparams["attention.head_count_kv"] == [2, 2, 1, 2, 2, 1]


def test_progress_reports_every_byte(tiny_checkpoint, tiny_vocab, tmp_path):
    calls = []
    convert(tiny_checkpoint, tmp_path / "m.gguf", "f16", tokenizer_from=tiny_vocab,
            progress=lambda name, done, total: calls.append((name, done, total)))
    assert calls[-1][1] == calls[-1][2] and len({c[0] for c in calls}) == 143


def test_info_community_style_file(tiny_vocab, tmp_path, capsys):
    """A GGUF as other tools write it: K-quant tensors, no dglocal-only keys (no diffusion.eos_token_ids,
    no general.name), only the required diffusion key."""
    from dglocal.cli import render as ui
    from dglocal.convert.tokenizer import tokenizer_from_gguf, write_tokenizer

    path = tmp_path / "community.gguf"
    w = gguf.GGUFWriter(path, "diffusion-gemma")
    w.add_uint32("general.file_type", 15)  # MOSTLY_Q4_K_M
    w.add_uint32("diffusion-gemma.block_count", 1)
    w.add_uint32("diffusion.canvas_length", 256)
    write_tokenizer(w, tokenizer_from_gguf(tiny_vocab, 512))
    for name, shape, qtype in [("token_embd.weight", (512, 256), Q.Q6_K), ("blk.0.attn_q.weight", (256, 256), Q.Q4_K),
                               ("blk.0.ffn_down_exps.weight", (4, 256, 512), Q.Q5_K), ("output_norm.weight", (256,), Q.F32)]:
        w.add_tensor(name, np.zeros(gguf.quants.quant_shape_to_byte_shape(shape, qtype), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    i = info(path)
    assert i.architecture == "diffusion-gemma" and i.file_type == "MOSTLY_Q4_K_M" and i.name is None
    assert i.quant_mix == {"Q5_K": {"tensors": 1, "bytes": 4 * 512 * 176}, "Q6_K": {"tensors": 1, "bytes": 512 * 210},
                           "Q4_K": {"tensors": 1, "bytes": 256 * 144}, "F32": {"tensors": 1, "bytes": 1024}}
    assert i.n_params == 512 * 256 + 256 * 256 + 4 * 256 * 512 + 256
    assert i.diffusion == {"canvas_length": 256} and i.hparams == {"block_count": 1}
    assert i.tokenizer["eos"] == 1 and i.tokenizer["n_tokens"] == 512
    ui.show_info(i)  # renders without the keys dglocal itself writes
    assert "Q6_K" in capsys.readouterr().out


def test_quantize_without_backend_is_a_clear_error(tiny_checkpoint, tiny_vocab, tmp_path, monkeypatch):
    import sys

    import dglocal

    # `from dglocal.runtime import native` raises ImportError, even after an earlier test imported it
    monkeypatch.setitem(sys.modules, "dglocal.runtime.native", None)
    monkeypatch.delattr(dglocal.runtime, "native", raising=False)
    out = tmp_path / "m.gguf"
    with pytest.raises(ConvertError, match=r"q4_k_m needs llama.cpp's quantizer.*build_backend.py"):
        convert(tiny_checkpoint, out, "q4_k_m", tokenizer_from=tiny_vocab)
    assert _nothing_written(out)


# --- need the patched llama.cpp (dglocal.runtime.native) ---------------------------------------------------------------
#
# Logit comparisons use the relative RMS error ||a - b|| / ||b|| per position. On the canvas we take the median
# over its 16 positions (the encoder: over 6): MoE top-2 routing is discontinuous, and a weight perturbation that flips one expert
# choice moves that position's logits by ~0.1-0.4 whatever the quant type (measured: q8_0 has such outliers too).

def _rel(a, b):
    return np.sqrt(((a - b) ** 2).mean(-1) / (b ** 2).mean(-1))


PROMPT = np.random.default_rng(11).integers(3, tiny.VOCAB, 13).tolist()  # beyond the sliding window (8)
CANVAS = np.random.default_rng(12).integers(0, tiny.VOCAB, tiny.CANVAS).astype(np.int32)


def _encode(seq):
    """Next-token logits [6, V] at PROMPT positions 7..12: one prefill of 8 tokens, then one token at a time."""
    rows = [seq.prefill(PROMPT[:8], logits_last=True)]
    rows += [seq.prefill([t], logits_last=True) for t in PROMPT[8:]]
    return np.stack(rows)


def _llama_logits(path):
    """(encoder logits of PROMPT, raw decoder logits of CANVAS after it) from the patched llama.cpp."""
    import dglocal

    with dglocal.load(path, n_ctx=64, kv_type="f32", flash_attn=False, n_threads=2) as m:
        seq = m.sequence()
        enc = _encode(seq)
        dec = seq.denoise(CANVAS, temperature=1.0, self_condition=False, return_logits=True).logits
    return enc, dec


def _reference_logits(model):
    from reference_harness import ReferenceModel, encoder_logits

    rseq = ReferenceModel(model).sequence()
    rseq.prefill(PROMPT)
    dec = rseq.denoise(CANVAS, temperature=1.0, self_condition=False, return_logits=True).logits
    return encoder_logits(model, PROMPT)[7:], dec


@pytest.mark.backend
def test_f32_logits_match_reference(llama_model, tiny_model):
    """The shared fixture pipeline (tiny_f32_gguf, as tests/test_backend.py loads it): one encoder and one
    decoder pass against the reference; test_backend covers the rest of the backend contract."""
    seq = llama_model.sequence()
    enc = _encode(seq)
    dec = seq.denoise(CANVAS, temperature=1.0, self_condition=False, return_logits=True).logits
    want_enc, want_dec = _reference_logits(tiny_model)
    np.testing.assert_allclose(enc, want_enc, atol=1e-4, rtol=0)  # measured 1.6e-5 (logits RMS ~9)
    np.testing.assert_allclose(dec, want_dec, atol=1e-4, rtol=0)  # measured 2.0e-5


# A tiny model whose matrices have rows of 256 (QK_K), so llama.cpp's K-quants really apply; attn_output
# (rows of n_head * head_dim = 64 / 128) still falls back, as it would in any model with such heads.
WIDE = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256)
# Bounds on the median canvas / encoder relative error against the f32 file. Random unit-scale weights
# through ~20 chained matmuls amplify a weight error e to about sqrt(20) e at the logits: measured
# f16 0.0008 / 0.0007, q8_0 0.026 / 0.019, q6_k 0.046 / 0.046, q4_k_m 0.137 / 0.132 (canvas / encoder);
# the bounds leave ~2x, and a wrong or mis-laid tensor gives ~1 or more.
BOUNDS = {"f16": 0.005, "q8_0": 0.05, "q6_k": 0.12, "q4_k_m": 0.25}


@pytest.fixture(scope="module")
def wide(tiny_vocab, tmp_path_factory):
    """(reference model, {type: (path, llama.cpp logits)}) for the wide tiny model in f32 and BOUNDS' types."""
    model = tiny.tiny_model(seed=3, **WIDE)
    d = tmp_path_factory.mktemp("wide")
    ck = tiny.save_checkpoint(model, d / "ck")
    files = {t: convert(ck, d / f"wide-{t}.gguf", t, tokenizer_from=tiny_vocab).path for t in ["f32", *BOUNDS]}
    return model, {t: (p, _llama_logits(p)) for t, p in files.items()}


def _dequantized_model(model, path):
    """A copy of the reference model holding the GGUF's weights as gguf-py dequantizes them."""
    import copy

    model = copy.deepcopy(model)
    expected = expected_tensors(model)  # numpy views of the copy's parameters
    for t in gguf.GGUFReader(path).tensors:
        if expected[t.name] is not None:
            expected[t.name][...] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[t.name].shape)
    return model


@pytest.mark.backend
@pytest.mark.parametrize("type_name, k_type", [("q4_k_m", Q.Q4_K), ("q6_k", Q.Q6_K)])
def test_k_quant_output_is_llama_cpp_quantized(wide, type_name, k_type):
    model, out = wide
    path, (enc, dec) = out[type_name]
    i = info(path)
    assert i.file_type == "MOSTLY_" + type_name.upper() and i.architecture == "diffusion-gemma"
    assert i.diffusion["canvas_length"] == tiny.CANVAS and i.diffusion["eos_token_ids"] == [1, 106, 50]
    tensors = gguf.GGUFReader(path).tensors
    types = {t.name: (t.tensor_type, int(t.shape[0])) for t in tensors}
    for t in tensors:
        name, (qtype, ncols) = t.name, types[t.name]
        if len(t.shape) == 1 or "ffn_gate_inp" in name:
            assert qtype == Q.F32, name  # norms, scales, router: llama.cpp keeps them f32
        elif ncols % 256:
            assert gguf.GGML_QUANT_SIZES[qtype][0] == 32, name  # llama.cpp's fallback for rows not a multiple of 256
        else:
            assert qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0), name
    assert types["token_embd.weight"][0] == Q.Q6_K  # also the output head: Q6_K, as in the community Q4_K_M
    assert sum(qtype == k_type for qtype, _ in types.values()) >= 20

    # close to the f32 file, and ordered by precision
    f32_enc, f32_dec = out["f32"][1]
    errors = {t: (np.median(_rel(out[t][1][1], f32_dec)), np.median(_rel(out[t][1][0], f32_enc))) for t in BOUNDS}
    for t, (e_dec, e_enc) in errors.items():
        assert e_dec < BOUNDS[t] and e_enc < BOUNDS[t], (t, e_dec, e_enc)
    assert 10 * errors["f16"][0] < errors["q8_0"][0] < errors["q6_k"][0] < errors["q4_k_m"][0], errors

    # tighter: llama.cpp's logits of the quantized file vs the reference run on the same weights as gguf-py
    # dequantizes them; what remains is llama.cpp's q8 rounding of activations (~ the q8_0 file's error)
    ref_enc, ref_dec = _reference_logits(_dequantized_model(model, path))
    assert np.median(_rel(dec, ref_dec)) < 0.05 and np.median(_rel(enc, ref_enc)) < 0.05


@pytest.mark.backend
def test_k_quant_fallback_on_rows_below_256(tiny_checkpoint, tiny_vocab, tmp_path):
    """The standard tiny model (rows of 32-128): no tensor can take a 256-block K-quant, so llama.cpp demotes
    each to its 32-block fallback (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0: more bits, never fewer)."""
    path = convert(tiny_checkpoint, tmp_path / "m.gguf", "q4_k_m", tokenizer_from=tiny_vocab).path
    mix = info(path).quant_mix
    assert set(mix) == {"F32", "Q5_0", "Q5_1", "Q8_0"}, mix
    assert mix["F32"]["tensors"] == 87 and sum(v["tensors"] for v in mix.values()) == 143
    enc, dec = _llama_logits(path)
    f32_enc, f32_dec = _llama_logits(convert(tiny_checkpoint, tmp_path / "f.gguf", "f32", tokenizer_from=tiny_vocab).path)
    assert np.median(_rel(dec, f32_dec)) < 0.25 and np.median(_rel(enc, f32_enc)) < 0.25  # measured 0.14 / 0.10


@pytest.mark.backend
def test_quantize_failure_leaves_nothing(tiny_f32_gguf, tmp_path):
    from dglocal.convert import quantize_gguf

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(tiny_f32_gguf.read_bytes()[:200_000])  # a truncated GGUF: header fine, tensor data missing
    out = tmp_path / "out.gguf"
    with pytest.raises(ConvertError, match="junk.gguf: llama.cpp could not quantize it to q4_k_m"):
        quantize_gguf(junk, out, "q4_k_m")
    assert _nothing_written(out)
    with pytest.raises(ConvertError, match="no such file"):
        quantize_gguf(tmp_path / "missing.gguf", out, "q4_k_m")
    ok = quantize_gguf(tiny_f32_gguf, out, "q8_0")
    assert ok == out and info(out).file_type == "MOSTLY_Q8_0" and _nothing_written(tmp_path / "out.gguf.partial")
    with pytest.raises(ConvertError, match="already exists"):
        quantize_gguf(tiny_f32_gguf, out, "q8_0")


# -- a full disk, a read-only directory, the mask token ----------------------------------------------------------

@pytest.mark.parametrize("errno_, words", [(28, "disk full"), (30, "read-only file system")])
def test_write_errors_are_named_and_never_masked_by_cleanup(tiny_checkpoint, tiny_vocab, tmp_path, monkeypatch,
                                                           errno_, words):
    """The write fails with ENOSPC / EROFS, and removing the partial file fails too (as in a read-only
    directory): the error says what happened, in words, and is the original one."""
    import os
    from pathlib import Path

    import dglocal.convert.writer as writer_mod

    def fail_replace(src, dst):
        raise OSError(errno_, os.strerror(errno_), str(dst))

    def fail_unlink(self, missing_ok=False):
        raise OSError(30, os.strerror(30), str(self))

    monkeypatch.setattr(writer_mod.os, "replace", fail_replace)
    monkeypatch.setattr(Path, "unlink", fail_unlink)
    with pytest.raises(ConvertError, match=f"write failed: {words}") as e:
        convert(tiny_checkpoint, tmp_path / "m.gguf", "f32", tokenizer_from=tiny_vocab)
    assert f"[Errno {errno_}]" in str(e.value)


def test_mask_token_id_is_written_when_the_vocabulary_has_one(tiny_checkpoint, tiny_vocab, tmp_path):
    """llama.cpp's DiffusionGemma readers refuse a file without tokenizer.ggml.mask_token_id (Gemma 4: <mask>, 4),
    even when the tokenizer source does not name it."""
    reader = gguf.GGUFReader(tiny_vocab)
    src = tmp_path / "vocab-no-mask.gguf"
    w = gguf.GGUFWriter(src, "gemma4")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "tokenizer.ggml.mask_token_id"):
            continue
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = convert(tiny_checkpoint, tmp_path / "m.gguf", "f32", tokenizer_from=src).path
    assert info(out).tokenizer["mask"] == 4
