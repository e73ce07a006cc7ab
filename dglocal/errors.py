"""One exception hierarchy for the whole package; the CLI turns these into one red line."""

BUILD_HINT = "build it with: python scripts/build_backend.py --backend cpu   (or cuda / metal / vulkan)"


class DglocalError(Exception):
    """Base class of every error dglocal raises on purpose."""


class BackendError(DglocalError):
    """The patched llama.cpp library is missing, too old, or a native call failed."""


class ModelError(DglocalError):
    """A model file is malformed or is not a diffusion-gemma model."""


class ConvertError(DglocalError):
    """A checkpoint could not be converted."""


class ContextError(DglocalError):
    """A request does not fit the context (prompt plus generation over n_ctx)."""


class ConfigError(DglocalError, ValueError):
    """A generation or command option has an invalid value."""

