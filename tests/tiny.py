"""Tiny random DiffusionGemma checkpoints built with the reference classes (docs/testing.md).

`tiny_model()` gives a float32 reference model whose weights are re-drawn so that every tensor
matters: the reference init leaves norms, router scales, per_expert_scale and layer_scalar at
exactly 1.0, which would hide a swapped or missing tensor. `save_checkpoint()` writes it the way
a converter sees a real checkpoint (tied encoder weights absent, both layer_scalar buffers kept).

`tiny_vocab_gguf()` writes a 512-token vocab-only GGUF cut from llama.cpp's
`ggml-vocab-gemma-4.gguf` (the real Gemma 4 tokenizer): the tokenizer for tiny checkpoints, given
to the converter with `tokenizer_from=`. Ids 0..511 hold the special tokens (pad 0, eos 1, bos 2,
unk 3, mask 4, `<|turn>` 105, `<turn|>` 106, ...), all 256 byte tokens (238..493) and a few
merges, so any text tokenizes (byte fallback) and the chat template still works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

VOCAB = 512
CANVAS = 16
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=len(LAYER_TYPES),
    layer_types=LAYER_TYPES,
    num_attention_heads=4,
    num_key_value_heads=2,          # sliding layers: head_dim 16, 2 kv heads
    head_dim=16,
    global_head_dim=32,             # full layers: head_dim 32, 1 kv head (the published form)
    num_global_key_value_heads=1,
    sliding_window=8,               # prompts longer than 8 exercise the window
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    max_position_embeddings=1024,
    use_bidirectional_attention="vision",  # the published form: an image's tokens see each other in the encoder
)

# The vision tower (mandatory in the reference class): 2 layers, 4-pixel patches pooled 2x2, standardized output,
# so that an image is a few hundred patches and every tensor of the schema is present. Images enter as <|image>
# (BOI), n x <|image|>, <image|> (EOI): ids 6-8 of the tiny vocab (tiny_vocab_gguf names them so).
VISION = dict(
    model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, head_dim=16, position_embedding_size=256,
    patch_size=4, pooling_kernel_size=2, standardize=True,
)
IMAGE_IDS = dict(boi_token_id=6, image_token_id=7, eoi_token_id=8)
IMAGE_TOKENS = {6: "<|image>", 7: "<|image|>", 8: "<image|>"}
MAX_SOFT_TOKENS = 70  # the reference processor's smallest budget: 280 patches of 4x4 pixels

# Explicit, non-default values so a converter that falls back to the defaults is caught.
GENERATION = dict(
    max_new_tokens=64,
    max_denoising_steps=12,
    entropy_bound=0.2,
    t_min=0.3,
    t_max=0.9,
    stability_threshold=2,
    confidence_threshold=0.01,
    eos_token_id=[1, 106, 50],
    bos_token_id=2,
    pad_token_id=0,
)

def vocab_gguf() -> Path:
    """The vocab-only Gemma 4 GGUF shipped in the pinned llama-cpp-python sdist (docs/gguf.md)."""
    from dglocal.runtime.upstream import VOCAB_GEMMA4, sdist_file

    return Path(os.environ.get("DGLOCAL_VOCAB_GGUF") or sdist_file(VOCAB_GEMMA4))


def tiny_config(**overrides) -> DiffusionGemmaConfig:
    """The tiny reference config; `canvas_length` goes top-level, other overrides to text_config."""
    canvas_length = overrides.pop("canvas_length", CANVAS)
    text = {**TEXT, **overrides}
    return DiffusionGemmaConfig(text_config=text, vision_config=dict(VISION), canvas_length=canvas_length,
                                **IMAGE_IDS)


@torch.no_grad()
def tiny_model(seed: int = 0, **overrides) -> DiffusionGemmaForBlockDiffusion:
    """Reference model, float32, eval mode, with discriminative random weights."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(**overrides)).float().eval()
    # the vision tower draws from a generator of its own: the text weights are those of the tests' tuned bounds,
    # whatever the tower's shape
    text_g = torch.Generator().manual_seed(seed)
    vision_g = torch.Generator().manual_seed(seed + 1_000_003)

    def uniform(t, lo, hi, g):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    # named_parameters() yields each tied tensor once (encoder text weights are the decoder's)
    for name, p in model.named_parameters():
        g = vision_g if ".vision_tower." in name or ".embed_vision." in name else text_g
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            uniform(p, 0.2, 0.5, g)
        elif name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
            uniform(p, 0.5, 1.5, g)
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=g))  # unit rows: logits of order 10, softcap active
        elif name.endswith("position_embedding_table"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)  # fan-in scaling
        else:
            raise AssertionError(f"tiny_model: no draw rule for {name} {tuple(p.shape)}")
    # layer_scalar is a buffer, one per layer in each of the encoder and the decoder (not tied)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            lo, hi = (0.5, 0.9) if ".encoder." in name else (1.1, 1.5)
            uniform(b, lo, hi, text_g)
        elif name.endswith("std_bias"):
            uniform(b, -0.5, 0.5, vision_g)
        elif name.endswith("std_scale"):
            uniform(b, 0.5, 1.5, vision_g)
    return model


def save_checkpoint(model, directory, *, config_form: str = "per_layer", generation: dict | None = None) -> Path:
    """Write safetensors + config.json + generation_config.json into `directory` and return it.

    config_form: "per_layer" keeps the `per_layer_config` block that 5.23's save_pretrained writes;
    "global" rewrites it as `global_head_dim` + `num_global_key_value_heads` (the published form).
    generation: overrides of `GENERATION` (entropy_bound goes into sampler_config).
    """
    if config_form not in ("per_layer", "global"):
        raise ValueError(f"config_form must be 'per_layer' or 'global', got {config_form!r}")
    directory = Path(directory)
    model.save_pretrained(directory)

    if config_form == "global":
        path = directory / "config.json"
        config = json.loads(path.read_text())
        text = config["text_config"]
        full = [text["per_layer_config"][str(i)] for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
        del text["per_layer_config"]
        text["global_head_dim"] = full[0]["head_dim"]
        text["num_global_key_value_heads"] = full[0]["num_key_value_heads"]
        path.write_text(json.dumps(config, indent=2) + "\n")

    gen = {**GENERATION, **(generation or {})}
    gen["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(gen.pop("entropy_bound")))
    DiffusionGemmaGenerationConfig(**gen).save_pretrained(directory)
    return directory


def tiny_vocab_gguf(path, n_vocab: int = VOCAB, source: Path | None = None) -> Path:
    """Write a vocab-only gemma4 GGUF holding the first `n_vocab` tokens of the real tokenizer
    (dglocal.convert.synth.cut_tokenizer: merges kept where both halves and their concatenation remain)."""
    import gguf

    from dglocal.convert.tokenizer import write_tokenizer
    from dglocal.runtime.gguf import read_header
    from dglocal.convert.synth import cut_tokenizer

    h = read_header(source or vocab_gguf())
    tok = [(k, v, *h.kv_types[k]) for k, v in h.kv.items() if k.startswith("tokenizer.")]
    writer = gguf.GGUFWriter(path, "gemma4")
    cut = cut_tokenizer(tok, n_vocab)
    if n_vocab > max(IMAGE_TOKENS):  # the image tokens of the real vocab, at ids the tiny one leaves unused
        cut = [_image_tokens(kv) for kv in cut]
    write_tokenizer(writer, cut)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _image_tokens(kv):
    """A tokenizer.* key of the cut vocab with <unused0..2> renamed to the image tokens, as control tokens."""
    key, value, *types = kv
    if key == "tokenizer.ggml.tokens":
        value = [IMAGE_TOKENS.get(i, t) for i, t in enumerate(value)]
    elif key == "tokenizer.ggml.token_type":
        value = [3 if i in IMAGE_TOKENS else t for i, t in enumerate(value)]
    return (key, value, *types)
