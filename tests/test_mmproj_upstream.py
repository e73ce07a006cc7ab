"""Community Gemma 4 mmproj files (written by llama.cpp's own `convert_hf_to_gguf.py --mmproj`) work unchanged with
dglocal: the pinned converter, run on a Gemma 4 checkpoint holding the tiny tower, writes our tensors bit for bit,
and its file gives our file's image embeddings.

The converter writes no pooling key (clip.vision.projector.scale_factor): llama.cpp's loader (and dglocal's
check_mmproj) then assume 3, the pooling of every published Gemma 4. The tiny tower pools 2x2, so both files here
are written from a copy of the tiny checkpoint whose config says 3 (pooling is no weight: the tensors are those of
tiny_mmproj, which the test checks too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import tiny

PIL = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow  # the converter in a child process: ~5 s of torch import and conversion

POOLING = 3  # what the loader assumes without the key
# metadata only our writer gives; each is a key the loader reads, equal here to the loader's default without it
# (head_count_kv: n_head; head_dim: n_embd / n_head; scale_factor: 3; use_gelu: the patched gemma4v default)
OURS_ONLY = {"clip.has_audio_encoder": False, "clip.use_gelu": True, "clip.vision.attention.head_count_kv": 2,
             "clip.vision.attention.head_dim": 16, "clip.vision.projector.scale_factor": POOLING}
UPSTREAM_ONLY = {"general.quantization_version", "general.size_label"}  # neither is read by the clip loader


@pytest.fixture(scope="module")
def pooled(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint, its vision config saying pooling 3."""
    out = tmp_path_factory.mktemp("pooled")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["vision_config"]["pooling_kernel_size"] = POOLING
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").symlink_to(tiny_checkpoint / "model.safetensors")
    return out


def gemma4_checkpoint(source, out):
    """`source`'s tower and projector in a Gemma4ForConditionalGeneration saved by transformers, the shape of the
    published checkpoints the converter is made for (its text model is a random one-layer stand-in: with --mmproj
    the converter skips every language_model tensor and reads only text_config.hidden_size)."""
    from safetensors.torch import load_file
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4 import Gemma4ImageProcessorPil

    vision = json.loads((source / "config.json").read_text())["vision_config"]
    config = Gemma4Config(vision_config=vision, audio_config=None, text_config=dict(
        hidden_size=tiny.TEXT["hidden_size"], intermediate_size=128, vocab_size=tiny.VOCAB, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=["full_attention"]))
    model = Gemma4ForConditionalGeneration(config)
    # DiffusionGemma keeps the tower under model.encoder., Gemma 4 under model.
    weights = {k.replace("model.encoder.", "model.", 1): v for k, v in load_file(source / "model.safetensors").items()
               if k.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("language_model" in k or k == "lm_head.weight" for k in missing), missing
    model.save_pretrained(out)
    # the converter reads image_mean / image_std from here (the reference processor's: no normalisation)
    Gemma4ImageProcessorPil(patch_size=vision["patch_size"], pooling_kernel_size=vision["pooling_kernel_size"],
                            max_soft_tokens=tiny.MAX_SOFT_TOKENS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def upstream(pooled, tmp_path_factory):
    """The mmproj that the pinned llama.cpp's converter writes (f32), with the gguf-py vendored beside it."""
    from dglocal.runtime.upstream import fetch_sdist

    tmp = tmp_path_factory.mktemp("upstream")
    with tarfile.open(fetch_sdist()) as tf:
        root = tf.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        wanted = [m for m in tf.getmembers() if m.name == root + "convert_hf_to_gguf.py"
                  or m.name.startswith((root + "conversion/", root + "gguf-py/"))]
        tf.extractall(tmp, members=wanted, filter="data")
    llama = tmp / root
    out = tmp / "mmproj-upstream-f32.gguf"
    checkpoint = gemma4_checkpoint(pooled, tmp / "gemma4")
    # the converter puts its vendored gguf-py ahead of pip's by itself; PYTHONPATH too, should NO_LOCAL_GGUF be set
    run = subprocess.run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(checkpoint), "--mmproj",
                          "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(llama / "gguf-py")})
    assert run.returncode == 0, run.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def ours(pooled, tmp_path_factory):
    from dglocal.convert.mmproj import convert_mmproj

    return convert_mmproj(pooled, tmp_path_factory.mktemp("ours") / "mmproj-ours-f32.gguf", "f32")


def read(path):
    import gguf

    r = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return kv, {t.name: (t.tensor_type, tuple(t.shape), np.array(t.data)) for t in r.tensors}


def test_upstream_file_has_our_tensors_and_metadata(upstream, ours, tiny_mmproj):
    (kv_up, t_up), (kv_ours, t_ours) = read(upstream), read(ours)
    for other in (t_ours, read(tiny_mmproj)[1]):  # names, types, shapes (the conv kernel's layout) and values
        assert t_up.keys() == other.keys()
        for name, (qtype, shape, data) in t_up.items():
            assert (qtype, shape) == other[name][:2], name
            np.testing.assert_array_equal(data, other[name][2], err_msg=name)
    assert {k: kv_ours[k] for k in kv_ours.keys() - kv_up.keys()} == OURS_ONLY
    assert kv_up.keys() - kv_ours.keys() == UPSTREAM_ONLY
    # the rest is equal but the name (each writer names the file after its source directory)
    assert [k for k in kv_up.keys() & kv_ours.keys() if kv_up[k] != kv_ours[k]] == ["general.name"]


@pytest.mark.backend
def test_upstream_file_gives_our_image_embeddings(tiny_f32_gguf, upstream, ours):
    import dglocal
    from dglocal.runtime.vision import load_image

    image = load_image(PIL.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)))
    got = []
    for mmproj in (upstream, ours):
        m = dglocal.load(tiny_f32_gguf, n_ctx=1024, kv_type="f32", n_threads=2, flash_attn=False, mmproj=mmproj,
                         image_tokens=tiny.MAX_SOFT_TOKENS)
        try:
            assert m.vision.pooling == POOLING
            got.append(m.vision.embed(image))
        finally:
            m.close()
    assert got[0].shape == got[1].shape == (63, tiny.TEXT["hidden_size"])  # 84 x 108 pixels: 7 x 9 soft tokens
    assert np.abs(got[0] - got[1]).max() <= 1e-6
