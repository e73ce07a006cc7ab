"""The sliding layers' KV cache when it is windowed: which contexts get it, and how truncation stays exact.

A full cache keeps every position in every layer. A windowed one keeps, in the sliding layers, about the last
window + n_ubatch positions: llama.cpp overwrites a cell once it is older than the window seen from the sequence's
newest position. Growing a sequence is exact either way (a token, or a canvas at n_past, only reads the last W-1
keys). Truncating is not: cutting back to n needs the sliding keys of positions n-W+1 .. n-1, which may be gone.
They cannot be rebuilt from the last W tokens alone (each of their keys depends, through the sliding layers below,
on W tokens further back), only from a point whose sliding state is known. So a windowed sequence saves the sliding
cells (llama.cpp's partial sequence state, as llama-server's context checkpoints) after encoder passes that found
the window already pruned, restores the latest checkpoint at or before n, and re-encodes from there; without one it
re-encodes from the start.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .checks import CTX_PAD, round_up

# the full cache costs little up to twice the windowed one's size; past that the window is the default
FULL_UP_TO = 2


def sliding_window(metadata: dict) -> int:
    """The model's sliding window in tokens, 0 when no layer slides."""
    arch = metadata.get("general.architecture", "")
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and not any(pattern):
        return 0
    return int(metadata.get(f"{arch}.attention.sliding_window", 0) or 0)


def windowed_cells(window: int, n_ubatch: int) -> int:
    """Cells per sequence of a windowed sliding cache (llama_kv_cache_iswa, one stream per sequence: the window
    and a micro-batch, padded to 256)."""
    return round_up(window + n_ubatch, CTX_PAD)


def full_by_default(n_ctx_seq: int, window: int, n_ubatch: int) -> bool:
    """swa_full's default: the full cache where it is at most FULL_UP_TO × the windowed one."""
    return window == 0 or n_ctx_seq <= FULL_UP_TO * windowed_cells(window, n_ubatch)


def default_in_words(window: int, n_ubatch: int = 512) -> str:
    """What `dglocal info` says about the default: up to which context the sliding layers keep every token."""
    if window == 0:
        return "no sliding layers: every layer keeps every token"
    up_to = FULL_UP_TO * windowed_cells(window, n_ubatch)
    return (f"sliding window {window}: full cache up to n_ctx {up_to} per sequence, windowed beyond "
            "(--swa-full / --swa-window to choose)")


def describe(swa_full: bool, window: int) -> str:
    if window == 0:
        return "no sliding layers"
    if swa_full:
        return f"sliding layers keep every token (full cache; window {window})"
    return f"sliding layers keep the last {window} tokens (windowed cache)"


@dataclass
class Checkpoint:
    n_tokens: int
    data: ctypes.Array


class Checkpoints:
    """The saved sliding-layer states of one windowed sequence, newest last, at most `keep`."""

    def __init__(self, ctx, seq_id: int, window: int, keep: int, call=None):
        """`call(fn, *args)` runs a native call (the model's worker thread: Model.native); default: here."""
        from . import native  # loaded with the first model, not by the sizing functions above

        self._nat, self._ctx, self.seq_id, self.window, self.keep = native, ctx, seq_id, window, keep
        self._call = call or (lambda fn, *args: fn(*args))
        self._mem = native.llama_get_memory(ctx)
        self.saved: list[Checkpoint] = []

    def _pos_min(self) -> int:
        return self._call(self._nat.llama_memory_seq_pos_min, self._mem, self.seq_id)

    def intact(self, n: int) -> bool:
        """Whether a sequence cut back to n tokens still has the sliding keys position n will read."""
        if n == 0:
            return True
        pos_min = self._pos_min()
        return 0 <= pos_min <= max(0, n - self.window + 1)

    def after_encode(self, n_tokens: int) -> None:
        """Save the sliding state at n_tokens once the window has started to drop positions."""
        if self.keep == 0 or self._pos_min() <= 0 or (self.saved and self.saved[-1].n_tokens == n_tokens):
            return
        flags = self._nat.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = self._call(self._nat.llama_state_seq_get_size_ext, self._ctx, self.seq_id, flags)
        data = (ctypes.c_uint8 * size)()
        if self._call(self._nat.llama_state_seq_get_data_ext, self._ctx, data, size, self.seq_id, flags) != size:
            return  # no checkpoint: a later deep truncation re-encodes from the start
        self.saved.append(Checkpoint(n_tokens, data))
        del self.saved[:-self.keep]

    def rewind(self, n: int) -> int:
        """After the sequence was cut to n: the position it can be continued from exactly, ≤ n. Restores the
        latest checkpoint at or before n when the sliding keys n needs are gone; 0 (cache emptied) without one."""
        self.saved = [c for c in self.saved if c.n_tokens <= n]
        if self.intact(n):
            return n
        flags = self._nat.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        while self.saved:
            ck = self.saved[-1]
            if self._call(self._nat.llama_state_seq_set_data_ext, self._ctx, ck.data, len(ck.data), self.seq_id,
                          flags):
                self._call(self._nat.llama_memory_seq_rm, self._mem, self.seq_id, ck.n_tokens, -1)
                if self.intact(ck.n_tokens):
                    return ck.n_tokens
            self.saved.pop()
        self._call(self._nat.llama_memory_seq_rm, self._mem, self.seq_id, -1, -1)
        return 0
