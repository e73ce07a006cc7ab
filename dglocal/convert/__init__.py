"""GGUF files and where they come from: HF DiffusionGemma checkpoint -> GGUF in the community `diffusion-gemma`
schema (`dglocal convert`: source, schema, tokenizer, writer), reports on files and plans (report), random-weight
files with real shapes (synth: the converter's writer on generated tensors), and model resolution from HF repos
(hub). Imports dglocal.runtime (the GGUF reader, llama.cpp's quantizer, memory plans)."""

from dglocal.runtime.gguf import read_header
from .report import DryRun, ModelInfo, dry_run, info, parse_size
from .writer import ConvertResult, convert, file_type, quantize_gguf

__all__ = ["convert", "dry_run", "info", "quantize_gguf", "read_header", "parse_size", "file_type",
           "ConvertResult", "DryRun", "ModelInfo"]
