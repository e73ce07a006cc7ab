"""Views: the same problem stated another way for a guide's restart.

A model that fails a problem from one statement of it often fails it again from fresh noise, with the same
prompt: its mistakes come from how that prompt looks to it as much as from the problem. A View restates it. The
model sees `prompt` instead of the request's, and its canvas is a permutation of the world's: model position j
holds world position `order[j]`, and a token t the model writes reads as `tokens[t]` in the world. The generation
loop maps every draft back, so the guide, the events and the output only ever see the world's canvas (a Sudoku
grid turned and relabelled is solved, and shown, as the puzzle that was asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True, eq=False)
class View:
    prompt: Sequence[int]
    order: np.ndarray  # int64[C]: the world position each model position holds
    tokens: np.ndarray  # int64[n_vocab]: the world token each model token reads as

    def __post_init__(self):
        prompt = np.asarray(self.prompt)
        if prompt.ndim != 1 or not prompt.size or not np.issubdtype(prompt.dtype, np.integer):
            raise ConfigError(f"a view's prompt must be a non-empty list of token ids, got {self.prompt!r:.60}")
        object.__setattr__(self, "order", _permutation(self.order, "order"))
        object.__setattr__(self, "tokens", _permutation(self.tokens, "tokens"))
        object.__setattr__(self, "_model_token", np.argsort(self.tokens))

    def check(self, canvas_length: int, n_vocab: int) -> View:
        """This view, if it fits the model; ConfigError names what does not."""
        if self.order.size != canvas_length:
            raise ConfigError(f"a view's order covers {self.order.size} positions, the canvas has {canvas_length}")
        if self.tokens.size != n_vocab:
            raise ConfigError(f"a view's tokens map {self.tokens.size} ids, the vocabulary has {n_vocab}")
        return self

    def world(self, canvas: np.ndarray) -> np.ndarray:
        """A model canvas (token ids) as the world reads it."""
        out = np.empty_like(canvas)
        out[self.order] = self.tokens[canvas]
        return out

    def model(self, canvas: np.ndarray) -> np.ndarray:
        """A world canvas (token ids; -1, a free position, stays -1) as the model holds it."""
        held = canvas[self.order]
        return np.where(held >= 0, self._model_token[np.maximum(held, 0)], held)

    def world_mask(self, mask: np.ndarray) -> np.ndarray:
        out = np.empty_like(mask)
        out[self.order] = mask
        return out

    def model_mask(self, mask: np.ndarray) -> np.ndarray:
        return mask[self.order]


def _permutation(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"a view's {what} must be a 1-D list of integers, got {arr.dtype} of shape {arr.shape}")
    arr = arr.astype(np.int64)
    if not np.array_equal(np.sort(arr), np.arange(arr.size)):
        raise ConfigError(f"a view's {what} must be a permutation of 0..{arr.size - 1}")
    return arr
