"""Validation at the boundary: load options, token ids and a model file's diffusion keys, checked once before
anything reaches llama.cpp (which aborts, wraps or truncates instead of reporting). Errors name the value."""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

from ..errors import ConfigError, ModelError
from . import hparams

MAX_THREADS = 512  # GGML_MAX_N_THREADS
MAX_CTX = 2**31 - 1
MAX_SEQ = 256  # LLAMA_MAX_SEQ  # llama.cpp's n_ctx is a uint32, positions int32
MAX_CANVAS = 65536
CTX_PAD = 256  # llama.cpp pads each sequence's cells to a multiple of this
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4  # below, logits / T overflows f32 into NaN probabilities
INTEGER_TYPES = {"I8", "I16", "I32", "I64", "F64"}  # valid GGUF tensor types that no llama.cpp weight uses


def listenable(host: str, port: int) -> None:
    """ConfigError naming why a server could not listen on host:port (in use, not this machine's address, not a
    name that resolves), said before the slow part: llama.cpp's RPC server only stops without a reason, and
    uvicorn would say it after the model loaded."""
    import socket

    # the family the servers pick (uvicorn; ggml's RPC server is IPv4): "localhost" is 127.0.0.1 even where ::1 is
    # listed first, or not configured at all
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: not a host name or address this machine can resolve ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # as uvicorn and ggml's RPC server bind: a port whose last connections are still closing is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def is_integer(value) -> bool:
    """An int or a numpy integer, not a bool (True is an int to Python, never a count to a user) and not a float
    that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value, low: int, high: int, error: type[Exception] = ConfigError) -> int:
    """`value` as an int, if it is an integer in [low, high]; else `error` naming `name` and the value."""
    if not is_integer(value):
        raise error(f"{name} must be an integer, got {value!r:.60}")
    if not low <= value <= high:
        raise error(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def seed_value(seed) -> int | None:
    """None or -1: a random seed (llama.cpp's convention); otherwise an integer in 0..2**64-1."""
    if seed is None or (is_integer(seed) and seed == -1):
        return None
    return integer("seed", seed, 0, 2**64 - 1)


def token_ids(tokens, n_vocab: int, what: str = "token ids") -> np.ndarray:
    """int32 ids from a list / array of integers, each in [0, n_vocab): no float truncation, no wrap-around."""
    arr = np.asarray(tokens)
    if arr.dtype == object:
        if not all(is_integer(t) for t in arr.reshape(-1)):
            raise ConfigError(f"{what} must be integers, got {tokens!r:.80}")
        arr = np.asarray([int(t) for t in arr.reshape(-1)], dtype=object)
    elif arr.size and arr.dtype.kind not in "iu":
        raise ConfigError(f"{what} must be integers, got {arr.dtype} values")
    flat = arr.reshape(-1)
    if flat.size:
        lo, hi = min(flat.tolist()), max(flat.tolist())
        if lo < 0 or hi >= n_vocab:
            raise ConfigError(f"{what} must be in [0, {n_vocab}), got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(flat, dtype=np.int32)


def temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ConfigError(f"temperature must be a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {value!r}")
    return float(value)


def model_file(path, header, *, loadable: bool = True) -> int:
    """The diffusion keys and tensor types llama.cpp relies on without checking, and with `loadable` every
    hyperparameter it asserts on (dglocal.runtime.hparams); returns the canvas length."""
    kv = header.kv
    if kv.get("general.architecture") != "diffusion-gemma":
        raise ModelError(f"{path}: architecture is {kv.get('general.architecture')!r}, dglocal runs "
                         f"'diffusion-gemma' models")
    canvas = kv.get("diffusion.canvas_length")
    if canvas is None:
        raise ModelError(f"{path}: diffusion.canvas_length is missing (not a diffusion-gemma file?)")
    canvas = integer(f"{path}: diffusion.canvas_length", canvas, 1, MAX_CANVAS, ModelError)
    n_vocab = len(kv.get("tokenizer.ggml.tokens") or ())
    eos = kv.get("diffusion.eos_token_ids")
    if eos is not None:
        if not isinstance(eos, list) or not all(is_integer(t) and 0 <= t < n_vocab for t in eos):
            raise ModelError(f"{path}: diffusion.eos_token_ids must be token ids below {n_vocab}, got {eos!r:.80}")
    if loadable:
        hparams.check(path, header)  # what llama.cpp would assert on, loop on or fault on
    for t in header.tensors:
        if getattr(t.type, "name", "") in INTEGER_TYPES:
            raise ModelError(f"{path}: tensor {t.name} has type {t.type.name}; weights are float or quantized")
        # norms and scalars are multiplied into f32 activations; llama.cpp's binary ops abort on f16/bf16 there
        if len(t.shape) == 1 and getattr(t.type, "name", "") != "F32":
            raise ModelError(f"{path}: tensor {t.name} is {getattr(t.type, 'name', t.type)}; 1-D tensors (norms, "
                             f"scales) must be F32 (reconvert with dglocal convert)")
    return canvas


def parse_size(text) -> int:
    """'18G', '18GB', '16GiB', '512M', or a byte count -> bytes (G = 2**30, as GPU memory is quoted)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 18G or 16GiB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
