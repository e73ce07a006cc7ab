"""What a denoise pass may filter out of each position's distribution softmax(logits / T), on the device, before
its argmax, draw, entropy and self-conditioning: token masks (bias rows, or packed allow masks at 1/32 of their
bytes) and top-k, top-p and min-p.

The backend applies them in this order: each position's bias row is added (0 keeps a token, -inf removes it; a
packed mask row removes the tokens whose bit is 0 in the same way),
then the k most likely ids are kept (ties with the k-th too), then the most likely ids until their mass (over
what top-k kept, renormalised) reaches top_p, then the ids with p >= min_p * max p. The most likely id always
survives, so the distribution is never empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from . import checks


@dataclass(frozen=True)
class Filters:
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    bias: np.ndarray | None = None  # float32 [rows, n_vocab]: 0 or -inf (or any finite bias)
    bias_row: np.ndarray | None = None  # int32 [canvas]: each position's row of `bias`, -1 none
    allow: np.ndarray | None = None  # uint32 [rows, ceil(n_vocab / 32)]: bit v % 32 of word v // 32 allows id v
    allow_row: np.ndarray | None = None  # int32 [canvas]: each position's row of `allow`, -1 none

    @property
    def active(self) -> bool:
        return (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or self.bias_row is not None
                or self.allow_row is not None)


def sampling(top_k=0, top_p=1.0, min_p=0.0) -> Filters:
    """The per-request truncation knobs, checked."""
    top_k = checks.integer("top_k", top_k, 0, 2**31 - 1)
    for name, value, low_open in (("top_p", top_p, True), ("min_p", min_p, False)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
            raise ConfigError(f"{name} must be a number in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return Filters(top_k, float(top_p), float(min_p))


def checked(filters: Filters, n_vocab: int, canvas_length: int) -> Filters:
    """`filters` with its bias or masks as contiguous arrays of the shapes the backend reads, or a ConfigError."""
    if not isinstance(filters, Filters):
        raise ConfigError(f"filters must be a dglocal.runtime.filters.Filters, got {type(filters).__name__}")
    sampling(filters.top_k, filters.top_p, filters.min_p)
    if (filters.bias is None) != (filters.bias_row is None):
        raise ConfigError("filters: bias and bias_row come together")
    if (filters.allow is None) != (filters.allow_row is None):
        raise ConfigError("filters: allow and allow_row come together")
    if filters.allow is not None:
        if filters.bias is not None:
            raise ConfigError("filters: bias rows or allow masks, not both")
        return _checked_masks(filters, n_vocab, canvas_length)
    if filters.bias is None:
        return filters
    bias = np.ascontiguousarray(filters.bias, dtype=np.float32)
    if bias.ndim != 2 or bias.shape[1] != n_vocab or bias.shape[0] == 0:
        raise ConfigError(f"filters: bias must be [rows, {n_vocab}], got {list(bias.shape)}")
    rows = _rows(filters.bias_row, bias.shape[0], canvas_length, "bias")
    if np.isnan(bias).any() or np.isposinf(bias).any() or np.isneginf(bias).all(axis=1).any():
        raise ConfigError("filters: bias values are finite or -inf, and no row may remove every token")
    return Filters(filters.top_k, filters.top_p, filters.min_p, bias, rows)


def _rows(given, n: int, canvas_length: int, name: str) -> np.ndarray:
    rows = np.ascontiguousarray(given, dtype=np.int32).reshape(-1)
    if rows.size != canvas_length or rows.min() < -1 or rows.max() >= n:
        raise ConfigError(f"filters: {name}_row must be {canvas_length} rows of {name} (or -1), got {rows.size} in "
                          f"[{rows.min()}, {rows.max()}]")
    return rows


def _checked_masks(filters: Filters, n_vocab: int, canvas_length: int) -> Filters:
    words = (n_vocab + 31) // 32
    allow = np.ascontiguousarray(filters.allow, dtype=np.uint32)
    if allow.ndim != 2 or allow.shape[1] != words or allow.shape[0] == 0:
        raise ConfigError(f"filters: allow must be [rows, {words}] uint32 words, got {list(allow.shape)}")
    rows = _rows(filters.allow_row, allow.shape[0], canvas_length, "allow")
    bits = np.unpackbits(allow.astype("<u4", copy=False).view(np.uint8), axis=1, bitorder="little")
    open_ = bits[:, :n_vocab].any(axis=1)
    if not open_.all():
        raise ConfigError(f"filters: allow row {int(np.argmin(open_))} removes every token")
    return Filters(filters.top_k, filters.top_p, filters.min_p, allow=allow, allow_row=rows)
