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


def os_error_text(e: OSError) -> str:
    """An OSError in the words a user needs: "disk full", "read-only file system", ... and the errno's text."""
    import errno

    plain = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
    return plain.get(e.errno, e.strerror or str(e))


def remove_quietly(*paths) -> None:
    """Delete leftovers of a failed write; a failure here (e.g. a read-only directory) never hides the first error."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
