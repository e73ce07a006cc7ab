"""`convert()`: HF checkpoint -> diffusion-gemma GGUF, streamed one row-chunk at a time.

f32/f16/bf16/q8_0 are encoded here with gguf-py's quants; every other llama.cpp type name goes
through a full-precision temporary GGUF and llama.cpp's own quantizer (`quantize_gguf`), so the
K-quant tensor mix is exactly llama.cpp's. Output is written to `OUT.partial` and renamed at the end
(convert.output.writing).
"""

from __future__ import annotations

import ctypes
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType, quants

from dglocal.errors import BUILD_HINT, BackendError, ConvertError, ModelError
from dglocal.files import remove_quietly

from . import schema
from .mmproj import convert_mmproj, default_path
from .output import DIRECT_TYPES, encode_rows, writing
from .source import SourceTensor, index_safetensors, read_generation, read_params, resolve_source
from .tokenizer import tokenizer_from_files, tokenizer_from_gguf, write_tokenizer

CHUNK_BYTES = 64 << 20  # f32 bytes per chunk: bounds peak RSS whatever the tensor size

Progress = Callable[[str, int, int], None]  # (tensor name, bytes done, bytes total)


@dataclass
class ConvertResult:
    path: Path
    type: str
    n_tensors: int
    size: int                                            # bytes of the output file
    skipped: list[str] = field(default_factory=list)     # source tensors not converted (vision tower)
    notes: list[str] = field(default_factory=list)       # one-line messages for the user


def file_type(type_name: str) -> LlamaFileType:
    """llama.cpp's file type for a type name (`f16`, `q8_0`, `q4_k_m`, ...); ConvertError if unknown."""
    name = type_name.lower()
    if name in DIRECT_TYPES:
        return DIRECT_TYPES[name][1]
    try:
        return LlamaFileType["MOSTLY_" + name.upper()]
    except KeyError:
        known = sorted(DIRECT_TYPES) + sorted(t.name[7:].lower() for t in LlamaFileType if t.name.startswith("MOSTLY_"))
        raise ConvertError(f"unknown type {type_name!r}; known: {', '.join(known)}") from None


def bind_sources(plan, index: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """GGUF name -> the source tensor for it, checking presence and shape."""
    bound = {}
    for t in plan:
        if t.make is not None:
            continue
        src = next((index[n] for n in t.sources if n in index), None)
        if src is None:
            raise ConvertError(f"checkpoint is missing tensor {t.sources[0]} (for {t.name})")
        if tuple(src.shape) != t.shape:
            raise ConvertError(f"{src.file.name}: tensor {src.name} has shape {list(src.shape)}, "
                               f"config.json implies {list(t.shape)}")
        bound[t.name] = src
    return bound


def convert(source, output, type: str = "f16", *, force: bool = False, tokenizer_from=None,
            progress: Progress | None = None, mmproj=None, mmproj_type: str = "f16") -> ConvertResult:
    """Convert a checkpoint directory or HF repo id into a diffusion-gemma GGUF at `output`.

    tokenizer_from: a GGUF whose tokenizer.* keys (and chat template) replace the checkpoint's
    tokenizer files; its vocabulary size must equal the config's vocab_size.
    mmproj: where the vision tower goes (dglocal.convert.mmproj), when the checkpoint has one: None beside the
    model (mmproj-<name>.gguf), False nowhere.
    """
    output = Path(output)
    ftype = file_type(type)
    if output.exists() and not force:
        raise ConvertError(f"{output}: already exists (use --force to overwrite)")
    if type.lower() not in DIRECT_TYPES:
        _quantizer(type)  # fail before writing a full-precision staging file
    directory = resolve_source(source)
    params = read_params(directory)
    gen = read_generation(directory)
    tok = (tokenizer_from_gguf(tokenizer_from, params.vocab_size) if tokenizer_from
           else tokenizer_from_files(directory, params.vocab_size))
    index = index_safetensors(directory)
    plan = schema.tensor_plan(params)
    bound = bind_sources(plan, index)
    skipped = sorted(n for n in index if schema.is_skipped(n))
    images = bool(skipped) and params.image_ids is not None  # a tower, and image tokens in the vocabulary
    tower = _tower_output(output, mmproj, mmproj_type, force) if images and mmproj is not False else None
    notes = []

    name = str(source).rstrip("/").split("/")[-1]
    staging = output.with_name(output.name + ".stage.partial")
    try:
        with writing(output) as partial:
            if type.lower() in DIRECT_TYPES:
                _write(partial, plan, bound, params, gen, tok, DIRECT_TYPES[type.lower()][0], ftype, name, progress)
            else:  # full precision first (bf16 holds a bf16 checkpoint exactly), then llama.cpp's quantizer
                base = Q.BF16 if all(s.dtype == "BF16" for s in bound.values()) else Q.F32
                base_ftype = LlamaFileType.MOSTLY_BF16 if base == Q.BF16 else LlamaFileType.ALL_F32
                _write(staging, plan, bound, params, gen, tok, base, base_ftype, name, progress)
                quantize_gguf(staging, partial, type, force=True)
            check_loadable(partial, output)
            if tower:  # the vision tower beside it, before the model is in place
                convert_mmproj(directory, tower, mmproj_type, force=True)
                notes.append(f"vision tower ({len(skipped)} tensors) -> {tower} ({mmproj_type}): run with --mmproj")
                skipped = []
            elif skipped:
                why = "--no-mmproj" if images else "its image token ids lie outside the vocabulary"
                notes.append(f"vision tower not converted ({len(skipped)} tensors, {why}): the model takes text only")
    finally:
        remove_quietly(staging)
    return ConvertResult(output, type.lower(), len(plan), output.stat().st_size, skipped, notes)


def _tower_output(output: Path, mmproj, mmproj_type: str, force: bool) -> Path:
    """Where the vision tower goes (`mmproj`, or beside the model), checked before anything is written."""
    tower = Path(mmproj) if mmproj is not None else default_path(output)
    if mmproj_type.lower() not in DIRECT_TYPES:
        raise ConvertError(f"mmproj type {mmproj_type!r}: one of {', '.join(DIRECT_TYPES)}")
    if tower.exists() and not force:
        raise ConvertError(f"{tower}: already exists (use --force to overwrite)")
    return tower


def check_loadable(partial: Path, output: Path) -> None:
    """The runtime's own checks on the file written: one llama.cpp would refuse or crash on is not renamed into
    place."""
    from dglocal.runtime import checks
    from dglocal.runtime.gguf import read_header

    try:
        checks.model_file(output, read_header(partial))
    except ModelError as e:
        raise ConvertError(f"the converted file would not load: {e}") from None


def _write(path: Path, plan, bound, params, gen, tok, base: Q, ftype: LlamaFileType, name: str,
           progress: Progress | None) -> None:
    w = GGUFWriter(path, schema.ARCH)
    schema.write_metadata(w, params, gen, name=name, file_type=int(ftype))
    write_tokenizer(w, tok)
    types = {t.name: schema.tensor_type(t, base) for t in plan}
    for t in plan:
        nbytes = int(np.prod(quants.quant_shape_to_byte_shape(t.shape, types[t.name])))
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=types[t.name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Stream each tensor in row chunks straight after gguf-py's tensor table (what
    # GGUFWriter.write_tensor_data does for a whole tensor, without holding it in memory).
    fout = w.fout[0]
    total = sum(_n_rows(t) * t.shape[-1] * 4 for t in plan)
    done = 0
    for t in plan:
        w.write_padding(fout, fout.tell())
        start = fout.tell()
        rows, width = _n_rows(t), t.shape[-1]
        step = max(1, CHUNK_BYTES // (4 * width))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            data = t.make().reshape(rows, width)[r0:r1] if t.make else bound[t.name].rows(r0, r1)
            if not np.all(np.isfinite(data)) and t.make is None:
                raise ConvertError(f"{bound[t.name].file.name}: tensor {bound[t.name].name} has NaN or Inf values")
            encode_rows(data, types[t.name]).tofile(fout)
            done += (r1 - r0) * width * 4
            if progress:
                progress(t.name, done, total)
        w.write_padding(fout, fout.tell() - start)
    w.close()


def _n_rows(t) -> int:
    return int(np.prod(t.shape[:-1], dtype=np.int64)) if len(t.shape) > 1 else 1


def _disk_hint(dst: Path) -> str:
    """llama.cpp reports a full disk as a short write or an iostream error: say what it is."""
    try:
        free = shutil.disk_usage(dst.parent).free
    except OSError:
        return ""
    return "disk full? " if free < (1 << 20) else ""


def _quantizer(ftype_name: str):
    """dglocal.runtime.native (the patched llama.cpp), imported only when a llama.cpp quant type is asked for."""
    try:
        from dglocal.runtime import native
    except (BackendError, ImportError) as e:  # a BackendError's message already says how to build it
        hint = "" if isinstance(e, BackendError) else f"; {BUILD_HINT}"
        raise ConvertError(f"type {ftype_name} needs llama.cpp's quantizer: {e}{hint} "
                           "(f32/f16/bf16/q8_0 need no backend)") from e
    return native


def quantize_gguf(src, dst, ftype_name: str, *, nthread: int = 0, force: bool = False) -> Path:
    """Quantize a full-precision diffusion-gemma GGUF with llama.cpp's `llama_model_quantize`, which picks
    the per-tensor type mix of `ftype_name` (as llama-quantize does). Writes `dst.partial`, renames it at
    the end, and leaves nothing behind on failure. Needs the patched library (it knows diffusion-gemma)."""
    src, dst = Path(src), Path(dst)
    ftype = file_type(ftype_name)
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists (use --force to overwrite)")
    if not src.is_file():
        raise ConvertError(f"{src}: no such file")
    nat = _quantizer(ftype_name)
    nat.init()
    params = nat.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    with writing(dst) as partial:
        nat.last_errors()  # drop errors logged by earlier calls
        rc = nat.llama_model_quantize(os.fsencode(src), os.fsencode(partial), ctypes.byref(params))
        if rc != 0 or not partial.is_file():
            raise ConvertError(f"{src}: llama.cpp could not quantize it to {ftype_name} (code {rc}): "
                               f"{_disk_hint(dst)}{nat.last_errors() or 'no error logged'}")
    return dst
