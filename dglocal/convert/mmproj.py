"""The vision tower and its projector -> an mmproj GGUF in the schema of llama.cpp's `gemma4v` projector.

The names, layouts and type rules are those llama.cpp's own converter writes for Gemma 4 (`--mmproj`), so a
community Gemma 4 mmproj file and ours are read by the same loader. One key is added: `clip.use_gelu`, because
the tower's MLP is tanh GELU (`gelu_pytorch_tanh`) and the loader's default for a file without the key is
gelu_quick (the patched loader also reads a Gemma 4 file without it as tanh GELU).

    HF (model.encoder.)                                   GGUF
    vision_tower.patch_embedder.input_proj.weight [D, P*P*3]  v.patch_embd.weight [P, P, 3, D] (a conv kernel)
    vision_tower.patch_embedder.position_embedding_table      v.position_embd.weight [D, S, 2]
    vision_tower.encoder.layers.N.*                           v.blk.N.*
    vision_tower.std_bias / std_scale                         v.std_bias / v.std_scale
    embed_vision.embedding_projection.weight                  mm.input_projection.weight
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

from dglocal.errors import ConvertError

from .source import index_safetensors, read_json, resolve_source
from .output import DIRECT_TYPES, encode_rows, writing

TOWER = "model.encoder.vision_tower."
EMBEDDER = "model.encoder.embed_vision.embedding_projection.weight"

LAYER_NAMES = {
    "self_attn.q_proj":          "attn_q",
    "self_attn.k_proj":          "attn_k",
    "self_attn.v_proj":          "attn_v",
    "self_attn.o_proj":          "attn_out",
    "mlp.gate_proj":             "ffn_gate",
    "mlp.up_proj":               "ffn_up",
    "mlp.down_proj":             "ffn_down",
}
LAYER_NORMS = {
    "self_attn.q_norm.weight":             "attn_q_norm.weight",
    "self_attn.k_norm.weight":             "attn_k_norm.weight",
    "input_layernorm.weight":              "ln1.weight",
    "post_attention_layernorm.weight":     "attn_post_norm.weight",
    "pre_feedforward_layernorm.weight":    "ln2.weight",
    "post_feedforward_layernorm.weight":   "ffn_post_norm.weight",
}
CLAMPS = ("input_min", "input_max", "output_min", "output_max")


@dataclass(frozen=True)
class VisionParams:
    hidden: int
    ff: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    patch: int
    pooling: int
    positions: int
    eps: float
    text_hidden: int
    standardize: bool
    clipped: bool


def has_tower(directory: Path) -> bool:
    return any(n.startswith(TOWER) for n in index_safetensors(directory))


def read_vision(directory: Path) -> VisionParams:
    """The vision config, checked against what llama.cpp's gemma4v graph computes; ConvertError names the key."""
    path = directory / "config.json"
    config = read_json(path)
    vision, text = config.get("vision_config"), config.get("text_config")
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ConvertError(f"{path}: no vision_config (the checkpoint has no vision tower)")

    def get(key, default=None):
        value = vision.get(key, default)
        if value is None:
            raise ConvertError(f"{path}: vision_config.{key} is missing")
        return value

    act = vision.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConvertError(f"{path}: vision_config.hidden_activation {act!r}: the gemma4v graph runs gelu_pytorch_tanh")
    rope = vision.get("rope_parameters") or {}
    theta = rope.get("rope_theta", 100.0) if isinstance(rope, dict) else None
    if theta != 100.0:
        raise ConvertError(f"{path}: vision rope_theta {theta!r}: llama.cpp's gemma4v graph has 100 built in")
    heads = int(get("num_attention_heads"))
    p = VisionParams(
        hidden=int(get("hidden_size")), ff=int(get("intermediate_size")), layers=int(get("num_hidden_layers")),
        heads=heads, kv_heads=int(vision.get("num_key_value_heads") or heads), head_dim=int(get("head_dim")),
        patch=int(get("patch_size")), pooling=int(get("pooling_kernel_size")),
        positions=int(get("position_embedding_size")), eps=float(vision.get("rms_norm_eps", 1e-6)),
        text_hidden=int(text.get("hidden_size") or 0), standardize=bool(vision.get("standardize", False)),
        clipped=bool(vision.get("use_clipped_linears", False)))
    if p.head_dim % 4:
        raise ConvertError(f"{path}: vision head_dim {p.head_dim} must be a multiple of 4 (2-D rotary halves)")
    return p


def tensor_plan(p: VisionParams, names: set[str]) -> list[tuple[str, str, str]]:
    """(GGUF name, HF name, kind) of every tensor: kind "patch", "f32" (kept in f32) or "w" (the file's type)."""
    plan = [("v.patch_embd.weight", TOWER + "patch_embedder.input_proj.weight", "patch"),
            ("v.position_embd.weight", TOWER + "patch_embedder.position_embedding_table", "f32")]
    for i in range(p.layers):
        hf, gg = f"{TOWER}encoder.layers.{i}.", f"v.blk.{i}."
        for src, dst in LAYER_NAMES.items():
            plan.append((gg + dst + ".weight", hf + src + ".linear.weight", "w"))
            # clipped linears: the clamp bounds, scalars the loader reads from the file (F32 [1])
            plan += [(f"{gg}{dst}.{c}", f"{hf}{src}.{c}", "f32") for c in CLAMPS if f"{hf}{src}.{c}" in names]
        plan += [(gg + dst, hf + src, "f32") for src, dst in LAYER_NORMS.items()]
    if p.standardize:
        plan += [("v.std_bias", TOWER + "std_bias", "f32"), ("v.std_scale", TOWER + "std_scale", "f32")]
    plan.append(("mm.input_projection.weight", EMBEDDER, "w"))
    return plan


def _gguf_shape(kind: str, shape, p: VisionParams) -> tuple[int, ...]:
    if kind == "patch":
        if tuple(shape) != (p.hidden, p.patch * p.patch * 3):
            raise ConvertError(f"the patch embedding has shape {list(shape)}, the config implies "
                               f"{[p.hidden, p.patch * p.patch * 3]}")
        return (p.hidden, 3, p.patch, p.patch)
    return tuple(shape) or (1,)


def _gguf_array(kind: str, data: np.ndarray, p: VisionParams) -> np.ndarray:
    if kind == "patch":  # [D, (py, px, c)] -> a conv kernel [D, c, py, px] (ggml [P, P, 3, D])
        return np.ascontiguousarray(data.reshape(p.hidden, p.patch, p.patch, 3).transpose(0, 3, 1, 2))
    return data.reshape(1) if data.ndim == 0 else data


def _type_of(kind: str, shape, type_name: str) -> Q:
    if kind == "f32" or len(shape) == 1:
        return Q.F32
    if kind == "patch":  # llama.cpp's rule: f16 only in an f16 file
        return Q.F16 if type_name == "f16" else Q.F32
    qtype = DIRECT_TYPES[type_name][0]
    block = quants.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16  # rows a block does not divide: f16, as llama.cpp falls back


def default_path(model_output: Path) -> Path:
    """Where `dglocal convert` puts the mmproj of a model file: beside it, named as llama.cpp's files are."""
    return model_output.with_name(f"mmproj-{model_output.stem}.gguf")


def convert_mmproj(source, output, type: str = "f16", *, force: bool = False) -> Path:
    """Write the checkpoint's vision tower and projector as an mmproj GGUF at `output` (OUT.partial, renamed at the
    end; nothing left behind on failure)."""
    output = Path(output)
    type = type.lower()
    if type not in DIRECT_TYPES:  # the quant choices llama.cpp's converter offers for mmproj files
        raise ConvertError(f"mmproj type {type!r}: one of {', '.join(DIRECT_TYPES)}")
    if output.exists() and not force:
        raise ConvertError(f"{output}: already exists (use --force to overwrite)")
    directory = resolve_source(source)
    p = read_vision(directory)
    index = index_safetensors(directory)
    plan = tensor_plan(p, set(index))
    for gg, hf, _ in plan:
        if hf not in index:
            raise ConvertError(f"checkpoint is missing tensor {hf} (for {gg})")
    embd = index[EMBEDDER].shape
    if tuple(embd) != (p.text_hidden, p.hidden):
        raise ConvertError(f"{EMBEDDER} has shape {list(embd)}, the configs imply {[p.text_hidden, p.hidden]}")
    with writing(output) as partial:
        _write(partial, plan, index, p, type, str(source).rstrip("/").split("/")[-1])
    return output


def _write(path: Path, plan, index, p: VisionParams, type_name: str, name: str) -> None:
    w = GGUFWriter(path, "clip")
    w.add_type("mmproj")
    w.add_name(name)
    w.add_file_type(int(DIRECT_TYPES[type_name][1]))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_string("clip.vision.projector_type", "gemma4v")
    w.add_bool("clip.use_gelu", True)
    v = "clip.vision."
    w.add_uint32(v + "image_size", 224)  # unused by gemma4v (its images have a dynamic size); required
    w.add_uint32(v + "patch_size", p.patch)
    w.add_uint32(v + "embedding_length", p.hidden)
    w.add_uint32(v + "feed_forward_length", p.ff)
    w.add_uint32(v + "block_count", p.layers)
    w.add_uint32(v + "projection_dim", p.text_hidden)
    w.add_uint32(v + "attention.head_count", p.heads)
    w.add_uint32(v + "attention.head_count_kv", p.kv_heads)
    w.add_uint32(v + "attention.head_dim", p.head_dim)
    w.add_float32(v + "attention.layer_norm_epsilon", p.eps)
    w.add_uint32(v + "projector.scale_factor", p.pooling)
    # the reference rescales pixels to [0, 1] and does not normalise; the graph maps them to [-1, 1]
    w.add_array(v + "image_mean", [0.0, 0.0, 0.0])
    w.add_array(v + "image_std", [1.0, 1.0, 1.0])

    qtypes = []
    for gg, hf, kind in plan:  # the table first, from the shapes; then one tensor in memory at a time
        shape = _gguf_shape(kind, index[hf].shape, p)
        qtypes.append(_type_of(kind, shape, type_name))
        w.add_tensor_info(gg, shape, np.dtype(np.float32),
                          int(np.prod(quants.quant_shape_to_byte_shape(shape, qtypes[-1]))), raw_dtype=qtypes[-1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for (gg, hf, kind), qtype in zip(plan, qtypes):
        data = _gguf_array(kind, index[hf].load(), p)
        if not np.all(np.isfinite(data)):
            raise ConvertError(f"{index[hf].file.name}: tensor {hf} has NaN or Inf values")
        w.write_padding(fout, fout.tell())
        start = fout.tell()
        encode_rows(data.reshape(-1, data.shape[-1]), qtype).tofile(fout)
        w.write_padding(fout, fout.tell() - start)
    w.close()

