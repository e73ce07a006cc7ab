"""The fast sampler's state of one canvas (docs/sampler.md#the-fast-sampler): an opt-in approximation of the
reference sampler that makes a canvas cheaper as it settles.

- A position the entropy bound accepts with an entropy below `freeze_bound` (the early stop's confidence
  threshold: what the reference asks of every position before it stops a canvas, here judged one position at a
  time) is *pending*: the next pass runs it once more with the accepted token and keeps its keys and values in
  the cache, and from then on it is *frozen*: it keeps that token for the rest of the canvas (the reference may
  still re-noise it at a later step), and later passes attend to its cached K/V without running it.
- Each pass runs the other positions only, their number rounded up to a multiple of C/8 by running the stalest
  frozen positions again (their cached K/V refreshed), so eight graph shapes serve every step. The first position
  always runs: sliding layers take their window from it.
- The reductions see each position's `fast_k` most likely ids only (argmax, draw, entropy, self-conditioning).
- A canvas ends when every position is frozen, or every one up to a frozen end-of-sequence token is (the rest is
  cut anyway), besides the reference's early stop.
- A guide or a grammar that re-noises a frozen position unfreezes it (its cached K/V are replaced when it runs).
- Pinned positions (constraints, an edit's kept text, a grammar repair's prefix) are pending from the start.

With `freeze` off it evaluates the whole canvas each step and only the top-K reductions differ; with fast_k =
n_vocab as well it is the reference sampler's trajectory (tests/test_fast_sampler.py)."""

from __future__ import annotations

import numpy as np

from ..runtime.fastpass import FastPass

N_BUCKETS = 8  # active-set sizes: the multiples of C/8 (rounded up)


def bucket(n: int, C: int) -> int:
    """The smallest bucket that holds n positions."""
    return next(b for b in (-(-C * k // N_BUCKETS) for k in range(1, N_BUCKETS + 1)) if b >= n)


class Freezer:
    def __init__(self, C: int, fast_k: int, freeze: bool, freeze_bound: float, eos_ids):
        self.C, self.fast_k, self.freeze, self.bound = C, fast_k, freeze, freeze_bound
        self.eos = np.asarray(sorted(set(eos_ids)), dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """A new canvas (a block's first attempt or a restart): nothing pending, nothing cached."""
        self.pending = np.zeros(self.C, dtype=bool)  # accepted by the last step: run again, their K/V kept
        self.frozen = np.zeros(self.C, dtype=bool)  # token fixed, K/V cached, not run
        self.since = np.zeros(self.C, dtype=np.int64)  # the pass that last cached each position
        self.passes = 0
        self.evaluated = 0  # positions run through the forward in this canvas (the work it cost)

    def call(self, held: np.ndarray | None) -> FastPass:
        """The next pass: pinned positions (`held`) are pending until frozen."""
        if not self.freeze:
            return FastPass(fast_k=self.fast_k)
        if held is not None:
            self.pending |= held & ~self.frozen
        run = ~self.frozen
        run[0] = True
        keep = self.pending.copy()
        missing = bucket(int(run.sum()), self.C) - int(run.sum())
        if missing:  # the stalest frozen positions run again, their cached K/V refreshed
            stale = np.flatnonzero(self.frozen & (np.arange(self.C) > 0))
            stale = stale[np.argsort(self.since[stale], kind="stable")][:missing]
            run[stale], keep[stale] = True, True
        keep[0] = False  # it runs every pass: nothing to cache
        if run.all():
            return FastPass(keep=keep, fast_k=self.fast_k)
        index = np.flatnonzero(run)
        return FastPass(index, keep[index], self.fast_k, frozen=True)

    def passed(self, fast: FastPass) -> np.ndarray:
        """A pass came back: what it kept (the pending positions, and the frozen ones it refreshed) is frozen
        now. Returns the mask of the positions it ran."""
        self.passes += 1
        ran = np.ones(self.C, dtype=bool) if fast.index is None else np.isin(np.arange(self.C), fast.index)
        self.evaluated += int(ran.sum())
        if fast.keep is not None:
            kept = np.zeros(self.C, dtype=bool)
            kept[ran] = fast.keep.astype(bool)
            self.frozen |= kept
            self.since[kept] = self.passes
        return ran

    def settle(self, accepted: np.ndarray, entropy: np.ndarray, renoised: np.ndarray | None) -> None:
        """After a step: the positions accepted below the bound are pending; what a guide or grammar re-noised
        is neither pending nor frozen."""
        if not self.freeze:
            return
        self.pending = accepted & (entropy < self.bound) & ~self.frozen
        if renoised is not None:
            self.frozen &= ~renoised
            self.pending &= ~renoised

    def finished(self, canvas: np.ndarray) -> bool:
        """Every position frozen, or every one up to a frozen end-of-sequence token."""
        if not self.freeze:
            return False
        if self.frozen.all():
            return True
        ends = np.flatnonzero(self.frozen & np.isin(canvas, self.eos))
        return ends.size > 0 and bool(self.frozen[:ends[0]].all())
