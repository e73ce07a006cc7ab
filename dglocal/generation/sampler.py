"""The reference sampler's pieces as pure numpy functions (generation_diffusion_gemma.py).

Everything here works on O(canvas) arrays the backend returns (argmax, sampled, entropy); the O(vocab) work
(softmax, inverse-CDF draw, entropy) happens on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """T at countdown step `step` (N..1): t_min + (t_max - t_min) * step / N.

    The reference turns `step` into an int32 tensor, so the whole expression is evaluated in float32
    (LinearTemperatureScheduleLogitsProcessor); the backend must divide the logits by exactly this value.
    """
    f32 = np.float32
    return float(f32(t_min) + f32(t_max - t_min) * (f32(step) / f32(max_steps)))


def accept_mask(entropy: np.ndarray, entropy_bound: float) -> np.ndarray:
    """Entropy-bound acceptance (Ben-Hamu et al., arXiv 2505.24857; EntropyBoundSampler.accept_canvas).

    Sort entropies ascending and accept the k lowest while sum(first k) - max(first k) <= bound; the max of an
    ascending prefix is its last element, so the test is cumsum - own entropy. The lowest is always accepted.
    """
    order = np.argsort(entropy, kind="stable")
    ordered = entropy[order].astype(np.float64)
    mask = np.empty(entropy.shape, dtype=bool)
    mask[order] = np.cumsum(ordered) - ordered <= entropy_bound
    return mask


class StabilityHistory:
    """Argmax canvases of the last `threshold` steps (StableAndConfidentStoppingCriteria).

    Starts filled with -1 (no token), so a block is never stable on its first step unless threshold is 0.
    """

    def __init__(self, threshold: int, canvas_length: int):
        self.history = np.full((threshold, canvas_length), -1, dtype=np.int64)

    def update(self, argmax: np.ndarray) -> bool:
        """True when `argmax` equals every remembered canvas; then remember it (the oldest is dropped)."""
        stable = bool((self.history == argmax[None, :]).all())
        if len(self.history):
            self.history = np.roll(self.history, -1, axis=0)
            self.history[-1] = argmax
        return stable


def is_confident(entropy: np.ndarray, threshold: float) -> bool:
    """Mean per-position entropy of softmax(logits / T) below the threshold (strict, as the reference)."""
    return float(np.mean(entropy, dtype=np.float64)) < threshold


def trim_eos(tokens: np.ndarray, eos_ids: Sequence[int]) -> tuple[np.ndarray, bool]:
    """Tokens before the first EOS (EOS excluded), and whether there was one."""
    hits = np.flatnonzero(np.isin(tokens, np.asarray(list(eos_ids), dtype=np.int64)))
    if len(hits) == 0:
        return tokens, False
    return tokens[: hits[0]], True


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index in `text` of the earliest stop string that ends at or after `start`, or -1.

    Call it with `start` = length of the text already checked: a match that straddles the boundary between
    the old text and the newly committed block is found, a match entirely in the old text is not re-found.
    """
    best = -1
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (best < 0 or i < best):
            best = i
    return best


class Noise(Protocol):
    """All the randomness of the block loop, in the reference's order: `tokens(C)` at each block start
    (canvas init), then per step `uniforms(C)` (the categorical draw) and `tokens(C)` (re-noising)."""

    def tokens(self, n: int) -> np.ndarray: ...  # int64 uniform over [0, n_vocab)

    def uniforms(self, n: int) -> np.ndarray: ...  # float64 in [0, 1)


class SeededNoise:
    """The default noise: one numpy Generator, so the same seed gives the same output."""

    def __init__(self, n_vocab: int, seed: int | None = None):
        self.n_vocab = n_vocab
        self.rng = np.random.default_rng(seed)

    def tokens(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.n_vocab, size=n, dtype=np.int64)

    def uniforms(self, n: int) -> np.ndarray:
        return self.rng.random(n, dtype=np.float64)


def inverse_cdf(probs: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The draw the backend does on the device, for reference and tests: per row, the number of vocab ids
    (in id order) whose cumulative probability is < u, clamped to the last id against rounding."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    drawn = (cdf < np.asarray(uniforms, dtype=np.float64)[:, None]).sum(axis=-1)
    return np.minimum(drawn, probs.shape[-1] - 1).astype(np.int32)


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string (or of a channel marker,
    generation.channels): text a stream must not show yet, since the next block may complete it."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best
