"""How a model is loaded: one frozen dataclass, built once from Python (`dglocal.load(path, **opts)`) or from the
command line (dglocal.cli.options), checked on construction, and resolved against the file (`resolve`): the
context, micro-batch and sliding-cache rules are written here and nowhere else."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from ..errors import ConfigError, ContextError
from . import checks, swa
from .checks import CTX_PAD, round_up
from .lora import specs as lora_specs

DEFAULT_CTX = 4096  # tokens per sequence when n_ctx is not given
MIN_UBATCH = 512  # llama.cpp's default micro-batch: prompts encode in chunks of at least this
# the cache types, as enum ggml_type (gguf-py's mirror of it: llama_cpp's GGML_TYPE_* would load the library here)
KV_TYPES = {"f16": GGMLQuantizationType.F16, "f32": GGMLQuantizationType.F32, "q8_0": GGMLQuantizationType.Q8_0,
            "q4_0": GGMLQuantizationType.Q4_0}
# the soft embedding's copy of E (llama_dg_params.embd_t_type): None picks f32 for an f32 embedding, else f16
SOFT_EMBEDDING_TYPES = {None: -1, "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
                        "q8_0": GGMLQuantizationType.Q8_0}
REDUCTIONS = ("auto", "chain")  # llama_dg_reduce_type: the fused CPU op where the output is on the CPU, or the op chain
QUANTIZED_KV = ("q8_0", "q4_0")  # llama.cpp quantizes V only inside flash attention
SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the image budgets of the reference processor
DEFAULT_IMAGE_TOKENS = 280  # the reference processor's default max_soft_tokens


def ubatch_for(canvas_length: int, n_seq_max: int, *, given: int | None = None,
               image_tokens: int | None = None) -> int:
    """The micro-batch a model is loaded with: a canvas per sequence fits one bidirectional pass (or `given`, never
    below a canvas); with images, an image's block of up to `image_tokens` fits one too (its tokens see each other)."""
    n_ubatch = max(given or max(MIN_UBATCH, n_seq_max * canvas_length), canvas_length)
    return max(n_ubatch, image_tokens or 0)


@dataclass(frozen=True)
class LoadOptions:
    n_ctx: int | None = None  # the whole context, shared by the sequences; None: DEFAULT_CTX each
    n_gpu_layers: int = -1  # -1: every layer on the GPU
    n_threads: int | None = None  # None: every core
    n_ubatch: int | None = None  # None: ubatch_for(canvas, n_seq_max); never below a canvas
    n_seq_max: int = 1  # sequences (slots, batch members) with their own cache
    kv_type: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp's choice (on for the quantized caches)
    swa_full: bool | None = None  # None: by context size (dglocal.runtime.swa)
    swa_checkpoints: int = 4  # sliding-cache checkpoints per sequence
    extra_bufts: bool = True  # llama.cpp's repacked / AMX CPU weight layouts
    rpc: tuple[str, ...] | None = None  # ggml RPC servers HOST:PORT: layers go to them as to GPUs
    tensor_overrides: tuple[str, ...] | None = None  # llama.cpp's -ot REGEX=BUFFER_TYPE
    n_cpu_moe: int = 0  # experts of the first N layers in host memory
    tensor_split: str | tuple | None = None  # llama.cpp's -ts "3,1"
    mmap: bool = True  # False: llama.cpp's --no-mmap
    no_alloc: bool = False  # sizes only (memory plans, graph walks): nothing runs
    precision: str = "auto"  # "f32": f32 matmuls in this model's graphs, f32 device math on Vulkan (per process)
    soft_embedding: str | None = None  # the type of the soft embedding's copy of E: f32, f16, q8_0 (None: by E)
    reductions: str = "auto"  # "chain": the denoise pass' reductions as ggml ops on the CPU too (what GPUs run)
    lora: tuple[tuple[str, float], ...] | None = None  # LoRA adapter files and their scales (runtime.lora)
    mmproj: str | os.PathLike | None = None  # the vision tower's GGUF: prompts take images (runtime.vision)
    image_tokens: int = DEFAULT_IMAGE_TOKENS  # soft tokens an image becomes at most (max_soft_tokens)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("rpc", "tensor_overrides"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            set_(name, tuple(value) if value else None)
        if self.n_ctx is not None:
            checks.integer("n_ctx", self.n_ctx, 1, checks.MAX_CTX)
        checks.integer("n_gpu_layers", self.n_gpu_layers, -1, 1 << 20)
        if self.n_ubatch is not None:
            checks.integer("n_ubatch", self.n_ubatch, 1, 1 << 20)
        if self.n_threads is not None:
            checks.integer("n_threads", self.n_threads, 1, checks.MAX_THREADS)
        checks.integer("n_seq_max", self.n_seq_max, 1, checks.MAX_SEQ)
        set_("lora", lora_specs(self.lora))
        checks.integer("swa_checkpoints", self.swa_checkpoints, 0, 64)
        if self.image_tokens not in SOFT_TOKENS:
            raise ConfigError(f"image_tokens must be one of {', '.join(map(str, SOFT_TOKENS))}, got "
                              f"{self.image_tokens!r}")
        if self.soft_embedding not in SOFT_EMBEDDING_TYPES:
            raise ConfigError(f"soft_embedding must be one of {[t for t in SOFT_EMBEDDING_TYPES if t]} or None, got "
                              f"{self.soft_embedding!r}")
        if self.reductions not in REDUCTIONS:
            raise ConfigError(f"reductions must be one of {list(REDUCTIONS)}, got {self.reductions!r}")
        if self.kv_type not in KV_TYPES:
            raise ConfigError(f"kv_type must be one of {sorted(KV_TYPES)}, got {self.kv_type!r}")
        if self.kv_type in QUANTIZED_KV:
            if self.flash_attn is False:
                raise ConfigError(f"a {self.kv_type} KV cache needs flash attention (llama.cpp quantizes V only "
                                  "inside it): drop --no-flash-attn, or use an f16 cache")
            set_("flash_attn", True)

    def replace(self, **changes) -> LoadOptions:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown load option(s) {unknown}; known: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    @property
    def context(self) -> int:
        """The whole context: n_ctx, or DEFAULT_CTX for each sequence."""
        return self.n_ctx if self.n_ctx is not None else DEFAULT_CTX * self.n_seq_max

    def resolve(self, canvas_length: int, sliding_window: int) -> LoadOptions:
        """Every rule that depends on the file filled in: the context, the micro-batch, the sliding cache."""
        n_ctx = self.context
        if n_ctx < canvas_length + 1:
            raise ContextError(f"n_ctx {n_ctx} is too small: a canvas alone needs {canvas_length + 1}")
        n_ubatch = ubatch_for(canvas_length, self.n_seq_max, given=self.n_ubatch,
                              image_tokens=self.image_tokens if self.mmproj is not None else None)
        swa_full = self.swa_full
        if swa_full is None:
            swa_full = swa.full_by_default(round_up(n_ctx // self.n_seq_max, CTX_PAD), sliding_window, n_ubatch)
        return dataclasses.replace(self, n_ctx=n_ctx, n_ubatch=n_ubatch,
                                   swa_full=bool(swa_full) or sliding_window == 0)
