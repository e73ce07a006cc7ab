"""dglocal: block-diffusion language models (DiffusionGemma) on llama.cpp."""

from .errors import BackendError, ConfigError, ContextError, ConvertError, DglocalError, ModelError

__all__ = ["load", "DglocalError", "BackendError", "ModelError", "ConvertError", "ContextError", "ConfigError"]


def load(path, **opts):
    """Load a diffusion-gemma GGUF: see `dglocal.model.load`."""
    from .model import load as _load

    return _load(path, **opts)
