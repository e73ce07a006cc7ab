"""LoRA adapters through llama.cpp's adapter API: GGUF adapter files (`dglocal convert --lora`, or llama.cpp's own
convert_lora_to_gguf) loaded once beside the weights, each with a scale that can change between forwards.

    adapters = Adapters.load(model, [("style.gguf", 1.0), ("sudoku.gguf", 0.5)])
    adapters.set({0: 0.0, 1: 1.0})        # by id, as llama-server's `lora: [{id, scale}]`; applied lazily

llama.cpp rebuilds its graph reservation when the set changes, so a context switches scales only between
forwards: every sequence of one batched forward runs with the same scales (docs/adapters.md).
"""

from __future__ import annotations

import ctypes
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, ModelError
from . import checks

MAX_SCALE = 1e4
MAX_ALPHA = 1e6  # PEFT's lora_alpha is 8..1024 in practice; llama.cpp multiplies by alpha / rank as it is


@dataclass
class Adapter:
    id: int
    path: Path
    scale: float
    handle: object


def specs(value) -> tuple[tuple[str, float], ...] | None:
    """`lora=` as given (a path, (path, scale), or a list of those) -> ((path, scale), ...) checked."""
    if value is None:
        return None
    one_pair = isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (str, os.PathLike)) and \
        isinstance(value[1], numbers.Real)
    items = [value] if isinstance(value, (str, os.PathLike)) or one_pair else value
    if isinstance(items, (bytes, dict)) or not isinstance(items, (list, tuple)):
        raise ConfigError(f"lora is a path, (path, scale) or a list of those, got {type(value).__name__}")
    out = []
    for item in items:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else _pair(item)
        out.append((os.fspath(path), check_scale(scale, f"the scale of {os.fspath(path)}")))
    return tuple(out) or None


def _pair(item):
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], (str, os.PathLike)):
        raise ConfigError(f"a LoRA adapter is a path or (path, scale), got {item!r:.60}")
    return item


def check_scale(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
            abs(value) > MAX_SCALE:
        raise ConfigError(f"{what} must be a finite number within ±{MAX_SCALE:g}, got {value!r:.40}")
    return float(value)


def check_alpha(path: Path) -> None:
    """An adapter's `adapter.lora.alpha`, which llama.cpp takes as it is: NaN or inf turns every token to garbage,
    so does a huge one. A file that is not a GGUF is left to llama.cpp's own load (its error)."""
    from .gguf import read_header

    try:
        alpha = read_header(path).kv.get("adapter.lora.alpha")
    except ModelError:
        return
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or \
            not 0 <= alpha <= MAX_ALPHA:
        shown = f"{alpha:.7g}" if isinstance(alpha, float) else f"{alpha!r:.40}"
        raise ModelError(f"LoRA adapter {path}: adapter.lora.alpha is {shown}; it must be a number in "
                         f"0..{MAX_ALPHA:g} (0: the scale alone; a negative one flips the adapter, which a negative "
                         "scale does: --lora-scaled FILE -1)")


class Adapters:
    def __init__(self, nat, ctx, adapters: list[Adapter]):
        self._nat, self._ctx, self.list = nat, ctx, adapters
        self._applied: tuple | None = None

    @classmethod
    def load(cls, model, loaded: tuple[tuple[str, float], ...] | None) -> Adapters:
        """Every adapter of `loaded` on `model` (a runtime Model, its weights and context open)."""
        nat, out = model._nat, []
        for i, (path, scale) in enumerate(loaded or ()):
            p = Path(path)
            if not p.is_file():
                raise ModelError(f"LoRA adapter {p}: no such file")
            check_alpha(p)
            handle = model.native(nat.llama_adapter_lora_init, model._model, os.fsencode(p))
            if not handle:
                raise ModelError(f"LoRA adapter {p}: llama.cpp could not load it for {model.path.name}: "
                                 f"{nat.last_errors() or 'unknown error'}")
            out.append(Adapter(i, p, scale, handle))
        adapters = cls(nat, model._ctx, out)
        adapters.apply(model)
        return adapters

    def scales(self, changes=None) -> tuple[float, ...]:
        """Every adapter's scale, with `changes` ({id: scale}, or [{"id", "scale"}] as llama-server takes them)
        applied over the loaded ones."""
        scales = [a.scale for a in self.list]
        for key, scale in _items(changes):
            if not checks.is_integer(key) or not 0 <= key < len(scales):
                raise ConfigError(f"LoRA adapter id {key!r:.20} does not exist: this model has "
                                  f"{len(scales)} adapter(s), ids 0..{len(scales) - 1}" if scales else
                                  "this model was loaded without LoRA adapters (--lora FILE)")
            scales[int(key)] = check_scale(scale, f"the scale of LoRA adapter {key}")
        return tuple(scales)

    @property
    def applied(self) -> tuple:
        """The scales the context's passes run with now (() without adapters)."""
        return self._applied or ()

    def set_default(self, changes) -> None:
        """New loaded scales (llama-server's POST /lora-adapters)."""
        for a, scale in zip(self.list, self.scales(changes)):
            a.scale = scale

    def apply(self, model, scales: tuple[float, ...] | None = None) -> None:
        """Make `scales` (default: the loaded ones) the context's, if they are not already."""
        scales = tuple(a.scale for a in self.list) if scales is None else scales
        if scales == self._applied or not self.list:
            return
        used = [(a, s) for a, s in zip(self.list, scales) if s != 0.0]  # a zero scale: left out of the graph
        handles = (self._nat.llama_adapter_lora_p * max(len(used), 1))(*[a.handle for a, _ in used])
        values = (ctypes.c_float * max(len(used), 1))(*[s for _, s in used])
        if model.native(self._nat.llama_set_adapters_lora, self._ctx, handles, len(used), values) != 0:
            raise ModelError(f"llama.cpp refused the LoRA adapters: {self._nat.last_errors() or 'unknown error'}")
        self._applied = scales

    def info(self) -> list[dict]:
        return [{"id": a.id, "path": str(a.path), "scale": a.scale} for a in self.list]


def _items(changes):
    if changes is None:
        return []
    if isinstance(changes, dict):
        return list(changes.items())
    if isinstance(changes, (list, tuple)):
        out = []
        for c in changes:
            if not isinstance(c, dict) or set(c) != {"id", "scale"}:
                raise ConfigError(f"a LoRA entry is {{\"id\": N, \"scale\": S}}, got {c!r:.60}")
            out.append((c["id"], c["scale"]))
        return out
    raise ConfigError(f"LoRA scales are {{id: scale}} or [{{\"id\", \"scale\"}}], got {type(changes).__name__}")
