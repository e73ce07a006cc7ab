"""Files on disk, written so that a failure never leaves a half-written one: every output dglocal writes (GGUFs,
adapters, grids, cached upstream files) goes through `replacing`. Standard library only: scripts/build_backend.py
imports it before the patched llama.cpp is installed."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path) -> Iterator[Path]:
    """A temporary path beside `path` (`path.partial`: the same folder, so the rename is atomic) for the caller
    to write. On a clean exit it is flushed to disk and renamed over `path`; on any error, or Ctrl-C, it is removed
    and `path` is left as it was."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        _fsync(partial)  # the data on disk before the name points at it: a crash never leaves an empty file
        os.replace(partial, path)
    finally:
        remove_quietly(partial)


def write_atomically(path, data: str | bytes) -> None:
    """`data` (text as UTF-8) in `path`, through `replacing`."""
    with replacing(path) as partial:
        if isinstance(data, str):
            partial.write_text(data, encoding="utf-8")
        else:
            partial.write_bytes(data)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # Windows flushes only a handle opened for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(*paths) -> None:
    """Delete leftovers of a failed write; a failure here (e.g. a read-only directory) never hides the first error."""
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


def os_error_text(e: OSError) -> str:
    """An OSError in the words a user needs: "disk full", "read-only file system", ... and the errno's text."""
    plain = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
    return plain.get(e.errno, e.strerror or str(e))
