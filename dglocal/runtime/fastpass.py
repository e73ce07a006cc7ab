"""The fast sampler's part of a denoise request (docs/sampler.md#the-fast-sampler): which canvas positions a pass
evaluates, which of them leave their keys and values in the KV cache for the canvas' later passes (frozen
positions, attended to without being run again), and how many of each position's most likely ids its reductions
keep. The backend's fields are llama_dg_canvas' index, keep, n_past and fast_k.

A sequence with kept positions holds cells past its committed tokens: `KeptCells` records where its canvas starts
and drops them when the canvas ends (a new canvas, an encode, a cut), so nothing of a canvas outlives it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BackendError, ConfigError
from . import checks


@dataclass
class FastPass:
    index: np.ndarray | None = None  # int32 canvas indices evaluated, ascending from 0; None: every one
    keep: np.ndarray | None = None  # bool, one per evaluated position: its K/V stay cached (frozen)
    fast_k: int = 0  # ids a position the reductions keep (its fast_k most likely), 0: the whole vocabulary
    frozen: bool = False  # positions it does not evaluate are cached by the canvas' earlier passes

    @property
    def sparse(self) -> bool:
        """It evaluates part of the canvas or keeps cells: the canvas' start is then given, not inferred."""
        return self.index is not None or (self.keep is not None and bool(self.keep.any()))


def checked(fast: FastPass, canvas_length: int, n_vocab: int) -> FastPass:
    """A FastPass with arrays the backend takes, or a ConfigError naming the field."""
    if not isinstance(fast, FastPass):
        raise ConfigError(f"expected a FastPass, got {type(fast).__name__}")
    index = None
    if fast.index is not None:
        index = np.ascontiguousarray(fast.index, dtype=np.int32).reshape(-1)
        if index.size == 0 or index[0] != 0 or (np.diff(index) <= 0).any() or index[-1] >= canvas_length:
            raise ConfigError(f"index must rise from 0 within the canvas of {canvas_length}, got {fast.index!r:.60}")
    n = canvas_length if index is None else index.size
    keep = None
    if fast.keep is not None:
        keep = np.ascontiguousarray(fast.keep, dtype=np.uint8).reshape(-1)
        if keep.size != n:
            raise ConfigError(f"keep needs one flag per evaluated position ({n}), got {keep.size}")
    k = checks.integer("fast_k", fast.fast_k, 0, n_vocab)
    return FastPass(index, keep, k, bool(fast.frozen))


class KeptCells:
    """Where a sequence's current canvas starts, and whether cells of it are kept in the cache."""

    def __init__(self):
        self.p0 = -1  # the canvas' first position while cells are kept
        self.kept = False

    def start(self, model, seq) -> int:
        """The canvas' first position for a sparse pass: recorded before its first kept cell."""
        if not self.kept:
            self.p0 = model.native(model._nat.llama_memory_seq_pos_max, seq._mem, seq.seq_id) + 1
        return self.p0

    def check(self, fast: FastPass) -> None:
        """A pass that counts on frozen positions finds them cached (a failed pass dropped them)."""
        if fast.frozen and not self.kept:
            raise BackendError("the canvas' frozen positions are no longer cached (a failed pass dropped them): "
                               "it starts again from its first step")

    def after(self, model, seq, fast: FastPass | None, ok: bool) -> None:
        """After a pass: a failed one keeps nothing (the backend dropped the canvas of the pass that failed; an
        earlier pass of the same call may have kept cells)."""
        if ok:
            self.kept = self.kept or (fast is not None and fast.keep is not None and bool(fast.keep.any()))
        elif self.kept or (fast is not None and fast.sparse):
            self.kept = True
            self.drop(model, seq)

    def drop(self, model, seq) -> None:
        """The canvas ended: its kept cells go."""
        if self.kept and self.p0 >= 0:
            model.native(model._nat.llama_memory_seq_rm, seq._mem, seq.seq_id, self.p0, -1)
        self.kept, self.p0 = False, -1


def evaluated(fast: FastPass | None, canvas_length: int) -> int:
    return canvas_length if fast is None or fast.index is None else fast.index.size

