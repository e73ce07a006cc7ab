"""`dry_run()` (plan a conversion from config.json alone) and `info()` (summarise any GGUF)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType


from dglocal.runtime import checks, swa
from dglocal.runtime.checks import parse_size
from dglocal.runtime.gguf import read_header
from dglocal.runtime.options import DEFAULT_CTX
from . import schema
from .source import read_generation, read_params, resolve_source
from .output import DIRECT_TYPES
from .writer import file_type

COMPUTE_MARGIN = 512 << 20   # scheduler and activation buffers besides the logits, a rough allowance


@dataclass
class PlannedRow:
    name: str
    shape: tuple[int, ...]      # ggml order
    type: str
    nbytes: int


@dataclass
class DryRun:
    type: str
    tensors: list[PlannedRow]
    weights_bytes: int
    kv_cache_bytes: int          # f16 K and V for `context` tokens
    compute_bytes: int           # canvas logits (f32, twice) + a margin; an estimate
    context: int
    vram_bytes: int | None
    estimated: bool              # True for llama.cpp quant types: the real mix is decided by llama.cpp
    generation: dict = field(default_factory=dict)
    placement: dict | None = None  # with a VRAM size: dglocal.runtime.plan's result for the converted file's shapes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes

    @property
    def fits(self) -> bool | None:
        if self.placement is not None:
            return self.placement["fits"]
        return None if self.vram_bytes is None else self.total_bytes <= self.vram_bytes


def _estimate_type(t: schema.PlannedTensor, type_name: str) -> Q:
    """The GGML type llama.cpp's quantizer is expected to give a tensor (token_embd doubles as the output: Q6_K)."""
    if t.keep_f32:
        return Q.F32
    if t.name == "token_embd.weight":
        return Q.Q6_K
    name = type_name.upper()
    while name:
        if name in Q.__members__:
            return Q[name]
        name = name.rpartition("_")[0]  # q4_k_m -> Q4_K, iq3_xxs -> IQ3_XXS
    return Q.Q4_K


def _nbytes(shape, qtype: Q) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def dry_run(source, type: str = "f16", *, vram=None, context: int = DEFAULT_CTX) -> DryRun:
    """The tensor plan, output size and memory need of a conversion, from config.json alone. With `vram`, the
    memory is what llama.cpp allocates for the file's shapes (a shapes-only GGUF sized by dglocal.runtime.plan, as `dglocal
    plan` does for a finished file) and the placement that fits; without, an estimate."""
    file_type(type)  # validates the name
    directory = resolve_source(source, config_only=True)
    p = read_params(directory)
    direct = type.lower() in DIRECT_TYPES
    rows = []
    for t in schema.tensor_plan(p):
        q = schema.tensor_type(t, DIRECT_TYPES[type.lower()][0]) if direct else _estimate_type(t, type)
        rows.append(PlannedRow(t.name, t.ggml_shape, q.name, _nbytes(t.shape, q)))

    kv = 0
    for il in range(p.num_hidden_layers):  # sliding layers keep a window (+ one canvas) of keys
        n = min(context, p.sliding_window + p.canvas_length) if p.is_swa(il) else context
        kv += 2 * n * p.head_count_kv[il] * p.head_dim_of(il) * 2
    compute = 2 * p.canvas_length * p.vocab_size * 4 + COMPUTE_MARGIN
    result = DryRun(type.lower(), rows, sum(r.nbytes for r in rows), kv, compute, context,
                    None if vram is None else parse_size(vram), not direct, read_generation(directory))
    if vram is not None:
        result.placement = _placement(p, type, result.vram_bytes, context, name=str(source))
        c = result.placement["choice"]
        result.kv_cache_bytes = c["device"]["context"] + c["host"]["context"]
        result.compute_bytes = c["device"]["compute"] + c["host"]["compute"]
    return result


def _placement(params, type: str, vram: int, context: int, *, name: str) -> dict:
    """dglocal.runtime.plan on a shapes-only GGUF of these params in `type`, written to a temporary directory."""
    import tempfile
    from pathlib import Path

    from dglocal.runtime import plan

    from . import synth

    with tempfile.TemporaryDirectory(prefix="dglocal-dry-run-") as d:
        path = Path(d) / f"shapes-{type.lower()}.gguf"
        synth.write_synthetic(params, type, path, name="dry-run", shapes_only=True)
        result = plan.plan(path, vram, n_ctx=context)
    result["model"] = name
    return result


@dataclass
class ModelInfo:
    path: str
    file_size: int
    architecture: str
    name: str | None
    file_type: str | None
    n_tensors: int
    n_params: int
    quant_mix: dict[str, dict[str, int]]       # type -> {"tensors": n, "bytes": b}
    hparams: dict[str, object]                 # arch-prefixed keys, prefix dropped
    diffusion: dict[str, object]               # diffusion.* keys, prefix dropped
    tokenizer: dict[str, object]
    kv_cache: str = ""                         # the sliding layers' cache by default, in words


def info(path) -> ModelInfo:
    """Summarise a GGUF (dglocal's or a community file) from its header alone."""
    h = read_header(path)
    arch = h.get("general.architecture", "?")
    if arch == "diffusion-gemma":
        # what the runtime refuses on sight, info reports as broken too; the hyperparameters are the load's to check
        checks.model_file(path, h, loadable=False)
    counts, sizes = Counter(), Counter()
    for t in h.tensors:
        name = getattr(t.type, "name", f"type {t.type}")
        counts[name] += 1
        sizes[name] += t.nbytes or 0
    ft = h.get("general.file_type")
    try:
        ft_name = LlamaFileType(ft).name if ft is not None else None
    except ValueError:
        ft_name = str(ft)
    tokens = h.get("tokenizer.ggml.tokens") or []
    template = h.get("tokenizer.chat_template")
    tokenizer = {
        "model": h.get("tokenizer.ggml.model"),
        "n_tokens": len(tokens),
        "n_merges": len(h.get("tokenizer.ggml.merges") or []),
        **{k: h.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "mask")},
        "chat_template_chars": len(template) if template else 0,
    }
    return ModelInfo(
        path=str(path), file_size=h.file_size, architecture=arch, name=h.get("general.name"),
        file_type=ft_name, n_tensors=len(h.tensors), n_params=sum(t.n_elements for t in h.tensors),
        quant_mix={k: {"tensors": counts[k], "bytes": sizes[k]} for k in sorted(counts, key=lambda k: -sizes[k])},
        hparams={k[len(arch) + 1:]: v for k, v in h.kv.items() if k.startswith(arch + ".")},
        diffusion={k[len("diffusion."):]: v for k, v in h.kv.items() if k.startswith("diffusion.")},
        tokenizer=tokenizer,
        kv_cache=swa.default_in_words(swa.sliding_window(h.kv)) if arch == "diffusion-gemma" else "",
    )
