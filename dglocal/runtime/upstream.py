"""The pinned upstream: llama-cpp-python's sdist, whose vendored llama.cpp our patches apply to. Also the source
of the vocab-only Gemma 4 GGUF (real tokenizer, chat template and 26B-A4B hyperparameters) it ships."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from dglocal.errors import DglocalError
from dglocal.files import write_atomically

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VOCAB_GEMMA4 = "vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DGLOCAL_CACHE", Path.home() / ".cache" / "dglocal"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist() -> Path:
    """The pinned sdist, downloaded once with pip into the cache and checked against its hash."""
    dest = cache_dir() / "sdist"
    path = dest / SDIST
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"{PACKAGE}=={VERSION}", "-d", str(dest)])
        if r.returncode != 0 or not path.exists():
            raise DglocalError(f"pip could not download {PACKAGE}=={VERSION} (exit {r.returncode})")
    digest = sha256(path)
    if digest != SDIST_SHA256:
        path.unlink()
        raise DglocalError(f"{SDIST}: sha256 {digest} is not the pinned {SDIST_SHA256}; removed it, try again")
    return path


def sdist_file(member: str) -> Path:
    """A file of the pinned sdist (e.g. VOCAB_GEMMA4 and its .inp/.out vectors), extracted once into the cache."""
    out = cache_dir() / "upstream" / VERSION / member
    if not out.exists():
        name = f"{SDIST.removesuffix('.tar.gz')}/{member}"
        with tarfile.open(fetch_sdist()) as tf:
            try:
                data = tf.extractfile(name).read()
            except KeyError:
                raise DglocalError(f"{SDIST} has no {member}") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, data)
    return out
