"""The community `diffusion-gemma` GGUF schema: HF -> GGUF name table, tensor plan, metadata.

Everything is a straight copy: HF stores every matrix as [out, in] (experts [E, out, in]) and
numpy's row-major shape reversed is exactly ggml's ne order llama.cpp's gemma4 loader expects
(attn_q {n_embd, n_head*hd}, ffn_gate_up_exps {n_embd, 2*n_ff_exp, n_expert}, gate rows first as
the reference's `.chunk(2)` reads them). Gemma 4 norms multiply by `weight` (no +1 shift, see
llama.cpp conversion/gemma.py Gemma4Model.norm_shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from dglocal.generation.config import GGUF_KEYS

from .source import TextParams

ARCH = "diffusion-gemma"
DEC = "model.decoder."
ENC = "model.encoder.language_model."

# GGUF name -> HF name (decoder copy; the tied encoder copy and lm_head are the fallbacks).
GLOBAL_NAMES = {
    "token_embd.weight":         "embed_tokens.weight",
    "output_norm.weight":        "norm.weight",
    "self_cond_pre_norm.weight": "self_conditioning.pre_norm.weight",
    "self_cond_gate.weight":     "self_conditioning.gate_proj.weight",
    "self_cond_up.weight":       "self_conditioning.up_proj.weight",
    "self_cond_down.weight":     "self_conditioning.down_proj.weight",
}
LAYER_NAMES = {
    "attn_norm.weight":           "input_layernorm.weight",
    "attn_q.weight":              "self_attn.q_proj.weight",
    "attn_k.weight":              "self_attn.k_proj.weight",
    "attn_v.weight":              "self_attn.v_proj.weight",     # sliding layers only
    "attn_output.weight":         "self_attn.o_proj.weight",
    "attn_q_norm.weight":         "self_attn.q_norm.weight",
    "attn_k_norm.weight":         "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight":            "pre_feedforward_layernorm.weight",
    "ffn_gate.weight":            "mlp.gate_proj.weight",
    "ffn_up.weight":              "mlp.up_proj.weight",
    "ffn_down.weight":            "mlp.down_proj.weight",
    "post_ffw_norm.weight":       "post_feedforward_layernorm.weight",
    "pre_ffw_norm_2.weight":      "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight":     "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight":     "post_feedforward_layernorm_2.weight",
    "ffn_gate_inp.weight":        "router.proj.weight",
    "ffn_gate_inp.scale":         "router.scale",
    "ffn_gate_up_exps.weight":    "experts.gate_up_proj",
    "ffn_down_exps.weight":       "experts.down_proj",
    "ffn_down_exps.scale":        "router.per_expert_scale",
    "layer_output_scale.weight":  "layer_scalar",                 # the decoder's
}
ENC_LAYER_SCALE = "enc_layer_output_scale.weight"                 # the encoder's layer_scalar (a buffer, not tied)

# Tensors that stay F32 whatever the type: 1-D ones, and the router (as llama.cpp's quantizer does).
KEEP_F32 = ("ffn_gate_inp.weight",)


@dataclass(frozen=True)
class PlannedTensor:
    name: str                                   # GGUF name
    shape: tuple[int, ...]                      # numpy order (ggml ne reversed)
    sources: tuple[str, ...] = ()               # HF names, first present wins; () = generated
    make: Callable[[], np.ndarray] | None = None

    @property
    def keep_f32(self) -> bool:
        return len(self.shape) == 1 or self.name.endswith(KEEP_F32) or self.make is not None

    @property
    def ggml_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


def rope_freqs(p: TextParams) -> np.ndarray:
    """Proportional RoPE of the full layers as freq factors: 1 on the rotated pairs, 1e30 (no rotation) after.

    Mirrors llama.cpp Gemma4Model.generate_extra_tensors (rope dimension count = full head dim).
    """
    n_rot = int(p.global_head_dim * p.partial_rotary_factor / 2)
    return np.array([1.0] * n_rot + [1e30] * (p.global_head_dim // 2 - n_rot), dtype=np.float32)


def tensor_plan(p: TextParams) -> list[PlannedTensor]:
    """Every tensor of the output file, its numpy shape and HF source, from the config alone."""
    H, V, F, E, FE = p.hidden_size, p.vocab_size, p.intermediate_size, p.num_experts, p.moe_intermediate_size
    shapes = {
        "token_embd.weight": (V, H), "output_norm.weight": (H,), "self_cond_pre_norm.weight": (H,),
        "self_cond_gate.weight": (F, H), "self_cond_up.weight": (F, H), "self_cond_down.weight": (H, F),
    }
    plan = [PlannedTensor("rope_freqs.weight", (p.global_head_dim // 2,), make=lambda: rope_freqs(p))]
    for gguf_name, hf in GLOBAL_NAMES.items():
        fallbacks = {"embed_tokens.weight": (ENC + hf, "lm_head.weight"), "norm.weight": (ENC + hf,)}
        plan.append(PlannedTensor(gguf_name, shapes[gguf_name], (DEC + hf, *fallbacks.get(hf, ()))))

    for il in range(p.num_hidden_layers):
        hd, n_kv = p.head_dim_of(il), p.head_count_kv[il]
        q, kv = p.num_attention_heads * hd, n_kv * hd
        shapes = {
            "attn_norm.weight": (H,), "attn_q.weight": (q, H), "attn_k.weight": (kv, H),
            "attn_v.weight": (kv, H), "attn_output.weight": (H, q), "attn_q_norm.weight": (hd,),
            "attn_k_norm.weight": (hd,), "post_attention_norm.weight": (H,), "ffn_norm.weight": (H,),
            "ffn_gate.weight": (F, H), "ffn_up.weight": (F, H), "ffn_down.weight": (H, F),
            "post_ffw_norm.weight": (H,), "pre_ffw_norm_2.weight": (H,), "post_ffw_norm_1.weight": (H,),
            "post_ffw_norm_2.weight": (H,), "ffn_gate_inp.weight": (E, H), "ffn_gate_inp.scale": (H,),
            "ffn_gate_up_exps.weight": (E, 2 * FE, H), "ffn_down_exps.weight": (E, H, FE),
            "ffn_down_exps.scale": (E,), "layer_output_scale.weight": (1,),
        }
        for gguf_name, hf in LAYER_NAMES.items():
            if gguf_name == "attn_v.weight" and not p.is_swa(il):
                continue  # full layers have no v_proj: V is the raw k_proj output
            sources = [f"{DEC}layers.{il}.{hf}"]
            if hf != "layer_scalar":  # the encoder's layer_scalar is its own tensor, never a fallback
                sources.append(f"{ENC}layers.{il}.{hf}")
            plan.append(PlannedTensor(f"blk.{il}.{gguf_name}", shapes[gguf_name], tuple(sources)))
        plan.append(PlannedTensor(f"blk.{il}.{ENC_LAYER_SCALE}", (1,), (f"{ENC}layers.{il}.layer_scalar",)))
    return plan


def is_skipped(hf_name: str) -> bool:
    """Source tensors the text-only runtime does not use (the vision tower and its projector)."""
    return ".vision_tower." in hf_name or ".embed_vision." in hf_name


def tensor_type(t: PlannedTensor, base: Q) -> Q:
    """The GGUF type of one tensor for a direct (gguf-py) conversion to `base`."""
    if t.keep_f32 or base == Q.F32:
        return Q.F32
    if base == Q.Q8_0 and t.shape[-1] % 32:  # rows must fill whole q8_0 blocks; llama.cpp falls back likewise
        return Q.F16
    return base


def write_metadata(w: GGUFWriter, p: TextParams, gen: dict, *, name: str, file_type: int) -> None:
    """General, hyperparameter and diffusion keys (the tokenizer is written separately)."""
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(2)

    w.add_block_count(p.num_hidden_layers)
    w.add_context_length(p.max_position_embeddings)
    w.add_embedding_length(p.hidden_size)
    w.add_feed_forward_length(p.intermediate_size)
    w.add_head_count(p.num_attention_heads)
    w.add_head_count_kv(list(p.head_count_kv))
    w.add_key_length(p.global_head_dim)
    w.add_value_length(p.global_head_dim)
    w.add_key_length_swa(p.head_dim)
    w.add_value_length_swa(p.head_dim)
    w.add_rope_freq_base(p.rope_theta)
    w.add_rope_freq_base_swa(p.rope_theta_swa)
    w.add_rope_dimension_count(p.global_head_dim)  # proportional RoPE goes through rope_freqs
    w.add_rope_dimension_count_swa(int(p.head_dim * p.partial_rotary_factor_swa))
    w.add_sliding_window(p.sliding_window)
    w.add_sliding_window_pattern([p.is_swa(il) for il in range(p.num_hidden_layers)])
    w.add_layer_norm_rms_eps(p.rms_norm_eps)
    w.add_expert_count(p.num_experts)
    w.add_expert_used_count(p.top_k_experts)
    w.add_expert_feed_forward_length(p.moe_intermediate_size)
    w.add_final_logit_softcapping(p.final_logit_softcapping)
    w.add_causal_attention(False)
    w.add_shared_kv_layers(0)
    w.add_embedding_length_per_layer_input(0)

    w.add_uint32("diffusion.canvas_length", p.canvas_length)
    for name, (key, kind) in GGUF_KEYS.items():  # the sampler's defaults
        if kind == "uint32":
            w.add_uint32(key, int(gen[name]))
        else:
            w.add_float32(key, float(gen[name]))
    w.add_bool("diffusion.shift_logits", False)
    if p.image_ids:  # dglocal extra: how an image's soft tokens sit in the prompt and attend in the encoder
        for key, value in zip(("boi", "image", "eoi"), p.image_ids):
            w.add_uint32(f"diffusion.{key}_token_id", value)
        w.add_bool("diffusion.vision_bidirectional", p.vision_bidirectional)
    if gen.get("eos_token_id"):  # dglocal extra: the checkpoint's full EOS set (llama.cpp infers EOG from token text)
        w.add_array("diffusion.eos_token_ids", [int(i) for i in gen["eos_token_id"]])
