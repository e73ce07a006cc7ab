"""HF DiffusionGemma checkpoint -> GGUF in the community `diffusion-gemma` schema (`dglocal convert`)."""

from ..gguf_read import read_header
from .report import DryRun, ModelInfo, dry_run, info, parse_size
from .writer import ConvertResult, convert, file_type, quantize_gguf

__all__ = ["convert", "dry_run", "info", "quantize_gguf", "read_header", "parse_size", "file_type",
           "ConvertResult", "DryRun", "ModelInfo"]
