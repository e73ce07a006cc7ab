"""The options `run`, `serve`, `bench`, `plan` and `sudoku` share, declared once, and the one place they become a
LoadOptions (`load_options`) or generation settings (`generation`)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Optional

import typer

from dglocal.errors import ConfigError
from dglocal.runtime.options import DEFAULT_CTX, DEFAULT_IMAGE_TOKENS, SOFT_TOKENS, LoadOptions

QuantOption = Annotated[str, typer.Option(
    "--quant", help="Which GGUF of an HF repo to use (matched in the file name), or the type to convert a "
                    "safetensors repo to.")]
CtxOption = Annotated[Optional[int], typer.Option(
    "-c", "--ctx-size", help=f"Context size in tokens, shared by the slots (as llama-server). Default: {DEFAULT_CTX} "
                             "per slot.", show_default=False)]
NglOption = Annotated[int, typer.Option("-ngl", "--n-gpu-layers", help="Layers on the GPU; -1: all.")]
ThreadsOption = Annotated[Optional[int], typer.Option(
    "-t", "--threads", help="CPU threads. Default: all cores.", show_default=False)]
SeedOption = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed of the answers' seeds: the same seed and settings repeat a run. Default: random (the "
                   "seed of each answer is in its statistics).", show_default=False)]
StepsOption = Annotated[Optional[int], typer.Option(
    "--steps", help="Most denoising steps per canvas (max_denoising_steps). Default: from the model.",
    show_default=False)]
EntropyOption = Annotated[Optional[float], typer.Option(
    "--entropy-bound", help="Entropy budget of the positions accepted per step; larger accepts more per step. "
                            "Default: from the model.", show_default=False)]
TMinOption = Annotated[Optional[float], typer.Option(
    "--t-min", help="Temperature at the last step. Default: from the model.", show_default=False)]
TMaxOption = Annotated[Optional[float], typer.Option(
    "--t-max", help="Temperature at the first step. Default: from the model.", show_default=False)]
# the sampling truncations, as llama.cpp spells them (docs/sampler.md)
TempOption = Annotated[Optional[float], typer.Option(
    "--temp", help="A factor on the t-min..t-max schedule; 0: each position's most likely token. Default: 1.",
    show_default=False)]
TopKOption = Annotated[Optional[int], typer.Option(
    "--top-k", help="Keep each position's k most likely tokens; 0: off. Default: off.", show_default=False)]
TopPOption = Annotated[Optional[float], typer.Option(
    "--top-p", help="Keep the most likely tokens whose probabilities sum to at least p; 1: off. Default: off.",
    show_default=False)]
SamplerOption = Annotated[Optional[str], typer.Option(
    "--sampler", help="reference: the model's own sampler. fast: an approximation that stops running settled "
                      "positions and reduces each position's --fast-k most likely tokens (docs/sampler.md). "
                      "Default: reference.", show_default=False)]
FastKOption = Annotated[Optional[int], typer.Option(
    "--fast-k", help="The fast sampler's tokens a position. Default: 64.", show_default=False)]
MinPOption = Annotated[Optional[float], typer.Option(
    "--min-p", help="Keep the tokens at least p times as likely as the most likely one; 0: off. Default: off.",
    show_default=False)]

# weight placement and the cache, as llama.cpp spells them
RpcOption = Annotated[Optional[str], typer.Option(
    "--rpc", help="ggml RPC servers HOST:PORT[,HOST:PORT...] (see dglocal rpc-server): layers go to them as "
                  "to GPUs.", show_default=False)]
OverrideOption = Annotated[Optional[list[str]], typer.Option(
    "-ot", "--override-tensor", help="REGEX=BUFFER_TYPE: tensors whose name matches go to that buffer type "
                                     "(e.g. exps=CPU); repeat or comma-separate.", show_default=False)]
CpuMoeOption = Annotated[int, typer.Option(
    "--n-cpu-moe", help="Keep the experts of the first N layers in host memory.")]
SplitOption = Annotated[Optional[str], typer.Option(
    "-ts", "--tensor-split", help="Each device's share of the layers, e.g. 3,1 (RPC servers first, then GPUs). "
                                  "Default: in proportion to their free memory.", show_default=False)]


CacheTypeOption = Annotated[Optional[str], typer.Option(
    "--cache-type", "--kv-type", help="KV cache type: f16, f32, q8_0 or q4_0 (the quantized ones halve or "
                                      "quarter it and run with flash attention). Default: f16.",
    show_default=False)]


SwaOption = Annotated[Optional[bool], typer.Option(
    "--swa-full/--swa-window", help="KV cache of the sliding-window layers: every token (full), or the last "
    "window (windowed: far smaller at long contexts; a truncation past it restores a checkpoint or re-encodes). "
    "Default: full up to twice the windowed size, windowed beyond (dglocal plan says which).", show_default=False)]


PrecisionOption = Annotated[Optional[str], typer.Option(
    "--precision", help="f32: f32 math on devices that round f32 operands through f16 (Vulkan), for results "
                        "that match the reference. Default: auto (the backend's own choice).", show_default=False)]

SoftEmbeddingOption = Annotated[Optional[str], typer.Option(
    "--soft-embedding", help="Type of the soft embedding's copy of the embedding: f32, f16 or q8_0 (about half of "
                             "f16's memory: 0.7 GiB for the 26B). Default: f32 for an f32 model, else f16.",
    show_default=False)]


LoraOption = Annotated[Optional[list[str]], typer.Option(
    "--lora", help="A LoRA adapter GGUF (dglocal convert --lora) applied at scale 1; repeat for several.",
    show_default=False)]
LoraScaledOption = Annotated[Optional[list[str]], typer.Option(
    "--lora-scaled", metavar="FILE SCALE", help="A LoRA adapter at this scale (as llama.cpp: two values); repeat "
                                               "for several.", show_default=False)]


MmprojOption = Annotated[Optional[Path], typer.Option(
    "--mmproj", help="The vision tower's GGUF (dglocal convert writes it beside the model): prompts take images.",
    show_default=False)]
ImageTokensOption = Annotated[int, typer.Option(
    "--image-tokens", help=f"Soft tokens an image becomes at most: {', '.join(map(str, SOFT_TOKENS[:-1]))} or "
                           f"{SOFT_TOKENS[-1]}.")]
TimeLimitOption = Annotated[Optional[float], typer.Option(
    "--time-limit", help="Sudoku: seconds a puzzle may take; a grid still breaking a rule is denoised again from "
                         "what the guide keeps of it until then. Default: 5.", show_default=False)]


FitOption = Annotated[bool, typer.Option(
    "--fit", help="Choose -ngl and --n-cpu-moe for the device's free memory (see dglocal plan).")]


# the options `run` and `serve` both take, in the order --help lists them: (name, type, default)
MODEL_OPTIONS = [
    ("quant", QuantOption, "Q4_K_M"), ("ctx_size", CtxOption, None), ("n_gpu_layers", NglOption, -1),
    ("threads", ThreadsOption, None), ("seed", SeedOption, None), ("steps", StepsOption, None),
    ("entropy_bound", EntropyOption, None), ("t_min", TMinOption, None), ("t_max", TMaxOption, None),
    ("temp", TempOption, None), ("top_k", TopKOption, None), ("top_p", TopPOption, None), ("min_p", MinPOption, None),
    ("sampler", SamplerOption, None), ("fast_k", FastKOption, None),
    ("cache_type", CacheTypeOption, None), ("swa_full", SwaOption, None), ("precision", PrecisionOption, None),
    ("soft_embedding", SoftEmbeddingOption, None), ("fit", FitOption, False), ("rpc", RpcOption, None), ("override_tensor", OverrideOption, None),
    ("n_cpu_moe", CpuMoeOption, 0), ("tensor_split", SplitOption, None), ("lora", LoraOption, None),
    ("lora_scaled", LoraScaledOption, None), ("mmproj", MmprojOption, None),
    ("image_tokens", ImageTokensOption, DEFAULT_IMAGE_TOKENS),
]
LOAD_NAMES = ("ctx_size", "n_gpu_layers", "threads", "cache_type", "swa_full", "precision", "soft_embedding", "rpc",
              "override_tensor",
              "n_cpu_moe", "tensor_split", "lora", "lora_scaled", "mmproj", "image_tokens")


class ModelArgs:
    """What the shared options of `run` and `serve` say, read once: load options, generation settings, the rest."""

    def __init__(self, values: dict):
        self.values = values

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def load(self, **extra) -> LoadOptions:
        return load_options(**{k: self.values[k] for k in LOAD_NAMES}, **extra)

    def generation(self) -> dict:
        v = self.values
        return generation(max_denoising_steps=v["steps"], entropy_bound=v["entropy_bound"], t_min=v["t_min"],
                          t_max=v["t_max"], temperature=v["temp"], top_k=v["top_k"], top_p=v["top_p"],
                          min_p=v["min_p"], sampler=v["sampler"], fast_k=v["fast_k"])


def model_options(command):
    """`command` takes MODEL_OPTIONS after its own parameters, declared here once, and receives them as one
    ModelArgs `args` (typer reads the signature this sets)."""
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "args"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
              for name, kind, default in MODEL_OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        args = ModelArgs({name: kwargs.pop(name) for name, _, _ in MODEL_OPTIONS})
        return command(**kwargs, args=args)

    wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared)
    return wrapper


def load_options(*, ctx_size=None, parallel: int = 1, n_gpu_layers: int = -1, threads=None, cache_type=None,
                 swa_full=None, precision=None, soft_embedding=None, rpc=None, override_tensor=None, n_cpu_moe: int = 0,
                 tensor_split=None, lora=None, lora_scaled=None, **extra) -> LoadOptions:
    """The command line's LoadOptions: unset options keep LoadOptions' defaults."""
    adapters = [(path, 1.0) for path in lora or ()] + [_scaled(pair) for pair in lora_scaled or ()]
    given = dict(lora=adapters or None, n_ctx=ctx_size, n_seq_max=parallel, n_gpu_layers=n_gpu_layers, n_threads=threads,
                 kv_type=cache_type, swa_full=swa_full, precision=precision, soft_embedding=soft_embedding,
                 rpc=[s for s in rpc.split(",") if s.strip()] if rpc else None, tensor_overrides=override_tensor or None,
                 n_cpu_moe=n_cpu_moe or None, tensor_split=tensor_split, **extra)
    return LoadOptions(**{k: v for k, v in given.items() if v is not None})


def _scaled(value: str) -> tuple[str, float]:
    """--lora-scaled's FILE SCALE (joined as FILE=SCALE on the way in)."""
    path, _, scale = value.rpartition("=")
    try:
        return path, float(scale)
    except ValueError:
        raise ConfigError(f"--lora-scaled takes FILE SCALE, got {value!r}") from None


def api_key_option(key: str | None) -> str | None:
    """--api-key, checked: a key any HTTP client can send in its Authorization header (printable ASCII, no space at
    either end), and not empty (which would turn authentication off without a word)."""
    if key is None:
        return None
    if not key.strip():
        raise ConfigError("--api-key is empty: give a key, or leave the option out to serve without one")
    for i, c in enumerate(key):
        if not " " <= c <= "~":
            raise ConfigError(f"--api-key has {c!r} (U+{ord(c):04X}) at character {i + 1}: a key is printable ASCII, "
                              "what an HTTP client can send in a header")
    if key != key.strip():
        raise ConfigError("--api-key starts or ends with a space, which HTTP drops from a header: remove it")
    return key


def image_dir_option(path: Path | None, mmproj: Path | None) -> Path | None:
    """--image-files, checked before the model loads: an existing directory, and a vision tower to use it."""
    if path is None:
        return None
    if mmproj is None:
        raise ConfigError("--image-files lets requests name image files: it needs the vision tower, --mmproj FILE")
    if not path.exists():
        raise ConfigError(f"--image-files {path}: no such directory")
    if not path.is_dir():
        raise ConfigError(f"--image-files {path}: not a directory (images are named relative to a directory)")
    return path


def generation(**settings) -> dict:
    """GenerationConfig overrides from the command line: the options given."""
    return {k: v for k, v in settings.items() if v is not None}


def fit(path, opts: LoadOptions) -> LoadOptions:
    """--fit: the plan for the free device memory replaces -ngl and --n-cpu-moe (not -ot, which it refuses)."""
    from dglocal.cli import render
    from dglocal.runtime import plan

    if opts.tensor_overrides:
        raise ConfigError("--fit chooses the placement itself: drop -ot, or drop --fit")
    with render.status("sizing placements for the device (--fit)"):
        chosen = plan.fit(path, n_ctx=opts.context, parallel=opts.n_seq_max, rpc=list(opts.rpc) if opts.rpc else None,
                          kv_type=opts.kv_type, swa_full=opts.swa_full, mmproj=opts.mmproj,
                          image_tokens=opts.image_tokens)
    if chosen is None:
        render.print_status("--fit: no GPU or RPC device: everything runs on the host")
        return opts.replace(n_gpu_layers=0)
    render.print_status(f"--fit ({chosen['free'] / 2**30:.1f} GiB free): {chosen['words']}")
    split = {"tensor_split": chosen["tensor_split"]} if chosen["tensor_split"] is not None else {}
    return opts.replace(n_gpu_layers=chosen["n_gpu_layers"], n_cpu_moe=chosen["n_cpu_moe"], **split)
