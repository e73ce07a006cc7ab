"""LoRA adapters: PEFT adapters of the tiny checkpoint, converted with `dglocal convert --lora`, loaded through
llama.cpp's adapter API, against the reference with the adapter merged (PEFT's merge_and_unload) at the same
scale: encoder logits and denoising logits, at two scales and with two adapters at once."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny
from reference_harness import ReferenceModel, encoder_logits

import dglocal
from dglocal.convert.lora import convert_lora
from dglocal.errors import ConfigError, ConvertError, ModelError

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

C = tiny.CANVAS
TOL = 1e-4  # relative L2 of a row of logits (exactness mode: f32 file, f32 cache, no flash attention)
LAYERS = r"model\.(decoder|encoder\.language_model)\.layers\.\d+\."
# adapter 1: attention and the dense MLP, in both the encoder's and the decoder's copy of each layer
ATTN_MLP = LAYERS + r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
# adapter 2: the decoder's own self-conditioning layers and the router
DECODER_OWN = r"model\.decoder\.(self_conditioning\.(gate|up|down)_proj|layers\.\d+\.router\.proj)"


def peft_adapter(tm, target: str, seed: int, path, r: int = 4):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(tm), LoraConfig(r=r, lora_alpha=2 * r, target_modules=target,
                                                         init_lora_weights=False))
    with torch.no_grad():  # discriminative: every B non-zero and large enough to move the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def merged(tm, adapters):
    """The reference with each (PEFT dir, scale) merged in, as merge_and_unload does."""
    from peft import PeftModel

    model = copy.deepcopy(tm)
    for path, scale in adapters:
        peft = PeftModel.from_pretrained(model, path)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
        model = peft.merge_and_unload()
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    out = {}
    for key, target, seed in (("attn", ATTN_MLP, 1), ("own", DECODER_OWN, 2)):
        peft_dir = peft_adapter(tiny_model, target, seed, d / key)
        result = convert_lora(peft_dir, d / f"{key}.gguf")
        out[key] = (peft_dir, result.path)
    return out


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def compare(tiny_f32_gguf, tiny_model, adapters, chosen):
    """Encoder logits of every prompt token and two denoising steps, llama.cpp with the adapters at their scales
    against the reference with them merged; also that the adapters moved the logits far beyond the tolerance."""
    ref_model = merged(tiny_model, [(adapters[k][0], s) for k, s in chosen])
    prompt = np.random.default_rng(3).integers(3, tiny.VOCAB, 14).tolist()
    canvas = np.random.default_rng(4).integers(0, tiny.VOCAB, C).astype(np.int32)
    with dglocal.load(tiny_f32_gguf, n_ctx=512, kv_type="f32", flash_attn=False, n_threads=2,
                      lora=[(str(adapters[k][1]), s) for k, s in chosen]) as m:
        seq = m.sequence()
        enc = seq.prefill(prompt, logits_all=True)
        steps = [seq.denoise(canvas, temperature=0.7, self_condition=sc, return_logits=True).logits / 0.7
                 for sc in (False, True)]
    want_enc = encoder_logits(ref_model, prompt)
    rseq = ReferenceModel(ref_model).sequence()
    rseq.prefill(prompt)
    want = [rseq.denoise(canvas, temperature=0.7, self_condition=sc, return_logits=True).logits for sc in (False, True)]
    assert rel(enc, want_enc).max() < TOL
    for got, exp in zip(steps, want):
        assert rel(got, exp).max() < TOL
    base = encoder_logits(tiny_model, prompt)
    assert rel(base, want_enc).min() > 100 * TOL  # the adapter changed every row
    return steps, want


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_an_adapter_at_a_scale_equals_the_merged_reference(tiny_f32_gguf, tiny_model, adapters, scale):
    compare(tiny_f32_gguf, tiny_model, adapters, [("attn", scale)])


def test_two_adapters_at_once_equal_both_merged(tiny_f32_gguf, tiny_model, adapters):
    steps, want = compare(tiny_f32_gguf, tiny_model, adapters, [("attn", 0.7), ("own", 1.3)])
    # the decoder-only adapter moves the denoising logits (self-conditioning is in the second step only)
    alone = merged(tiny_model, [(adapters["attn"][0], 0.7)])
    rseq = ReferenceModel(alone).sequence()
    rseq.prefill(np.random.default_rng(3).integers(3, tiny.VOCAB, 14).tolist())
    canvas = np.random.default_rng(4).integers(0, tiny.VOCAB, C).astype(np.int32)
    rseq.denoise(canvas, temperature=0.7, self_condition=False)
    second = rseq.denoise(canvas, temperature=0.7, self_condition=True, return_logits=True).logits
    assert rel(second, want[1]).min() > 100 * TOL


def test_scales_change_per_generation_without_reloading(tiny_f32_gguf, adapters):
    """A generation's `lora` scales apply to its own forwards: equal to a model loaded at those scales."""
    path = str(adapters["attn"][1])
    opts = dict(n_ctx=512, kv_type="f32", flash_attn=False, n_threads=2, seed=0)
    with dglocal.load(tiny_f32_gguf, lora=[(path, 0.0)], **opts) as m:
        mixed = [m.generate([2, 5, 9], seed=7, max_new_tokens=C, max_denoising_steps=4, lora={0: s}).tokens
                 for s in (1.0, 0.0, 0.5)]
        assert m.adapters.info() == [{"id": 0, "path": path, "scale": 0.0}]  # the loaded scale is kept
    for s, tokens in zip((1.0, 0.0, 0.5), mixed):
        with dglocal.load(tiny_f32_gguf, lora=[(path, s)], **opts) as fixed:
            assert fixed.generate([2, 5, 9], seed=7, max_new_tokens=C, max_denoising_steps=4).tokens == tokens
    assert mixed[0] != mixed[1]


def test_batched_generations_with_different_scales_take_turns(tiny_f32_gguf, adapters):
    """generate_many over members whose scales differ: each equals its own run alone (no forward mixes them)."""
    from dglocal.generation.driver import run_many

    path = str(adapters["attn"][1])
    with dglocal.load(tiny_f32_gguf, n_ctx=2048, kv_type="f32", flash_attn=False, n_threads=2, n_seq_max=4,
                      lora=[(path, 1.0)]) as m:
        specs = [([2, 5, 9 + i], dict(seed=i, max_new_tokens=2 * C, max_denoising_steps=4, lora={0: s}))
                 for i, s in enumerate((1.0, 0.0, 1.0, 0.25))]
        together = [c.tokens for c in run_many(m.model, specs)]
        alone = [m.generate(p, **o).tokens for p, o in specs]
    assert together == alone


def test_bad_adapters_are_clear_errors(tiny_f32_gguf, adapters, tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nonsense")
    for lora, words in [(str(tmp_path / "missing.gguf"), "no such file"), (str(not_gguf), "could not load"),
                        (str(tiny_f32_gguf), "could not load")]:
        with pytest.raises(ModelError, match=words):
            dglocal.load(tiny_f32_gguf, n_ctx=256, lora=lora)
    for lora, words in [([(str(adapters["attn"][1]), float("nan"))], "finite"), ([("a", "b", 1)], "path or"),
                        ([5], "path or")]:
        with pytest.raises(ConfigError, match=words):
            dglocal.load(tiny_f32_gguf, n_ctx=256, lora=lora)
    with dglocal.load(tiny_f32_gguf, n_ctx=256, lora=str(adapters["attn"][1])) as m:
        for scales, words in [({3: 1.0}, "id 3 does not exist"), ({0: "x"}, "finite"), ([{"id": 0}], "id.*scale")]:
            with pytest.raises(ConfigError, match=words):
                m.generate([2, 3], lora=scales, max_new_tokens=4)
    with dglocal.load(tiny_f32_gguf, n_ctx=256) as m:
        with pytest.raises(ConfigError, match="without LoRA adapters"):
            m.generate([2, 3], lora={0: 1.0}, max_new_tokens=4)


def with_alpha(src, dst, alpha: float):
    """A copy of the adapter GGUF `src` whose adapter.lora.alpha (a float32 after its key) is `alpha`."""
    import struct

    from dglocal.runtime.gguf import read_header

    data = bytearray(src.read_bytes())
    at = data.index(b"adapter.lora.alpha") + len(b"adapter.lora.alpha")
    assert struct.unpack_from("<I", data, at)[0] == 6  # GGUFValueType.FLOAT32
    struct.pack_into("<f", data, at + 4, alpha)
    dst.write_bytes(bytes(data))
    assert np.float32(read_header(dst).kv["adapter.lora.alpha"]).tobytes() == np.float32(alpha).tobytes()
    return dst


def test_an_adapter_with_an_alpha_that_ruins_every_token_is_refused(tiny_f32_gguf, adapters, tmp_path):
    """llama.cpp multiplies by alpha / rank as it finds it: a NaN alpha loaded, and every token came out garbage."""
    import re

    src = adapters["attn"][1]
    for alpha, shown in [(float("nan"), "nan"), (float("inf"), "inf"), (-2.0, "-2"), (1e30, r"1e\+30")]:
        bad = with_alpha(src, tmp_path / "bad.gguf", alpha)
        with pytest.raises(ModelError, match=rf"LoRA adapter {re.escape(str(bad))}: adapter\.lora\.alpha is {shown}; "
                                             r"it must be a number in 0\.\.1e\+06"):
            dglocal.load(tiny_f32_gguf, n_ctx=256, lora=str(bad))
    with dglocal.load(tiny_f32_gguf, n_ctx=256, lora=str(with_alpha(src, tmp_path / "ok.gguf", 8.0))) as m:
        assert m.adapters.info()[0]["path"] == str(tmp_path / "ok.gguf")


def test_unsupported_peft_adapters_are_refused(tiny_model, tmp_path):
    import json

    d = peft_adapter(tiny_model, r"model\.decoder\.layers\.0\.self_attn\.q_proj", 3, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    for key, value, words in [("use_dora", True, "DoRA"), ("bias", "all", "bias"),
                              ("modules_to_save", ["lm_head"], "modules_to_save")]:
        (d / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ConvertError, match=words):
            convert_lora(d, tmp_path / "out.gguf")
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    head = peft_adapter(tiny_model, r"lm_head", 3, tmp_path / "v")  # tied to the embedding: no weight of its own
    with pytest.raises(ConvertError, match="lm_head"):
        convert_lora(head, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.partial"))
