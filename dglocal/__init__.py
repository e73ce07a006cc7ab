"""dglocal: block-diffusion language models (DiffusionGemma) on llama.cpp.

    llm = dglocal.load("model.gguf", n_ctx=4096)      # an LLM: dglocal.generation.llm
    print(llm.generate("Write a haiku").text)

The package, one direction of imports from the top down: cli/ (the `dglocal` command) and serving/ (the HTTP API)
over tools/ (bench, roofline) and sudoku/ (the built-in model), over generation/ (the block loop and its API),
over runtime/ (the patched llama.cpp); convert/ (GGUF files: conversion, synthesis, HF repos) reads runtime/.
docs/architecture.md walks through it.
"""

from .errors import BackendError, ConfigError, ContextError, ConvertError, DglocalError, ModelError

__all__ = ["load", "DglocalError", "BackendError", "ModelError", "ConvertError", "ContextError", "ConfigError"]


def load(path, *, seed: int | None = None, **options):
    """Load a diffusion-gemma GGUF: an LLM (generate, stream, chat, generate_many) over the runtime Model.
    `seed`: where the seeds of requests that give none come from (None or -1: random); options: the fields of
    dglocal.runtime.LoadOptions (n_ctx, n_gpu_layers, n_threads, n_ubatch, n_seq_max, kv_type, flash_attn,
    swa_full, swa_checkpoints, extra_bufts, rpc, tensor_overrides, n_cpu_moe, tensor_split, mmap, no_alloc,
    precision, soft_embedding, reductions, lora: a LoRA adapter GGUF, (path, scale), or a list of those)."""
    from .generation.llm import LLM
    from .generation.request import SeedSource
    from .runtime.model import Model

    seeds = SeedSource(seed)  # a bad seed fails before the slow load
    return LLM(Model(path, **options), seed=seeds.seed)
