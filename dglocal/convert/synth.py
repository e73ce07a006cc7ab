"""`synth()`: random-weight diffusion-gemma GGUFs with the real model's names, shapes, keys and tokenizer.

For measuring speed where the real weights are not at hand (`dglocal synth`, then `dglocal bench`).

- Hyperparameters and tokenizer: the vocab-only Gemma 4 GGUF of the pinned sdist (the 26B-A4B's, docs/gguf.md)
  plus what it lacks (canvas 256, proportional RoPE 0.25, reference generation defaults); the smaller
  presets scale the widths and layer count down and keep the real 262144-token vocabulary.
- Tensor table: `convert.schema.tensor_plan`, the converter's own; values: matrices ~N(0, 1/fan_in), norms,
  scales and layer scalars ~U(0.8, 1.2), rope_freqs as the converter makes them.
- Bounded memory, about disk speed: each matrix gets a pool of POOL_ROWS random rows, encoded once; the file is
  then written from random picks of the pool's *blocks* (a quant block, or 32 floats, decodes the same wherever
  it sits in a row), so every row differs and nothing full-size is ever computed or held.
- llama.cpp quant types (q4_k_m, ...): the pools come from a *probe* GGUF with the same names and metadata but
  POOL_ROWS rows per matrix, quantized by llama.cpp's own `llama_model_quantize`. The per-tensor type it picks
  reads the name, row width, layer, hyperparameters and ftype, never the row count (src/llama-quant.cpp), so
  the probe's types are the types a full-size quantization gives (tests/test_synth_bench.py checks this).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as Q

from . import schema
from .source import TextParams, generation_defaults
from .tokenizer import write_tokenizer
from .output import DIRECT_TYPES, encode_rows, writing
from .writer import Progress, check_loadable, file_type, quantize_gguf
from dglocal.errors import ConvertError
from dglocal.runtime.gguf import read_header

POOL_ROWS = 32            # random rows encoded per matrix (at least); the output is drawn from their blocks
POOL_BLOCKS = 512
CHUNK_BYTES = 64 << 20    # output bytes per write: bounds peak memory whatever the tensor size
EOS_IDS = [1, 106, 50]    # the real checkpoint's EOS set (docs/gguf.md)

# Scaled-down presets: TextParams overrides of the 26B-A4B, plus kv heads as (sliding, full) layers. Widths keep
# the 26B's divisibility (hidden a multiple of 256; ffn and expert widths not), so llama.cpp picks the same
# kind of type mix; 16 and 4 experts avoid llama-quant's 8-expert special case.
PRESETS = {
    "26b-a4b": {},
    "small": dict(hidden_size=256, intermediate_size=192, num_hidden_layers=6, num_attention_heads=4, head_dim=128,
                  global_head_dim=256, kv_heads=(2, 1), num_experts=16, top_k_experts=4, moe_intermediate_size=64),
    "tiny": dict(hidden_size=256, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, head_dim=64,
                 global_head_dim=128, kv_heads=(1, 1), num_experts=4, top_k_experts=2, moe_intermediate_size=64,
                 canvas_length=32),
}


@dataclass
class SynthResult:
    path: Path
    preset: str
    type: str
    n_tensors: int
    n_params: int
    size: int                       # bytes of the output file
    seconds: float
    quant_mix: dict[str, int]       # GGML type name -> number of tensors
    notes: list[str] = dataclasses.field(default_factory=list)  # one-line messages for the user


def vocab_path() -> Path:
    """The vocab-only Gemma 4 GGUF (real tokenizer, 26B-A4B hyperparameters); DGLOCAL_VOCAB_GGUF overrides."""
    from dglocal.runtime.upstream import VOCAB_GEMMA4, sdist_file

    return Path(os.environ.get("DGLOCAL_VOCAB_GGUF") or sdist_file(VOCAB_GEMMA4))


def params_from_vocab(kv: dict) -> TextParams:
    """26B-A4B TextParams from the vocab GGUF's `gemma4.*` keys; what the file lacks from docs/model.md."""
    arch = kv["general.architecture"]
    g = lambda key: kv[f"{arch}.{key}"]  # noqa: E731
    swa = [bool(s) for s in g("attention.sliding_window_pattern")]
    head_dim_swa = int(g("attention.key_length_swa"))
    return TextParams(
        vocab_size=len(kv["tokenizer.ggml.tokens"]),
        hidden_size=int(g("embedding_length")),
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=int(g("attention.head_count")),
        layer_types=tuple("sliding_attention" if s else "full_attention" for s in swa),
        head_count_kv=tuple(int(n) for n in g("attention.head_count_kv")),
        head_dim=head_dim_swa,
        global_head_dim=int(g("attention.key_length")),
        sliding_window=int(g("attention.sliding_window")),
        rope_theta=float(g("rope.freq_base")),
        rope_theta_swa=float(g("rope.freq_base_swa")),
        partial_rotary_factor=0.25,  # proportional RoPE on full layers: not in the vocab file
        partial_rotary_factor_swa=int(g("rope.dimension_count_swa")) / head_dim_swa,
        num_experts=int(g("expert_count")),
        top_k_experts=int(g("expert_used_count")),
        moe_intermediate_size=int(g("expert_feed_forward_length")),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        final_logit_softcapping=float(g("final_logit_softcapping")),
        max_position_embeddings=int(g("context_length")),
        canvas_length=256,
    )


def preset_params(preset: str, vocab_kv: dict | None = None) -> TextParams:
    """TextParams of a preset: the 26B-A4B's, scaled down for `small` / `tiny`."""
    if preset not in PRESETS:
        raise ConvertError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = params_from_vocab(vocab_kv if vocab_kv is not None else read_header(vocab_path()).kv)
    over = dict(PRESETS[preset])
    if not over:
        return base
    kv_swa, kv_full = over.pop("kv_heads")
    n = over["num_hidden_layers"]
    period = min(6, n)  # the 26B's pattern (every 6th layer full), at least one full layer
    types = tuple("full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n))
    kv = tuple(kv_swa if t == "sliding_attention" else kv_full for t in types)
    return dataclasses.replace(base, layer_types=types, head_count_kv=kv, **over)


def synth(preset: str, type: str, output, *, seed: int = 0, force: bool = False,
          progress: Progress | None = None, shapes_only: bool = False) -> SynthResult:
    """Write a random-weight diffusion-gemma GGUF of `preset` in `type` (f32, f16, bf16, q8_0, q4_k_m, ...).
    shapes_only: the same header and tensor table (llama.cpp's type mix included) over a sparse, zero-filled data
    section: seconds to write, no disk, for what reads only shapes (`bench --roofline`, memory plans)."""
    header = read_header(vocab_path())  # read once: 262144 tokens and 514906 merges take a second or two
    return write_synthetic(preset_params(preset, header.kv), type, output, name=preset, header=header, seed=seed,
                           force=force, progress=progress, shapes_only=shapes_only)


def write_synthetic(params: TextParams, type: str, output, *, name: str, header=None, seed: int = 0,
                    force: bool = False, progress: Progress | None = None, shapes_only: bool = False) -> SynthResult:
    """synth() for any TextParams (a checkpoint's config.json, for `convert --dry-run --vram`), with the packaged
    Gemma 4 tokenizer, whose size params.vocab_size must be."""
    t0 = time.perf_counter()
    output = Path(output)
    type = type.lower()
    ftype = file_type(type)  # ConvertError on an unknown name
    if output.exists() and not force:
        raise ConvertError(f"{output}: already exists (use --force to overwrite)")
    header = header or read_header(vocab_path())
    tok = [(k, v, *header.kv_types[k]) for k, v in header.kv.items() if k.startswith("tokenizer.")]
    tok = cut_tokenizer(tok, params.vocab_size)
    gen = {**generation_defaults(), "eos_token_id": EOS_IDS}
    plan = schema.tensor_plan(params)
    gguf_name = f"dglocal-synth-{name}"

    probe_dir = output.with_name(output.name + ".probe.partial")
    try:
        with writing(output) as partial:
            if type in DIRECT_TYPES:
                base = DIRECT_TYPES[type][0]
                types = {t.name: schema.tensor_type(t, base) for t in plan}
                pools = _DirectPools(types, seed)
            else:
                pools = _ProbePools(plan, params, gen, type, seed, probe_dir)
                types = pools.types
            _write(partial, plan, types, pools, params, gen, tok, gguf_name, int(ftype), name, seed, progress,
                   shapes_only)
            check_loadable(partial, output)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    n_params = sum(int(np.prod(t.shape)) for t in plan)
    mix = dict(Counter(q.name for q in types.values()))
    notes = [f"{name}: {n_params / 1e9:.2f}B parameters, random weights (for dglocal bench, not for text)",
             "tensor types: " + ", ".join(f"{k} {v}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1]))]
    return SynthResult(output, name, type, len(plan), n_params, output.stat().st_size,
                       time.perf_counter() - t0, mix, notes)


def cut_tokenizer(tok: list, n_vocab: int) -> list:
    """The packaged tokenizer's (key, value, types...) entries for a vocabulary of its first n_vocab tokens:
    merges kept where both halves and their concatenation remain."""
    kv = {e[0]: e[1] for e in tok}
    tokens = kv["tokenizer.ggml.tokens"]
    if n_vocab == len(tokens):
        return tok
    if n_vocab > len(tokens):
        raise ConvertError(f"vocab_size {n_vocab}: the packaged Gemma 4 tokenizer has only {len(tokens)} tokens")
    known = set(tokens[:n_vocab])
    merges = [m for m in kv.get("tokenizer.ggml.merges", [])
              if len(parts := m.split(" ", 1)) == 2
              and parts[0] in known and parts[1] in known and parts[0] + parts[1] in known]
    per_token = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    out = []
    for k, v, *types in tok:
        v = v[:n_vocab] if k in per_token else merges if k == "tokenizer.ggml.merges" else v
        if k.endswith("_token_id") and v >= n_vocab:
            continue  # a special token the cut vocabulary does not have
        out.append((k, v, *types))
    return out


# -- values -----------------------------------------------------------------------------------------------------

def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _small_values(t: schema.PlannedTensor, rng: np.random.Generator) -> np.ndarray:
    """A tensor kept F32 whatever the type (vectors, layer scalars, the router), drawn in full."""
    if t.make is not None:
        return t.make().astype(np.float32)
    if len(t.shape) == 1:  # norms, router scale, per_expert_scale, layer scalars: ~1
        return rng.uniform(0.8, 1.2, t.shape).astype(np.float32)
    return _matrix_rows(rng, int(np.prod(t.shape[:-1])), t.shape[-1]).reshape(t.shape)


def _matrix_rows(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    # ggml rows run over the input dimension: fan_in = width, so each output has unit variance
    return (rng.standard_normal((rows, width), dtype=np.float32) * np.float32(width ** -0.5))


def _pool_rows(t: schema.PlannedTensor) -> int:
    # at least POOL_BLOCKS blocks of 256 values, so narrow rows (few blocks each) still never repeat
    rows, width = int(np.prod(t.shape[:-1])), t.shape[-1]
    r = min(rows, max(POOL_ROWS, -(-POOL_BLOCKS * 256 // width)))
    return max(2, r - r % 2) if len(t.shape) == 3 else r  # 3-D probes keep two experts (ne[2] > 1)


class _DirectPools:
    """Pools encoded here with gguf-py (f32, f16, bf16, q8_0), as the converter encodes them."""

    def __init__(self, types: dict[str, Q], seed: int):
        self.types, self.seed = types, seed

    def pool(self, index: int, t: schema.PlannedTensor) -> np.ndarray:
        rows = _matrix_rows(_rng(self.seed, index), _pool_rows(t), t.shape[-1])
        return encode_rows(rows, self.types[t.name]).view(np.uint8).reshape(len(rows), -1)


class _ProbePools:
    """Pools and per-tensor types from llama.cpp's quantizer, run on a POOL_ROWS-row probe of the model."""

    def __init__(self, plan, params: TextParams, gen: dict, type_name: str, seed: int, directory: Path):
        directory.mkdir(exist_ok=True)
        src, dst = directory / "probe-f32.gguf", directory / f"probe-{type_name}.gguf"
        w = GGUFWriter(src, schema.ARCH)
        schema.write_metadata(w, params, gen, name="probe", file_type=int(LlamaFileType.ALL_F32))
        shapes = {}
        for t in plan:
            shape = t.shape if t.keep_f32 else _probe_shape(t)
            shapes[t.name] = shape
            w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4, raw_dtype=Q.F32)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        for i, t in enumerate(plan):
            w.write_padding(fout, fout.tell())
            rng = _rng(seed, i)
            data = _small_values(t, rng) if t.keep_f32 else _matrix_rows(rng, _pool_rows(t), t.shape[-1])
            data.astype(np.float32).tofile(fout)
            w.write_padding(fout, data.nbytes)
        w.close()
        try:
            quantize_gguf(src, dst, type_name)
        except ConvertError as e:
            raise ConvertError(f"{e}; llama.cpp's {type_name} may need an importance matrix, which random "
                               "weights do not have: pick another type") from None
        header = read_header(dst)
        self.types = {ti.name: ti.type for ti in header.tensors}
        self._tensors = {ti.name: ti for ti in header.tensors}
        self._path = dst
        missing = sorted({t.name for t in plan} - set(self.types))
        if missing:
            raise ConvertError(f"llama.cpp's quantizer dropped tensors {missing[:3]}...")

    def pool(self, index: int, t: schema.PlannedTensor) -> np.ndarray:
        ti = self._tensors[t.name]
        raw = np.fromfile(self._path, dtype=np.uint8, count=ti.nbytes, offset=ti.offset)
        return raw.reshape(_pool_rows(t), -1)


def _probe_shape(t: schema.PlannedTensor) -> tuple[int, ...]:
    r = _pool_rows(t)
    return (2, r // 2, t.shape[-1]) if len(t.shape) == 3 else (r, t.shape[-1])


# -- writing ----------------------------------------------------------------------------------------------------

def _block_unit(qtype: Q, width: int) -> tuple[int, int]:
    """(elements, bytes) of the unit a row is assembled from: a quant block, or 32 floats."""
    block, size = GGML_QUANT_SIZES[qtype]
    unit = block if block > 1 else (32 if width % 32 == 0 else width)
    return unit, unit // block * size


def _write_matrix(fout, pool: np.ndarray, t: schema.PlannedTensor, qtype: Q, rng: np.random.Generator,
                  report) -> None:
    rows, width = int(np.prod(t.shape[:-1])), t.shape[-1]
    unit, unit_bytes = _block_unit(qtype, width)
    per_row = width // unit
    blocks = np.ascontiguousarray(pool).reshape(-1, unit_bytes)
    row_bytes = per_row * unit_bytes
    if pool.shape[1] != row_bytes:
        raise ConvertError(f"{t.name}: pool rows of {pool.shape[1]} bytes, {qtype.name} rows need {row_bytes}")
    step = max(1, CHUNK_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        pick = rng.integers(0, len(blocks), size=n * per_row)
        blocks[pick].tofile(fout)  # every row a fresh draw of blocks: no two rows alike, no ties in the LM head
        report(n * row_bytes)


def _write(path: Path, plan, types: dict[str, Q], pools, params: TextParams, gen: dict, tok, name: str,
           ftype: int, preset: str, seed: int, progress: Progress | None, shapes_only: bool = False) -> None:
    w = GGUFWriter(path, schema.ARCH)
    schema.write_metadata(w, params, gen, name=name, file_type=ftype)
    write_tokenizer(w, tok)
    w.add_string("dglocal.synth.preset", preset)  # random weights: say so in the file
    w.add_uint32("dglocal.synth.seed", seed)
    if shapes_only:
        w.add_bool("dglocal.synth.shapes_only", True)  # no weights: only what reads shapes may use it
    sizes = {}
    for t in plan:
        q = types[t.name]
        block, size = GGML_QUANT_SIZES[q]
        sizes[t.name] = int(np.prod(t.shape)) // block * size
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), sizes[t.name], raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    fout = w.fout[0]
    total, done = sum(sizes.values()), 0

    def report(n: int, name: str) -> None:
        nonlocal done
        done += n
        if progress:
            progress(name, done, total)

    for i, t in enumerate(plan):
        w.write_padding(fout, fout.tell())
        start = fout.tell()
        q = types[t.name]
        rng = _rng(seed, 1_000_003 + i)
        if shapes_only:
            fout.seek(sizes[t.name], os.SEEK_CUR)  # a hole: zeros that take no disk
            report(sizes[t.name], t.name)
        elif t.keep_f32:
            data = _small_values(t, _rng(seed, i))
            encode_rows(data.reshape(-1, t.shape[-1]), q).tofile(fout)
            report(sizes[t.name], t.name)
        else:
            _write_matrix(fout, pools.pool(i, t), t, q, rng, lambda n: report(n, t.name))
        if fout.tell() - start != sizes[t.name]:
            raise ConvertError(f"{t.name}: wrote {fout.tell() - start} bytes, the tensor table says {sizes[t.name]}")
        w.write_padding(fout, fout.tell() - start)
    fout.truncate(fout.tell())  # the file ends where the last tensor does, even if that is a hole
    w.close()
