"""The patched llama.cpp and what runs on it: native bindings (native), Model and Sequence (model), how a model is
loaded (options, placement, swa), what it costs (diagnostics, plan), the GGUF header (gguf), input checks (checks)
and the pinned upstream build (upstream). Imports nothing of dglocal but dglocal.errors."""

from .model import Denoised, Model, Sequence
from .options import LoadOptions

__all__ = ["Model", "Sequence", "Denoised", "LoadOptions"]
