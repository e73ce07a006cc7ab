"""Images in (#25): the vision tower on llama.cpp's multimodal library against the reference on the tiny
checkpoint: the processor's resize and patches, the tower's embeddings, the encoder with one and two images (the
image block bidirectional, sliding layers unclamped within it), the first denoise step after it, and whole
generations token- and step-identical to the reference generate with pixel_values."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import tiny
from reference_harness import ReferenceModel, head_logits

PIL = pytest.importorskip("PIL.Image")

SIZES = [(40, 56), (64, 64), (23, 90), (120, 33), (17, 17)]  # (height, width): 5 sizes and aspect ratios


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def processor():
    from transformers.models.gemma4 import Gemma4ImageProcessorPil

    v = tiny.VISION
    return Gemma4ImageProcessorPil(patch_size=v["patch_size"], pooling_kernel_size=v["pooling_kernel_size"],
                                   max_soft_tokens=tiny.MAX_SOFT_TOKENS)


@pytest.fixture(scope="session")
def vision_model(tiny_f32_gguf, tiny_mmproj):
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_ctx=1024, kv_type="f32", n_threads=2, flash_attn=False,
                     mmproj=tiny_mmproj, image_tokens=tiny.MAX_SOFT_TOKENS)
    yield m
    m.close()


def test_preprocessing_matches_the_reference_processor(processor):
    """Our resize (Pillow bicubic to the reference's size rule) gives the reference's patches and positions."""
    from dglocal.runtime.vision import load_image, resized, target_size

    v = tiny.VISION
    P, k = v["patch_size"], v["pooling_kernel_size"]
    for i, (h, w) in enumerate(SIZES):
        pixels = rgb(h, w, i)
        ref = processor(images=[PIL.fromarray(pixels)], return_tensors="np")
        pos = ref["image_position_ids"][0]
        valid = pos[:, 0] >= 0
        th, tw = target_size(h, w, P, k, tiny.MAX_SOFT_TOKENS)
        assert (th // P) * (tw // P) == valid.sum(), (h, w)
        ours = resized(load_image(PIL.fromarray(pixels)), (th, tw)).astype(np.float32) / 255
        patches = ours.reshape(th // P, P, tw // P, P, 3).transpose(0, 2, 1, 3, 4).reshape(-1, P * P * 3)
        np.testing.assert_array_equal(patches, ref["pixel_values"][0][valid])
        gx, gy = np.meshgrid(np.arange(tw // P), np.arange(th // P), indexing="xy")
        np.testing.assert_array_equal(np.stack([gx, gy], -1).reshape(-1, 2), pos[valid])
        assert ref["num_soft_tokens_per_image"][0] == valid.sum() // (k * k)


@pytest.mark.gpu_tier
@torch.no_grad()
def test_tower_embeddings_match_the_reference(vision_model, processor, tiny_model):
    from dglocal.runtime.vision import load_image

    for i, (h, w) in enumerate(SIZES):
        pixels = rgb(h, w, 10 + i)
        ref = processor(images=[PIL.fromarray(pixels)], return_tensors="pt")
        want = tiny_model.model.encoder.get_image_features(ref["pixel_values"], ref["image_position_ids"])
        want = want.pooler_output.reshape(-1, want.pooler_output.shape[-1]).numpy()
        got = vision_model.vision.embed(load_image(PIL.fromarray(pixels)))
        assert got.shape == want.shape, (h, w)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-4 and np.abs(got - want).max() < 1e-3, (h, w, rel)


@torch.no_grad()
# q8_0: llama.cpp also rounds the activations into q8 blocks for its q8_0 products (2.2% measured; the text
# model's encoder: up to 3%, docs/quantization.md)
@pytest.mark.parametrize("kind,tolerance", [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 5e-2)])
def test_the_tower_runs_from_every_mmproj_type(tiny_checkpoint, tiny_f32_gguf, processor, tiny_model, tmp_path,
                                               kind, tolerance):
    """Every type convert writes loads and encodes, within the type's rounding of the reference. In a subprocess:
    an f16 file's f16 patch kernel once aborted the process in llama.cpp's scheduler."""
    import subprocess
    import sys

    from dglocal.convert.mmproj import convert_mmproj

    mmproj = convert_mmproj(tiny_checkpoint, tmp_path / f"mmproj-{kind}.gguf", kind)
    pixels = rgb(40, 56, 40)
    PIL.fromarray(pixels).save(tmp_path / "a.png")
    script = (f"import dglocal, numpy as np; from dglocal.runtime.vision import load_image\n"
              f"with dglocal.load({str(tiny_f32_gguf)!r}, n_ctx=1024, n_threads=2, flash_attn=False, "
              f"mmproj={str(mmproj)!r}, image_tokens={tiny.MAX_SOFT_TOKENS}) as m:\n"
              f"    np.save({str(tmp_path / 'got.npy')!r}, m.vision.embed(load_image({str(tmp_path / 'a.png')!r})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = processor(images=[PIL.fromarray(pixels)], return_tensors="pt")
    want = tiny_model.model.encoder.get_image_features(ref["pixel_values"], ref["image_position_ids"])
    want = want.pooler_output.reshape(-1, want.pooler_output.shape[-1]).numpy()
    got = np.load(tmp_path / "got.npy")
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tolerance


def _prompt(model, images):
    text = "Look: <|image|> and say what it is." if len(images) == 1 else \
        "First <|image|>, then <|image|>: which is brighter?"
    return text


@pytest.mark.gpu_tier
@torch.no_grad()
@pytest.mark.parametrize("n_images", [1, 2])
def test_encoder_and_first_denoise_match_the_reference(vision_model, processor, tiny_model, n_images):
    from dglocal.generation.request import plan

    images = [PIL.fromarray(rgb(*SIZES[i], 20 + i)) for i in range(n_images)]
    p = plan(vision_model.model, _prompt(vision_model, images), images=images, seed=0)
    toks = np.array(p.tokens)
    image_id = tiny_model.config.image_token_id
    ref_ids = np.where(toks >= vision_model.n_vocab, image_id, toks)
    assert (ref_ids == image_id).sum() == sum(len(e) for e in p.images)

    # the text after the last image, whose logits see every image (prefill in two calls: the same cache)
    tail = int(np.flatnonzero(toks >= vision_model.n_vocab)[-1]) + 1
    seq = vision_model.sequence()
    seq.prefill(p.tokens[:tail])
    got = seq.prefill(p.tokens[tail:], logits_all=True)

    rm = ReferenceModel(tiny_model)
    rseq = rm.sequence()
    proc = processor(images=images, return_tensors="pt")
    rseq.prefill_images(ref_ids.tolist(), proc["pixel_values"], proc["image_position_ids"])
    want = head_logits(tiny_model, rseq.last_hidden)[tail:]
    assert np.abs(got - want).max() <= 1e-3
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-4

    canvas = np.random.default_rng(n_images).integers(0, vision_model.n_vocab, vision_model.canvas_length)
    d = seq.denoise(canvas, temperature=0.7, self_condition=False, return_logits=True)
    r = rseq.denoise(canvas, temperature=0.7, self_condition=False, return_logits=True)
    assert np.abs(d.logits / 0.7 - r.logits).max() <= 1e-3
    np.testing.assert_array_equal(d.argmax, r.argmax)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("seed,early", [(0, False), (1, True)])
def test_a_generation_with_an_image_equals_the_reference_generate(vision_model, processor, tiny_model, seed, early):
    """The driver's whole trajectory after a prompt with an image: canvases and steps per canvas equal the
    reference generate given pixel_values, image_position_ids and mm_token_type_ids, fed identical noise."""
    from reference_harness import reference_generate
    from test_generate import BASE, EARLY
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    from dglocal.generation.driver import stream
    from dglocal.generation.events import BlockText
    from dglocal.generation.request import plan
    from dglocal.generation.sampler import SeededNoise

    cfg = EARLY if early else BASE
    V = vision_model.n_vocab
    image = PIL.fromarray(rgb(*SIZES[seed + 1], 30 + seed))
    prompt = "Describe <|image|> in one word."
    p = plan(vision_model.model, prompt, images=[image], seed=0)
    ids = np.array(p.tokens)
    ref_ids = np.where(ids >= V, tiny_model.config.image_token_id, ids).tolist()
    proc = processor(images=[image], return_tensors="pt")
    kw = dict(cfg, sampler_config=EntropyBoundSamplerConfig(entropy_bound=cfg["entropy_bound"]))
    del kw["entropy_bound"]
    mm = torch.tensor([ref_ids]) == tiny_model.config.image_token_id
    ref_tokens, ref_steps = reference_generate(
        tiny_model, ref_ids, SeededNoise(V, seed), eos_token_id=None, pad_token_id=0,
        pixel_values=proc["pixel_values"], image_position_ids=proc["image_position_ids"],
        mm_token_type_ids=mm.long(), **kw)
    events = list(stream(vision_model, prompt, images=[image], eos_token_id=(), noise=SeededNoise(V, seed), **cfg))
    blocks = [e for e in events if isinstance(e, BlockText)]
    assert np.concatenate([b.canvas for b in blocks]).tolist() == ref_tokens
    assert [b.steps for b in blocks] == ref_steps
    blind, _ = reference_generate(tiny_model, [t for t in ref_ids if t != tiny_model.config.image_token_id],
                                  SeededNoise(V, seed), eos_token_id=None, pad_token_id=0, **kw)
    assert blind != ref_tokens  # the image changed the answer


def test_run_with_an_image_prints_the_api_answer(tiny_f32_gguf, tiny_mmproj, tmp_path):
    """`dglocal run --mmproj F --image a.png -p TEXT` answers as the Python chat does with the same image; without
    --mmproj, --image is refused with the reason."""
    import dglocal
    from test_cli import piped

    path = tmp_path / "a.png"
    PIL.fromarray(rgb(40, 56, 7)).save(path)
    with dglocal.load(tiny_f32_gguf, n_ctx=1024, n_threads=1, mmproj=tiny_mmproj,
                      image_tokens=tiny.MAX_SOFT_TOKENS) as m:
        expected = m.chat().send("hello", images=[path], max_denoising_steps=4, max_new_tokens=32, seed=3).text
        blind = m.chat().send("hello", max_denoising_steps=4, max_new_tokens=32, seed=3).text
    assert expected != blind  # the image is in the answer
    assert "<|channel>" not in expected  # seed 3: no thinking block, which the terminal would show apart
    args = ["run", tiny_f32_gguf, "-c", "1024", "-t", "1", "--seed", "3", "--steps", "4", "-n", "32", "--mmproj",
            tiny_mmproj, "--image-tokens",
            str(tiny.MAX_SOFT_TOKENS), "--image", path, "-p", "hello"]
    out = piped(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    refused = piped("run", tiny_f32_gguf, "--image", path, "-p", "hello")
    assert refused.returncode == 1 and "--mmproj" in refused.stderr


def test_convert_writes_the_tower_beside_the_model_and_info_shows_it(tiny_checkpoint, tiny_vocab, tmp_path):
    import json

    from test_cli import piped

    out = tmp_path / "t.gguf"
    done = piped("convert", tiny_checkpoint, out, "--type", "f32", "--tokenizer-from", tiny_vocab)
    assert done.returncode == 0, done.stderr
    tower = tmp_path / "mmproj-t.gguf"
    assert tower.is_file() and str(tower) in done.stdout
    info = json.loads(piped("info", tower, "--json").stdout)
    assert info["architecture"] == "clip" and info["hparams"]["vision.projector_type"] == "gemma4v"
    model = json.loads(piped("info", out, "--json").stdout)
    assert model["diffusion"]["image_token_id"] == tiny.IMAGE_IDS["image_token_id"]
    bare = piped("convert", tiny_checkpoint, tmp_path / "u.gguf", "--type", "f32", "--tokenizer-from", tiny_vocab,
                 "--no-mmproj")
    assert bare.returncode == 0 and not (tmp_path / "mmproj-u.gguf").exists()


def test_image_command_in_a_real_terminal_and_the_cache_keeps_the_image(tiny_f32_gguf, tiny_mmproj, tmp_path):
    """/image in the chat (tmux): the image is announced with its size and tokens and goes with the next message;
    the next turn encodes only its new tokens, the image staying in the cached prefix."""
    from test_cli import DGLOCAL, STAT, Tmux, _last_line, _stats

    path = tmp_path / "b.png"
    PIL.fromarray(rgb(40, 56, 8)).save(path)
    term = Tmux()
    try:
        term.start(*DGLOCAL, "run", tiny_f32_gguf, "-c", "1024", "-t", "1", "--seed", "1", "--steps", "4", "-n",
                   "16", "--mmproj", tiny_mmproj, "--image-tokens", str(tiny.MAX_SOFT_TOKENS))
        term.wait_prompt("the chat prompt")
        term.type(f"/image {path}")
        term.wait(lambda s: "image attached: 56x40, 63 tokens" in s and _last_line(s) == ">", "the attach notice")
        term.type("hello")
        term.wait(lambda s: len(STAT.findall(s)) == 1 and _last_line(s) == ">", "the first answer")
        term.type("/stats")
        first = _stats(term.wait(lambda s: s.count("last answer") == 1 and _last_line(s) == ">", "/stats"))
        assert first["prefilled tokens"] == first["prompt tokens"] > 63 + 2
        term.type("and now?")
        term.wait(lambda s: len(STAT.findall(s)) == 2 and _last_line(s) == ">", "the second answer")
        term.type("/stats")
        second = _stats(term.wait(lambda s: s.count("last answer") == 2 and _last_line(s) == ">", "/stats"))
        assert second["prompt tokens"] > first["prompt tokens"] + first["generated tokens"]
        assert second["prefilled tokens"] < second["prompt tokens"] - 63  # the image was not encoded again
    finally:
        term.close()


MEASURE = """
import os, sys
from dglocal.runtime import native
from dglocal.runtime.model import Model
with Model(sys.argv[1], n_ctx=256, n_threads=1) as m:
    mt = native.mtmd()
    p = mt.mtmd_context_params_default()
    p.use_gpu, p.warmup, p.flash_attn_type, p.n_threads = False, True, int(sys.argv[3]), 1
    ctx = mt.mtmd_init_from_file(os.fsencode(sys.argv[2]), m._model, p)
    assert ctx
    mt.mtmd_free(ctx)
"""


@pytest.mark.parametrize("flash", [1, 0])
def test_tower_memory_bounds_what_libmtmd_allocates(tiny_f32_gguf, tiny_mmproj, flash):
    """`dglocal plan --mmproj` counts the tower from the file's shapes: the weights are libmtmd's own figure, and
    the compute bound holds over the buffer libmtmd reserves at its warmup size (256 soft tokens), within 1.5x."""
    import re
    import subprocess
    import sys

    from dglocal.runtime.vision import tower_memory

    r = subprocess.run([sys.executable, "-c", MEASURE, str(tiny_f32_gguf), str(tiny_mmproj), str(flash)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "DGLOCAL_DEBUG": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    mib = lambda pattern: float(re.search(pattern + r"\s*=?\s*([\d.]+) MiB", r.stderr).group(1))  # noqa: E731
    assert f"flash attention is {'enabled' if flash else 'disabled'}" in r.stderr
    ours = tower_memory(tiny_mmproj, tiny.TEXT["hidden_size"], 256)
    assert ours["weights"] / 2**20 == pytest.approx(mib(r"load_hparams: model size:"), abs=0.01)
    theirs = mib(r"reserve_compute_meta:\s+CPU compute buffer size")
    bound = (ours["compute_flash"] if flash else ours["compute"]) / 2**20
    assert theirs <= bound <= 1.5 * theirs, (theirs, bound)


def test_edit_after_an_image_keeps_the_image_in_the_prompt(vision_model, tmp_path):
    """/edit re-noises part of an answer that followed an image: the edit's prompt is the rendered conversation
    with the image filled in (not its bare marker token), so it equals the edit made by hand with the image."""
    from test_cli import RecordingView

    from dglocal.cli.chat import ChatLoop, edit_spans
    from dglocal.generation.editing import edit_request
    from dglocal.runtime.vision import load_image

    path = tmp_path / "e.png"
    PIL.fromarray(rgb(40, 56, 9)).save(path)
    options = dict(max_new_tokens=16, max_denoising_steps=4, seed=2)
    view = RecordingView([f"/image {path}", "hello", "/edit 1", "/exit"])
    loop = ChatLoop(vision_model, view, **options)
    loop.run()
    assert not [c for c in view.calls if c[0] == "error"], view.calls
    image = load_image(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hello"}]}]
    prompt, images = loop.session.template.prompt(vision_model, messages)
    assert isinstance(prompt, str) and len(images) == 1
    first = next(c[1][0] for c in view.calls if c[0] == "end_answer")
    spans, room = edit_spans(first.text, "1")
    req = edit_request(vision_model, first.text, spans, prompt=prompt, room=room, images=images,
                       max_denoising_steps=4, seed=2)
    by_hand = req.result(vision_model.generate(req.prompt, **req.options))
    assert loop.last.text == by_hand.text
