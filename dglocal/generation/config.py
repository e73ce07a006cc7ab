"""Generation settings: one dataclass, the reference's names and defaults, read from GGUF metadata.

Mirrors transformers' `DiffusionGemmaGenerationConfig` (generation_diffusion_gemma.py): the defaults are
its `_get_default_generation_params()`, the checks its `validate()`. `entropy_bound` is flattened out of the
reference's `sampler_config`. The only place in dglocal where these defaults are written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..runtime import checks
from ..runtime.checks import MAX_TEMPERATURE, MIN_TEMPERATURE
from ..runtime.filters import sampling
from ..errors import ConfigError

MAX_STEPS = 65536  # denoising steps per canvas, and the stability window, at most
SAMPLERS = ("reference", "fast")
MAX_FAST_K = 1 << 24  # the fast sampler's ids a position, at most (more than any vocabulary: then all of it)

# GenerationConfig field -> its GGUF metadata key and type, as the community converters write them (docs/gguf.md):
# dglocal convert writes these (convert.schema), from_metadata reads them
GGUF_KEYS = {
    "max_denoising_steps":  ("diffusion.eb_max_steps", "uint32"),
    "t_min":                ("diffusion.eb_t_min", "float32"),
    "t_max":                ("diffusion.eb_t_max", "float32"),
    "entropy_bound":        ("diffusion.eb_entropy_bound", "float32"),
    "stability_threshold":  ("diffusion.eb_stability_threshold", "uint32"),
    "confidence_threshold": ("diffusion.eb_confidence_threshold", "float32"),
}


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256  # dglocal trims the output to it; the reference returns whole canvases
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int | None = 1  # None (or confidence_threshold None): no early stop, as the reference
    confidence_threshold: float | None = 0.005
    eos_token_id: tuple[int, ...] | None = None  # None: the model's EOS ids
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = field(default_factory=tuple)
    # sampling (docs/sampler.md): a factor on the t_min..t_max schedule (0: the draw is the argmax), and the
    # truncation of every position's distribution on the device (0 / 1 / 0: off)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    # the sampler (docs/sampler.md): "reference", or "fast", the opt-in approximation that freezes settled positions
    # (with `freeze`) and reduces each position's `fast_k` most likely ids only
    sampler: str = "reference"
    fast_k: int = 64
    freeze: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if isinstance(self.stop, str):
            set_("stop", (self.stop,))
        try:
            set_("stop", tuple(self.stop or ()))
        except TypeError:
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r:.40}") from None
        set_("seed", checks.seed_value(self.seed))  # -1 (llama.cpp's convention) and None: a random seed
        if isinstance(self.eos_token_id, int):
            set_("eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is not None:
            set_("eos_token_id", tuple(int(t) for t in self.eos_token_id))
        # an integer in a float field is that float; a numpy integer in an int field, the int it holds
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold", "temperature", "top_p", "min_p"):
            if checks.is_integer(getattr(self, name)):
                set_(name, float(getattr(self, name)))
        for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold", "top_k", "fast_k"):
            if checks.is_integer(getattr(self, name)):
                set_(name, int(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        checks.integer("max_new_tokens", self.max_new_tokens, 1, checks.MAX_CTX)  # more never fits a context
        checks.integer("max_denoising_steps", self.max_denoising_steps, 1, MAX_STEPS)
        _number("entropy_bound", self.entropy_bound, low=0.0, strict=True)
        _number("t_min", self.t_min, low=0.0)
        _number("t_max", self.t_max, low=0.0)
        _number("temperature", self.temperature, low=0.0)
        check_schedule(self.t_min, self.t_max, self.temperature)
        if self.stability_threshold is not None:
            checks.integer("stability_threshold", self.stability_threshold, 0, MAX_STEPS)
        if self.confidence_threshold is not None:
            _number("confidence_threshold", self.confidence_threshold, low=0.0, strict=True)
        sampling(self.top_k, self.top_p, self.min_p)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r:.40}")
        checks.integer("fast_k", self.fast_k, 1, MAX_FAST_K)
        if not isinstance(self.freeze, bool):
            raise ConfigError(f"freeze must be true or false, got {self.freeze!r:.40}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.eos_token_id is not None and any(t < 0 for t in self.eos_token_id):
            raise ConfigError(f"eos_token_id must be >= 0, got {self.eos_token_id!r}")

    @property
    def early_stop(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    def replace(self, **overrides) -> GenerationConfig:
        _check_names(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_metadata(cls, metadata: Mapping | None, **overrides) -> GenerationConfig:
        """Defaults < GGUF `diffusion.eb_*` metadata < overrides. None overrides are ignored; "off" sets a field
        to None (stability_threshold="off": no early stop)."""
        _check_names(overrides)
        values = {}
        for name, (key, _) in GGUF_KEYS.items():
            if metadata is not None and key in metadata:
                values[name] = _from_gguf(name, metadata[key])
        values.update({k: None if isinstance(v, str) and v == "off" else v
                       for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_schedule(t_min: float, t_max: float, temperature: float, whose: str = "") -> None:
    """A denoising schedule t_min..t_max (numbers already): falling, as the reference wants (a flat one too is
    refused), and within what the logits can be divided by, also times the sampling `temperature` factor.
    `whose`: "a guide's " for a guide's own schedule (dglocal.generation.loop), "" for the request's."""
    bounds = f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
    if t_max <= t_min:
        raise ConfigError(f"{whose}t_max must be > t_min, got t_max={t_max} and t_min={t_min}")
    if t_min < MIN_TEMPERATURE or t_max > MAX_TEMPERATURE:
        raise ConfigError(f"{whose}temperatures must be in {bounds} (the logits are divided by them), got "
                          f"t_min={t_min} and t_max={t_max}")
    if temperature > 0 and (temperature * t_min < MIN_TEMPERATURE or temperature * t_max > MAX_TEMPERATURE):
        raise ConfigError(f"temperature {temperature} puts {whose or 'the '}schedule {t_min}..{t_max} outside {bounds}")


def _check_names(overrides) -> None:
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")


def _from_gguf(name, value):
    # GGUF stores f32: take the shortest decimal that round-trips the f32 (0.4, not 0.4000000059604645), the
    # value the reference reads from generation_config.json; the schedule is computed from it in f32 later.
    if isinstance(value, (float, np.floating)):
        return float(str(np.float32(value)))
    if isinstance(value, np.integer):
        return int(value)
    return value


def _number(name, value, *, low, strict=False) -> None:
    bad = not isinstance(value, float) or math.isnan(value) or value < low or (strict and value == low)
    if bad:
        raise ConfigError(f"{name} must be a number {'>' if strict else '>='} {low}, got {value!r}")
