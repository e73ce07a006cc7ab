"""The HF side: locate a checkpoint, read its two config files, and mmap its safetensors shards.

Configs are read as plain JSON (no transformers needed) and normalised into `TextParams`; both
config.json forms are accepted: `global_head_dim` + `num_global_key_value_heads` (published
checkpoint) or a `per_layer_config` block (transformers 5.23 save_pretrained).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dglocal.errors import ConfigError, ConvertError
from dglocal.generation.config import GGUF_KEYS, GenerationConfig
from dglocal.runtime.checks import integer, is_integer

MODEL_TYPE = "diffusion_gemma"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]


def generation_defaults() -> dict:
    """The sampler settings a file records (generation.config.GGUF_KEYS), at the reference's defaults
    (GenerationConfig, the one place they are written)."""
    return {k: getattr(GenerationConfig, k) for k in GGUF_KEYS}


@dataclass(frozen=True)
class TextParams:
    """Hyperparameters of the text model, the names as in DiffusionGemmaTextConfig where it has them."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_types: tuple[str, ...]
    head_count_kv: tuple[int, ...]      # per layer
    head_dim: int                       # sliding layers
    global_head_dim: int                # full layers
    sliding_window: int
    rope_theta: float                   # full layers
    rope_theta_swa: float
    partial_rotary_factor: float        # full layers ("proportional")
    partial_rotary_factor_swa: float
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    rms_norm_eps: float
    final_logit_softcapping: float
    max_position_embeddings: int
    canvas_length: int
    # images: (boi, image, eoi) token ids when the checkpoint has a vision tower; whether an image's tokens see
    # each other in the encoder (text_config.use_bidirectional_attention == "vision")
    image_ids: tuple[int, int, int] | None = None
    vision_bidirectional: bool = False

    def is_swa(self, il: int) -> bool:
        return self.layer_types[il] == "sliding_attention"

    def head_dim_of(self, il: int) -> int:
        return self.head_dim if self.is_swa(il) else self.global_head_dim


def resolve_source(source, *, config_only: bool = False) -> Path:
    """A local checkpoint directory, or an HF repo id fetched into the hub cache (HF_HUB_OFFLINE respected)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConvertError(f"{source}: not a checkpoint directory")
    if str(source).count("/") != 1:
        raise ConvertError(f"{source}: no such directory, and not an HF repo id (owner/name)")
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "generation_config.json"]
    if not config_only:
        patterns += ["*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(str(source), allow_patterns=patterns))
    except Exception as e:  # hub errors are many classes; the message is what the user needs
        raise ConvertError(f"{source}: download failed: {e}") from e


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path}: missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable ({e})") from e
    except RecursionError:
        raise ConvertError(f"{path}: nested too deeply to be a checkpoint's JSON") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: must be a JSON object, got a JSON {type(data).__name__}")
    return data


def _checked(path: Path, key: str, value, kind, low, high):
    """`value` as `kind` (int or float) in [low, high]; ConvertError names the key and the value otherwise."""
    if kind is int:
        return integer(f"{path}: {key}", value, low, high, ConvertError)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ConvertError(f"{path}: {key} must be a number in {low}..{high}, got {value!r}")
    return float(value)


def read_params(directory: Path) -> TextParams:
    """Normalise config.json (either form) into TextParams; ConvertError names the key at fault."""
    path = directory / "config.json"
    config = read_json(path)
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise ConvertError(f"{path}: model_type is {model_type!r}, expected {MODEL_TYPE!r}")
    text = config.get("text_config") or {}
    if not isinstance(text, dict):
        raise ConvertError(f"{path}: text_config is not an object")

    def get(key, default=None, kind=int, low=1, high=1 << 24):
        value = text.get(key, default)
        if value is None:
            raise ConvertError(f"{path}: text_config.{key} missing")
        return _checked(path, f"text_config.{key}", value, kind, low, high)

    n_layer = get("num_hidden_layers", high=4096)
    layer_types = text.get("layer_types") or [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layer \
            or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ConvertError(f"{path}: text_config.layer_types does not list {n_layer} sliding/full layers")
    head_dim = get("head_dim", 256)
    n_kv = get("num_key_value_heads", 4)
    per_layer = text.get("per_layer_config")
    if per_layer is None:  # published form; defaults as DiffusionGemmaTextConfig.__post_init__
        full = {"head_dim": text.get("global_head_dim") or 512}
        if text.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = text["num_global_key_value_heads"]
        per_layer = {str(i): full for i, t in enumerate(layer_types) if t == "full_attention"}
    if not isinstance(per_layer, dict) or not all(isinstance(c, dict) for c in per_layer.values()):
        raise ConvertError(f"{path}: text_config.per_layer_config is not an object of objects")
    layer_cfg = [per_layer.get(str(i), per_layer.get(i, {})) for i in range(n_layer)]
    head_dims = [_checked(path, f"per-layer head_dim of layer {i}", c.get("head_dim", head_dim), int, 1, 1 << 16)
                 for i, c in enumerate(layer_cfg)]
    kv_heads = [_checked(path, f"per-layer num_key_value_heads of layer {i}", c.get("num_key_value_heads", n_kv),
                         int, 1, 1 << 16) for i, c in enumerate(layer_cfg)]
    swa_dims = {d for d, t in zip(head_dims, layer_types) if t == "sliding_attention"}
    full_dims = {d for d, t in zip(head_dims, layer_types) if t == "full_attention"}
    if len(swa_dims) > 1 or len(full_dims) != 1:
        raise ConvertError(f"{path}: per-layer head_dim must be one value per layer type, got "
                           f"sliding {sorted(swa_dims)} full {sorted(full_dims)}")
    rope = text.get("rope_parameters") or {}
    rope_full = rope.get("full_attention", {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1_000_000.0}) if isinstance(rope, dict) else None
    rope_swa = rope.get("sliding_attention", {"rope_type": "default", "rope_theta": 10_000.0}) \
        if isinstance(rope, dict) else None
    if not isinstance(rope_full, dict) or not isinstance(rope_swa, dict) \
            or rope_full.get("rope_type") != "proportional" or rope_swa.get("rope_type", "default") != "default":
        raise ConvertError(f"{path}: text_config.rope_parameters: expected proportional (full) and default "
                           f"(sliding) RoPE, got {rope!r:.120}")

    def rope_value(part, name, key, default, low, high):
        return _checked(path, f"text_config.rope_parameters.{name}.{key}", part.get(key, default), float, low, high)

    params = TextParams(
        vocab_size=get("vocab_size", 262_144, high=1 << 24),
        hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=n_layer,
        num_attention_heads=get("num_attention_heads", high=1 << 16),
        layer_types=tuple(layer_types),
        head_count_kv=tuple(kv_heads),
        head_dim=swa_dims.pop() if swa_dims else head_dim,
        global_head_dim=full_dims.pop(),
        sliding_window=get("sliding_window", 512),  # raw JSON: never the halved in-memory value
        rope_theta=rope_value(rope_full, "full_attention", "rope_theta", 1_000_000.0, 1e-3, 1e12),
        rope_theta_swa=rope_value(rope_swa, "sliding_attention", "rope_theta", 10_000.0, 1e-3, 1e12),
        partial_rotary_factor=rope_value(rope_full, "full_attention", "partial_rotary_factor", 1.0, 1e-6, 1.0),
        partial_rotary_factor_swa=rope_value(rope_swa, "sliding_attention", "partial_rotary_factor", 1.0, 1e-6, 1.0),
        num_experts=get("num_experts", high=1 << 16),
        top_k_experts=get("top_k_experts", high=1 << 16),
        moe_intermediate_size=get("moe_intermediate_size"),
        rms_norm_eps=get("rms_norm_eps", 1e-6, float, 0.0, 1.0),
        final_logit_softcapping=get("final_logit_softcapping", 30.0, float, 1e-3, 1e6),
        max_position_embeddings=get("max_position_embeddings", 131_072, high=1 << 31),
        canvas_length=_checked(path, "canvas_length", config.get("canvas_length", 256), int, 1, 65536),
        image_ids=_image_ids(path, config),
        vision_bidirectional=text.get("use_bidirectional_attention") == "vision",
    )
    _check_consistent(path, params)
    return params


def _image_ids(path: Path, config: dict) -> tuple[int, int, int] | None:
    """(boi, image, eoi) ids of a checkpoint with a vision tower (the reference's defaults where absent); None when
    it has none, or when they lie outside its vocabulary: the reference class always has a tower, and a text-only
    model of its own vocabulary (the Sudoku model's 41 tokens) keeps the defaults of the 262k one."""
    if not isinstance(config.get("vision_config"), dict):
        return None
    vocab = (config.get("text_config") or {}).get("vocab_size", 262_144)
    defaults = {"boi_token_id": 255_999, "image_token_id": 258_880, "eoi_token_id": 258_882}
    ids = tuple(_checked(path, k, config.get(k, d), int, 0, 1 << 31) for k, d in defaults.items())
    return ids if max(ids) < vocab else None


def _check_consistent(path: Path, p: TextParams) -> None:
    """What llama.cpp asserts on (or loops on) between values that are each in range."""
    if p.top_k_experts > p.num_experts:
        raise ConvertError(f"{path}: text_config.top_k_experts ({p.top_k_experts}) exceeds num_experts "
                           f"({p.num_experts})")
    swa_rot = int(p.head_dim * p.partial_rotary_factor_swa)
    if swa_rot < 2 or swa_rot % 2:
        raise ConvertError(f"{path}: the sliding layers rotate {swa_rot} of their {p.head_dim} head dimensions "
                           f"(partial_rotary_factor {p.partial_rotary_factor_swa}): RoPE needs an even count >= 2")
    if int(p.global_head_dim * p.partial_rotary_factor / 2) < 1:
        raise ConvertError(f"{path}: the full layers rotate no dimension of their {p.global_head_dim} "
                           f"(partial_rotary_factor {p.partial_rotary_factor})")
    if any(p.num_attention_heads % k for k in p.head_count_kv):
        raise ConvertError(f"{path}: num_attention_heads ({p.num_attention_heads}) is not a multiple of every "
                           f"layer's num_key_value_heads {sorted(set(p.head_count_kv))}")


def read_generation(directory: Path) -> dict:
    """Sampler settings from generation_config.json, reference defaults where absent or null."""
    path = directory / "generation_config.json"
    gen = read_json(path, required=False)
    if not isinstance(gen, dict):
        raise ConvertError(f"{path}: not a JSON object")
    sampler = gen.get("sampler_config") or {}
    if not isinstance(sampler, dict):
        raise ConvertError(f"{path}: sampler_config must be an object, got {type(sampler).__name__}")
    out = {k: gen.get(k) for k in GGUF_KEYS if k != "entropy_bound"}
    out["entropy_bound"] = sampler.get("entropy_bound")
    defaults = generation_defaults()
    out = {k: (defaults[k] if v is None else v) for k, v in out.items()}
    eos = gen.get("eos_token_id")
    if eos is not None and not isinstance(eos, (int, list)) or isinstance(eos, bool):
        raise ConvertError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r:.80}")
    out["eos_token_id"] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not all(is_integer(t) and 0 <= t < 2**31 for t in out["eos_token_id"]):
        raise ConvertError(f"{path}: eos_token_id must be token ids, got {eos!r:.80}")
    try:  # the runtime's own checks: a file it would refuse is not written
        GenerationConfig(**{k: v for k, v in out.items() if k != "eos_token_id"})
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"{path}: {e}") from None
    if out["max_denoising_steps"] >= 2**31 or out["stability_threshold"] >= 2**31:
        raise ConvertError(f"{path}: max_denoising_steps and stability_threshold must be below 2**31")
    return out


# --- safetensors, read by hand so tensors are mmapped one at a time and bf16 needs no torch ----

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str          # safetensors dtype name
    shape: tuple[int, ...]
    start: int          # absolute byte offset
    end: int

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the tensor flattened to 2-D [rows, shape[-1]], as a fresh float32 array.

        A new mmap per call, dropped on return, so pages read never pile up in this process's RSS.
        """
        if self.dtype not in _DTYPES:
            raise ConvertError(f"{self.file}: tensor {self.name} has unsupported dtype {self.dtype}")
        dtype = np.dtype(_DTYPES[self.dtype])
        width = self.shape[-1] if self.shape else 1
        raw = np.memmap(self.file, dtype=dtype, mode="r", offset=self.start + r0 * width * dtype.itemsize,
                        shape=(r1 - r0, width))
        if self.dtype == "BF16":  # bf16 is the top half of an f32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.array(raw, dtype=np.float32)

    def load(self) -> np.ndarray:
        """The whole tensor as float32."""
        return self.rows(0, self.n_rows).reshape(self.shape)


def index_safetensors(directory: Path) -> dict[str, SourceTensor]:
    """Tensor name -> SourceTensor over every shard, from the headers alone (validated against file sizes)."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map") or {}
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise ConvertError(f"{index_path}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{directory}: no *.safetensors files")
    tensors: dict[str, SourceTensor] = {}
    for fname in files:
        tensors.update(_read_safetensors_header(directory / fname))
    return tensors


def _read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    if not path.is_file():
        raise ConvertError(f"{path}: shard missing (listed in model.safetensors.index.json)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _source_tensor(path, name, meta, base, size)
    return out


def _source_tensor(path: Path, name: str, meta, base: int, size: int) -> SourceTensor:
    """One header entry, checked: known dtype, a shape of non-negative ints, a byte range of exactly
    shape x dtype size inside the file (a mismatch would give a runnable file with wrong weights)."""
    where = f"{path}: tensor {name}"
    if not isinstance(meta, dict):
        raise ConvertError(f"{where}: its header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in _DTYPES:
        raise ConvertError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(is_integer(d) and d >= 0 for d in shape):
        raise ConvertError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(is_integer(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ConvertError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    start, end = base + offsets[0], base + offsets[1]
    expected = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPES[dtype]).itemsize
    if end - start != expected:
        raise ConvertError(f"{where}: data_offsets span {end - start} bytes, its shape {shape} of {dtype} needs "
                           f"{expected}")
    if end > size:
        raise ConvertError(f"{path}: truncated: tensor {name} ends at byte {end}, file has {size}")
    return SourceTensor(name, path, dtype, tuple(shape), start, end)
