"""`dglocal convert --lora PEFT_DIR out.gguf`: a PEFT LoRA adapter of a DiffusionGemma checkpoint as a llama.cpp
adapter GGUF (general.type "adapter", tensors `<weight>.lora_a` / `.lora_b`).

The file acts as the adapter merged into the checkpoint does (PEFT's merge_and_unload, then a conversion):
- PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA, per-module alpha and rank patterns) is folded into
  lora_b and the file's alpha is 0, so llama.cpp multiplies by the adapter scale alone;
- the encoder and the decoder share their layer weights (tied in the checkpoint, one tensor in the GGUF). Where
  PEFT wrapped both copies of a layer with their own A and B, merging adds both deltas into the one weight; the
  file holds them side by side (rank r_enc + r_dec), the same sum. A copy shared by both (the same A and B) is
  written once;
- the decoder's own layers (self-conditioning) map to their own tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from dglocal.errors import ConvertError

from . import schema
from .output import writing
from .source import _read_safetensors_header, read_json

PREFIXES = ("base_model.model.",)
LAYER = re.compile(r"^model\.(decoder|encoder\.language_model)\.layers\.(\d+)\.(.+)$")
GLOBAL = re.compile(r"^model\.(decoder|encoder\.language_model)\.(.+)$")


@dataclass
class LoraResult:
    path: Path
    type: str  # what `dglocal convert` reports: "LoRA adapter, rank N"
    n_tensors: int
    size: int
    notes: list[str]


def gguf_name(module: str) -> str:
    """The GGUF weight a PEFT module name adapts (e.g. model.decoder.layers.3.self_attn.q_proj ->
    blk.3.attn_q.weight); ConvertError for modules the runtime has no single weight for."""
    weight = module + ".weight"
    m = LAYER.match(weight)
    if m:
        for gguf, hf in schema.LAYER_NAMES.items():
            if hf == m[3] and gguf.endswith(".weight"):
                return f"blk.{m[2]}.{gguf}"
    m = GLOBAL.match(weight)
    if m:
        for gguf, hf in schema.GLOBAL_NAMES.items():
            if hf == m[2] and gguf != "token_embd.weight":
                return gguf
    raise ConvertError(f"LoRA on {module} is not supported: only the text layers' linear projections (attention, "
                       "dense MLP, router, self-conditioning) have a weight of their own in the GGUF")


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_config(config: dict, where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{where}: peft_type {config.get('peft_type')!r}: only LoRA adapters convert")
    refused = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out weights", "modules_to_save": "modules_to_save "
               "(whole trained modules are not an adapter)"}
    for key, what in refused.items():
        if config.get(key):
            raise ConvertError(f"{where}: {what} cannot be expressed as a llama.cpp LoRA adapter")
    if config.get("bias", "none") != "none":
        raise ConvertError(f"{where}: bias {config['bias']!r}: trained biases cannot be expressed as a LoRA adapter")


def read_adapter(directory: Path) -> tuple[dict, dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """(adapter_config, GGUF weight name -> [(A, B scaled), ...]) of a PEFT adapter directory."""
    directory = Path(directory)
    config = read_json(directory / "adapter_config.json")
    _check_config(config, directory / "adapter_config.json")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConvertError(f"{directory}: no adapter_model.safetensors (save the adapter with safe_serialization)")
    tensors = _read_safetensors_header(weights)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        for prefix in PREFIXES:
            name = name[len(prefix):] if name.startswith(prefix) else name
        m = re.match(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", name)
        if not m:
            raise ConvertError(f"{weights}: tensor {t.name} is not a LoRA A or B matrix: a whole saved weight "
                               "(modules_to_save, embedding layers) cannot be expressed as an adapter")
        pairs.setdefault(m[1], {})[m[2]] = t.load()
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConvertError(f"{weights}: {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConvertError(f"{weights}: {module}: lora_A {a.shape} and lora_B {b.shape} do not pair")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ConvertError(f"{weights}: {module} has NaN or Inf values")
        entries = out.setdefault(gguf_name(module), [])
        b = b * np.float32(_scaling(config, module, a.shape[0]))
        if not any(np.array_equal(a, a2) and np.array_equal(b, b2) for a2, b2 in entries):  # a shared copy: once
            entries.append((a, b))
    if not out:
        raise ConvertError(f"{weights}: no LoRA tensors")
    return config, out


def convert_lora(directory, output, *, force: bool = False) -> LoraResult:
    output = Path(output)
    if output.exists() and not force:
        raise ConvertError(f"{output}: already exists (use --force to overwrite)")
    config, weights = read_adapter(Path(directory))
    with writing(output) as partial:
        w = GGUFWriter(partial, schema.ARCH)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 0.0)  # the scaling is in lora_b: llama.cpp applies the scale alone
        w.add_name(str(config.get("base_model_name_or_path") or Path(directory).name))
        rank = 0
        for name, entries in weights.items():
            a = np.concatenate([a for a, _ in entries], axis=0).astype(np.float32)
            b = np.concatenate([b for _, b in entries], axis=1).astype(np.float32)
            rank = max(rank, a.shape[0])
            w.add_tensor(name + ".lora_a", a)
            w.add_tensor(name + ".lora_b", b)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    both = sum(len(e) > 1 for e in weights.values())
    notes = [f"{both} weight(s) adapted in both the encoder's and the decoder's copy: their deltas add up, as "
             "when the adapter is merged"] if both else []
    return LoraResult(output, f"LoRA adapter, rank {rank}", 2 * len(weights), output.stat().st_size, notes)
