"""The `dglocal` command: parse → config → call → render. Rendering lives in dglocal.ui.

Errors end as one red line and exit code 1; DGLOCAL_DEBUG=1 prints the traceback first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import ConfigError, DglocalError, ModelError

app = typer.Typer(
    name="dglocal", help="Run block-diffusion language models (DiffusionGemma) locally on llama.cpp.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

# click's ClickException, wherever this typer keeps click (newer typers vendor it)
_USAGE_ERRORS = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
DEFAULT_MODEL = Path(__file__).parent / "data" / "sudoku.gguf"
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def cache_dir() -> Path:
    """Where HF safetensors repos are converted to GGUF, once per repo revision and type."""
    from .upstream import cache_dir as dglocal_cache

    return dglocal_cache() / "converted"


def handle_errors(fn):
    """One red line and exit 1 for any error; the traceback only with DGLOCAL_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import ui

        try:
            with _terminate_as_interrupt():
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _USAGE_ERRORS, SystemExit):  # typer reports usage errors (exit 2)
            raise
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `dglocal info m.gguf | head -1`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # no second error when Python flushes stdout at exit
            raise typer.Exit(0) from None
        except Exception as e:  # noqa: BLE001 (the CLI's last line of defence: no traceback walls)
            debug = os.environ.get("DGLOCAL_DEBUG", "") not in ("", "0")
            message = str(e) if isinstance(e, DglocalError) else f"{type(e).__name__}: {e}"
            if not debug and not isinstance(e, DglocalError):
                message += " (DGLOCAL_DEBUG=1 shows the traceback)"
            ui.print_error(message, traceback.format_exc() if debug else None)
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so partial files are removed and native handles freed on the way out."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- model resolution ----------------------------------------------------------------------------------------

def resolve_model(spec: str | None, quant: str = "Q4_K_M") -> Path:
    """A GGUF path; an HF repo id holding GGUFs (the file matching `quant`, downloaded into the HF cache);
    an HF safetensors repo (converted once into cache_dir()); None: the built-in default model."""
    if spec is None:
        if not DEFAULT_MODEL.is_file():
            raise ModelError("no default model shipped yet: give a GGUF file or an HF repo id (dglocal run MODEL)")
        return DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"{spec}: not a GGUF file (a checkpoint directory? dglocal convert makes one)")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise ModelError(f"{spec}: no such file, and not an HF repo id (owner/name)")
    files = _repo_files(spec)
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    if ggufs:
        return _download_gguf(spec, ggufs, quant)
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return _convert_repo(spec, quant)
    raise ModelError(f"{spec}: the repo holds neither GGUF files nor a safetensors checkpoint")


def _hub_error(spec: str, e: Exception) -> ModelError:
    hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if _offline() else ""
    first = (str(e).splitlines() or [""])[0]
    return ModelError(f"{spec}: cannot reach the repo{hint}: {type(e).__name__}: {first}")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(spec: str) -> list[str]:
    """The repo's files; offline, those in its cached snapshot."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        if _offline():
            root = Path(snapshot_download(spec, local_files_only=True))
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return list_repo_files(spec)
    except Exception as e:  # hub errors are many classes; the message is what the user needs
        raise _hub_error(spec, e) from e


def pick_gguf(ggufs: list[str], quant: str, *, explicit: bool = True) -> list[str]:
    """The GGUF files for `quant` (all shards of a split file), matched on the name, case-insensitively."""
    # a whole type name: Q4_K matches m-Q4_K.gguf, not m-Q4_K_M.gguf
    pattern = re.compile(rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9]|_[a-z0-9])")
    matches = sorted(f for f in ggufs if pattern.search(Path(f).name.lower()))
    if not matches and not explicit and len(ggufs) == 1:
        matches = ggufs
    whole = [f for f in matches if not SPLIT.search(f)]
    if len(whole) > 1:
        raise ModelError(f"several GGUF files match {quant}: {', '.join(whole)}")
    if whole:
        return whole
    if matches:  # a split file: every shard, the first one first
        return matches
    raise ModelError(f"no GGUF for --quant {quant}; the repo has: {', '.join(Path(f).name for f in ggufs)}")


def _download_gguf(spec: str, ggufs: list[str], quant: str) -> Path:
    from huggingface_hub import hf_hub_download

    chosen = pick_gguf(ggufs, quant, explicit=quant.upper() != "Q4_K_M")
    try:  # huggingface_hub draws its own progress bar (stderr) and keeps the file in the HF cache
        paths = [Path(hf_hub_download(spec, f)) for f in chosen]
    except Exception as e:  # noqa: BLE001
        raise _hub_error(spec, e) from e
    return paths[0]


def _convert_repo(spec: str, quant: str) -> Path:
    from . import ui
    from .convert import convert
    from .convert.source import resolve_source

    directory = resolve_source(spec)  # downloads the checkpoint; the snapshot folder is named by the commit
    out = cache_dir() / spec.replace("/", "--") / f"{directory.name[:12]}-{quant.lower()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    ui.print_status(f"converting {spec} to {quant} (once) into {out}")
    with ui.byte_progress("converting") as progress:
        convert(directory, out, quant, force=True, progress=progress)
    return out


# -- weight placement, as llama.cpp's options ------------------------------------------------------------------

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


FitOption = Annotated[bool, typer.Option(
    "--fit", help="Choose -ngl and --n-cpu-moe for the device's free memory (see dglocal plan).")]


def _fit(path, n_ctx: int, parallel: int, cache: dict, where: dict) -> tuple[int, dict]:
    """--fit: the plan for the free device memory replaces -ngl and --n-cpu-moe (not -ot, which it refuses)."""
    from . import ui

    if where.get("tensor_overrides"):
        raise ConfigError("--fit chooses the placement itself: drop -ot, or drop --fit")
    with ui.status("sizing placements for the device (--fit)"):
        chosen = _plugin("plan").fit(path, n_ctx=n_ctx, parallel=parallel, rpc=where.get("rpc"), **cache)
    if chosen is None:
        ui.print_status("--fit: no GPU or RPC device: everything runs on the host")
        return 0, where
    ui.print_status(f"--fit ({chosen['free'] / 2**30:.1f} GiB free): {chosen['words']}")
    split = _given(tensor_split=chosen["tensor_split"])  # several devices: layers in proportion to their memory
    return chosen["n_gpu_layers"], {**where, "n_cpu_moe": chosen["n_cpu_moe"], **split}


def _weights_where(llm) -> str:
    """Where llama.cpp put the weights, largest first: "Vulkan0 2.4 MiB, CPU_Mapped 0.1 MiB"."""
    held = sorted(((d["model"], name) for name, d in llm.memory_breakdown().items() if d["model"]), reverse=True)
    return ", ".join(f"{name} {size / 2**20:.1f} MiB" for size, name in held)


def placement_options(rpc: str | None, override: list[str] | None, n_cpu_moe: int, split: str | None = None) -> dict:
    return _given(rpc=[s for s in rpc.split(",") if s.strip()] if rpc else None,
                  tensor_overrides=override or None, n_cpu_moe=n_cpu_moe or None, tensor_split=split)


# -- commands ------------------------------------------------------------------------------------------------

@app.command()
@handle_errors
def run(
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="GGUF file, HF repo id with GGUF files, or HF safetensors repo (converted once). "
             "Default: the built-in Sudoku model.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "-p", "--prompt", help="Answer this one prompt and exit (no chat).")] = None,
    quant: Annotated[str, typer.Option(
        "--quant", help="Which GGUF of an HF repo to use (matched in the file name), or the type to convert "
                        "a safetensors repo to.")] = "Q4_K_M",
    ctx_size: Annotated[Optional[int], typer.Option(
        "-c", "--ctx-size", help="Context size in tokens (prompt, history and canvases). Default: 4096; the "
                                 "Sudoku model: what a puzzle needs.", show_default=False)] = None,
    n_gpu_layers: Annotated[int, typer.Option(
        "-ngl", "--n-gpu-layers", help="Layers to offload to the GPU; -1: all.")] = -1,
    threads: Annotated[Optional[int], typer.Option(
        "-t", "--threads", help="CPU threads. Default: all cores.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Sampling seed (every answer starts from it). Default: random.", show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "-n", "--max-new-tokens", help="Most tokens per answer. Default: from the model (256).",
        show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Most denoising steps per canvas (max_denoising_steps). Default: from the model.",
        show_default=False)] = None,
    entropy_bound: Annotated[Optional[float], typer.Option(
        "--entropy-bound", help="Entropy budget of the positions accepted per step; larger accepts more per "
                                "step. Default: from the model.", show_default=False)] = None,
    t_min: Annotated[Optional[float], typer.Option(
        "--t-min", help="Temperature at the last step. Default: from the model.", show_default=False)] = None,
    t_max: Annotated[Optional[float], typer.Option(
        "--t-max", help="Temperature at the first step. Default: from the model.", show_default=False)] = None,
    stability: Annotated[Optional[int], typer.Option(
        "--stability", help="Early stop: steps the draft must stay unchanged (stability_threshold). "
                            "Default: from the model.", show_default=False)] = None,
    confidence: Annotated[Optional[float], typer.Option(
        "--confidence", help="Early stop: mean entropy below which a stable draft is final "
                             "(confidence_threshold). Default: from the model.", show_default=False)] = None,
    no_early_stop: Annotated[bool, typer.Option(
        "--no-early-stop", help="Always run --steps steps per canvas (no stable-and-confident stop).")] = False,
    no_guide: Annotated[bool, typer.Option(
        "--no-guide", help="The built-in Sudoku model alone: do not re-noise cells that break a rule.")] = False,
    cache_type: CacheTypeOption = None,
    swa_full: SwaOption = None,
    precision: PrecisionOption = None,
    fit: FitOption = False,
    rpc: RpcOption = None,
    override_tensor: OverrideOption = None,
    n_cpu_moe: CpuMoeOption = 0,
    tensor_split: SplitOption = None,
):
    """Chat with a model in the terminal, the canvas drawn live as it denoises (or answer one -p prompt)."""
    import dglocal

    from . import ui
    from .config import GenerationConfig
    from .gguf_read import read_header

    options = dict(max_new_tokens=max_new_tokens, max_denoising_steps=steps, entropy_bound=entropy_bound,
                   t_min=t_min, t_max=t_max, stability_threshold="off" if no_early_stop else stability,
                   confidence_threshold=confidence, seed=seed)
    path = resolve_model(model, quant)
    GenerationConfig.from_metadata(read_header(path).kv, **options)  # bad options fail before the slow load
    if model is None:  # the built-in Sudoku model: a puzzle per message (or the -p puzzle), drawn as a board
        if max_new_tokens is not None:
            raise ConfigError("-n does not apply to the Sudoku model: it always answers the 81 cells")
        generation = _given(**{k: v for k, v in options.items() if k not in ("max_new_tokens", "seed",
                                                                               "max_denoising_steps")})
        _plugin("sudoku").main(model=path, **_given(puzzle=prompt, steps=steps, threads=threads, seed=seed,
                                                    n_ctx=ctx_size), generation=generation, guide=not no_guide)
        return
    interactive = ui.is_terminal()
    where = placement_options(rpc, override_tensor, n_cpu_moe, tensor_split)
    cache = _given(kv_type=cache_type, swa_full=swa_full)
    if fit:
        n_gpu_layers, where = _fit(path, ctx_size or 4096, 1, cache, where)
    with ui.status(f"loading {path.name}"):
        llm = dglocal.load(path, n_ctx=ctx_size or 4096, n_gpu_layers=n_gpu_layers, n_threads=threads,
                           seed=seed or 0, **cache, **where, **_given(precision=precision))
    with llm:
        view = ui.make_view(llm, interactive=interactive)
        chat = ui.ChatLoop(llm, view, **options)
        if prompt is not None:
            if chat.ask(prompt) is None:
                raise typer.Exit(130)
            return
        if interactive:
            name = llm.metadata.get("general.name") or path.name
            view.banner(f"dglocal · {name}", f"ctx {llm.n_ctx} · canvas {llm.canvas_length}")
        chat.run()


@app.command("convert")
@handle_errors
def convert_cmd(
    source: Annotated[str, typer.Argument(
        metavar="SOURCE", help="HF checkpoint directory or HF repo id (safetensors).")],
    output: Annotated[Optional[Path], typer.Argument(
        metavar="OUTPUT", help="GGUF file to write (not needed with --dry-run).", show_default=False)] = None,
    type: Annotated[str, typer.Option(
        "--type", help="f32, f16, bf16, q8_0, or a llama.cpp quant type (q4_k_m, q6_k, ...).")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the tensor plan, file size and memory need from config.json alone; "
                          "write nothing.")] = False,
    vram: Annotated[Optional[str], typer.Option(
        "--vram", help="With --dry-run: GPU memory to check the plan against (e.g. 18G, 16GiB).",
        show_default=False)] = None,
    context: Annotated[int, typer.Option(
        "--context", help="With --dry-run: context size for the KV-cache estimate.")] = 4096,
    tokenizer_from: Annotated[Optional[Path], typer.Option(
        "--tokenizer-from", help="Take the tokenizer (and chat template) from this GGUF instead of the "
                                 "checkpoint's files.", show_default=False)] = None,
):
    """Convert an HF DiffusionGemma checkpoint to a diffusion-gemma GGUF."""
    from . import convert as conv
    from . import ui

    if dry_run:
        ui.show_dry_run(conv.dry_run(source, type, vram=vram, context=context))
        return
    if output is None:
        raise typer.BadParameter("OUTPUT is required (unless --dry-run)", param_hint="OUTPUT")
    with ui.byte_progress("converting") as progress:
        result = conv.convert(source, output, type, force=force, tokenizer_from=tokenizer_from, progress=progress)
    ui.show_converted(result)


@app.command()
@handle_errors
def info(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="GGUF file, or HF repo id with GGUF files (see run).")],
    quant: Annotated[str, typer.Option("--quant", help="Which GGUF of an HF repo.")] = "Q4_K_M",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Summarise a GGUF from its header: architecture, diffusion settings, tensor types, tokenizer."""
    from . import convert as conv
    from . import ui

    summary = conv.info(resolve_model(model, quant))
    if as_json:
        print(json.dumps(asdict(summary), indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    else:
        ui.show_info(summary)


def _plugin(name: str):
    """dglocal.bench / dglocal.sudoku, imported only when their command runs."""
    import importlib

    try:
        return importlib.import_module(f"dglocal.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"dglocal.{name}", "dglocal"):
            raise
        raise DglocalError(f"`dglocal {name}` is not available in this build (module dglocal.{name} is missing)") from e


def _given(**opts) -> dict:
    return {k: v for k, v in opts.items() if v is not None}


@app.command()
@handle_errors
def bench(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="GGUF file or HF repo id (see run).")],
    quant: Annotated[str, typer.Option("--quant", help="Which GGUF of an HF repo.")] = "Q4_K_M",
    steps: Annotated[Optional[list[int]], typer.Option(
        "--steps", help="Fixed step count to measure; repeat for several (e.g. --steps 8 --steps 16). "
                        "Default: 8, 16 and 48.", show_default=False)] = None,
    adaptive: Annotated[Optional[bool], typer.Option(
        "--adaptive/--no-adaptive", help="Also time an adaptive generation (the model's early stop). "
                                         "Default: on.", show_default=False)] = None,
    adaptive_steps: Annotated[Optional[int], typer.Option(
        "--adaptive-steps", help="Step cap of the adaptive generation. Default: the model's.",
        show_default=False)] = None,
    canvases: Annotated[Optional[int], typer.Option(
        "--canvases", help="Canvases per timed generation. Default: 1.", show_default=False)] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(
        "--prompt-tokens", help="Prompt length in tokens. Default: 64.", show_default=False)] = None,
    ar_tokens: Annotated[Optional[int], typer.Option(
        "--ar-tokens", help="Tokens of the autoregressive baseline. Default: 64.", show_default=False)] = None,
    ctx_size: Annotated[Optional[int], typer.Option(
        "-c", "--ctx-size", help="Context size in tokens. Default: what the runs need.", show_default=False)] = None,
    n_gpu_layers: Annotated[Optional[int], typer.Option(
        "-ngl", "--n-gpu-layers", help="Layers on the GPU; -1: all. Default: -1.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(
        "-t", "--threads", help="CPU threads. Default: all cores.", show_default=False)] = None,
    flash_attn: Annotated[Optional[bool], typer.Option(
        "--flash-attn/--no-flash-attn", help="Flash attention. Default: llama.cpp's choice.",
        show_default=False)] = None,
    kv_type: CacheTypeOption = None,
    precision: PrecisionOption = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Sampling seed. Default: 0.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", help="Also time this many generations denoised together, one forward a step. Default: 1 (off).",
        show_default=False)] = None,
    rpc: RpcOption = None,
    override_tensor: OverrideOption = None,
    n_cpu_moe: CpuMoeOption = 0,
    tensor_split: SplitOption = None,
    roofline: Annotated[Optional[str], typer.Option(
        "--roofline", help="Estimate instead of run: a step, a commit and an autoregressive token on h100, h200, "
                           "rtx4090, rtx5090, m3max, or cpu (this machine, measured), from the model's own graphs "
                           "(docs/performance.md). The weights are not loaded.", show_default=False)] = None,
):
    """Measure speed: fixed-step and adaptive canvases, and the autoregressive baseline."""
    path = resolve_model(model, quant)
    if roofline:
        _plugin("roofline").main(path, roofline, **_given(n_ctx=ctx_size, threads=threads), json=as_json)
        return
    _plugin("bench").main(path, **_given(
        steps=steps or None, adaptive=adaptive, adaptive_steps=adaptive_steps, canvases=canvases,
        prompt_tokens=prompt_tokens, ar_tokens=ar_tokens, n_ctx=ctx_size, n_gpu_layers=n_gpu_layers,
        threads=threads, flash_attn=flash_attn, kv_type=kv_type, seed=seed, batch=batch), json=as_json,
        placement=placement_options(rpc, override_tensor, n_cpu_moe, tensor_split) | _given(precision=precision))


@app.command()
@handle_errors
def serve(
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="GGUF file or HF repo id (see run). Default: the built-in Sudoku model (id 'sudoku').",
        show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    parallel: Annotated[int, typer.Option(
        "-np", "--parallel", help="Slots: requests generated at once, one canvas each per forward.")] = 1,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/ requests.", show_default=False)] = None,
    queue: Annotated[Optional[int], typer.Option(
        "--queue", help="Requests that may wait for a slot; beyond, 503. Default: 4 x --parallel.",
        show_default=False)] = None,
    alias: Annotated[Optional[str], typer.Option(
        "--alias", help="Model id in the API. Default: the file name.", show_default=False)] = None,
    quant: Annotated[str, typer.Option("--quant", help="Which GGUF of an HF repo.")] = "Q4_K_M",
    ctx_size: Annotated[Optional[int], typer.Option(
        "-c", "--ctx-size", help="Context size in tokens, shared by the slots (as llama-server). Default: 4096 per "
                                 "slot.", show_default=False)] = None,
    n_gpu_layers: Annotated[int, typer.Option("-ngl", "--n-gpu-layers", help="Layers on the GPU; -1: all.")] = -1,
    threads: Annotated[Optional[int], typer.Option(
        "-t", "--threads", help="CPU threads. Default: all cores.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Seed of the seeds drawn for requests that give none. Default: random.",
        show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Default max_denoising_steps. Default: from the model.", show_default=False)] = None,
    entropy_bound: Annotated[Optional[float], typer.Option(
        "--entropy-bound", help="Default entropy_bound. Default: from the model.", show_default=False)] = None,
    t_min: Annotated[Optional[float], typer.Option(
        "--t-min", help="Default t_min. Default: from the model.", show_default=False)] = None,
    t_max: Annotated[Optional[float], typer.Option(
        "--t-max", help="Default t_max. Default: from the model.", show_default=False)] = None,
    cache_type: CacheTypeOption = None,
    swa_full: SwaOption = None,
    precision: PrecisionOption = None,
    fit: FitOption = False,
    rpc: RpcOption = None,
    override_tensor: OverrideOption = None,
    n_cpu_moe: CpuMoeOption = 0,
    tensor_split: SplitOption = None,
):
    """Serve the OpenAI API (chat and text completions, streaming, the live canvas) on HTTP."""
    import dglocal

    from . import sudoku as sudoku_mod
    from . import ui
    from .checks import integer
    from .config import GenerationConfig
    from .gguf_read import read_header
    from .server import serve as run_server

    integer("--parallel", parallel, 1, 256)
    integer("--port", port, 1, 65535)
    path = resolve_model(model, quant)
    defaults = _given(max_denoising_steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max)
    GenerationConfig.from_metadata(read_header(path).kv, **defaults)  # bad defaults fail before the load
    where = placement_options(rpc, override_tensor, n_cpu_moe, tensor_split)
    cache = _given(kv_type=cache_type, swa_full=swa_full)
    if fit and model is not None:
        n_gpu_layers, where = _fit(path, ctx_size or 4096 * parallel, parallel, cache, where)
    with ui.status(f"loading {path.name}"):
        if model is None:
            llm = sudoku_mod.load_model(path, threads=threads, batch=parallel)
        else:
            llm = dglocal.load(path, n_ctx=ctx_size or 4096 * parallel, n_gpu_layers=n_gpu_layers, n_threads=threads,
                               seed=seed, n_seq_max=parallel, n_ubatch=max(512, parallel * 256),
                               **cache, **where, **_given(precision=precision))
    with llm:
        model_id = "sudoku" if model is None else alias or path.name.removesuffix(".gguf")
        ui.print_status(f"dglocal serve: {model_id} on http://{host}:{port}/v1 · {parallel} slot(s) · weights on "
                        f"{_weights_where(llm)}")
        run_server(llm, model_id=model_id, host=host, port=port, parallel=parallel, api_key=api_key,
                   defaults=defaults, sudoku=model is None, queue_size=queue)


@app.command()
@handle_errors
def plan(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="GGUF file or HF repo id (see run).")],
    vram: Annotated[str, typer.Option("--vram", help="Device memory to fit: 12G (each device) or 24G,12G (one size "
                                                     "per device, RPC servers first; the layers split in proportion).")],
    quant: Annotated[str, typer.Option("--quant", help="Which GGUF of an HF repo.")] = "Q4_K_M",
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens.")] = 4096,
    parallel: Annotated[int, typer.Option("-np", "--parallel", help="Slots (sequences) served at once.")] = 1,
    cache_type: CacheTypeOption = None,
    swa_full: SwaOption = None,
    rpc: RpcOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
):
    """Choose -ngl and --n-cpu-moe for a device of --vram, from the buffers llama.cpp allocates (no weights read)."""
    path = resolve_model(model, quant)
    _plugin("plan").main(path, vram, json=as_json, n_ctx=ctx_size, parallel=parallel,
                         **_given(kv_type=cache_type, swa_full=swa_full), **placement_options(rpc, None, 0))


@app.command("rpc-server")
@handle_errors
def rpc_server(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Only trusted networks: the "
                                                     "protocol has no authentication.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 50052,
    threads: Annotated[Optional[int], typer.Option(
        "-t", "--threads", help="CPU threads. Default: all cores.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="Device to serve (a name from llama.cpp's device list). Default: the CPU.",
        show_default=False)] = None,
):
    """Serve this machine's CPU (or a device) to other dglocal / llama.cpp processes over ggml RPC (--rpc)."""
    from .placement import serve_rpc

    serve_rpc(host, port, threads=threads, device=device)


@app.command()
@handle_errors
def synth(
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="GGUF file to write.")],
    preset: Annotated[str, typer.Option(
        "--preset", help="Shapes: 26b-a4b (the real model), or a scaled-down small / tiny.")] = "26b-a4b",
    type: Annotated[str, typer.Option(
        "--type", help="f32, f16, bf16, q8_0, or a llama.cpp quant type (q4_k_m, ...).")] = "q4_k_m",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT if it exists.")] = False,
    shapes_only: Annotated[bool, typer.Option(
        "--shapes-only", help="No weights: the header and tensor table over a sparse zero-filled file "
                              "(seconds, no disk), for bench --roofline and memory plans.")] = False,
):
    """Write a random-weight diffusion-gemma GGUF with a real model's shapes (for dglocal bench)."""
    from . import ui

    module = _plugin("synth")
    with ui.byte_progress("writing") as progress:
        result = module.synth(preset, type, output, seed=seed, force=force, progress=progress,
                              shapes_only=shapes_only)
    ui.show_converted(result)


@app.command()
@handle_errors
def sudoku(
    puzzle: Annotated[Optional[str], typer.Argument(
        metavar="PUZZLE", help="81 characters, row by row; '.' or '0' for a blank.", show_default=False)] = None,
    eval_file: Annotated[Optional[Path], typer.Option(
        "--eval", help="Evaluate a file of puzzles (one per line, optionally followed by its solution).",
        show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", help="With --eval: write each returned grid (81 digits a line).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A Sudoku GGUF. Default: the built-in model.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Most denoising steps.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("-t", "--threads", help="CPU threads.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.", show_default=False)] = None,
    no_guide: Annotated[bool, typer.Option(
        "--no-guide", help="The model alone: do not re-noise cells that break a rule.")] = False,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", help="With --eval: puzzles denoised per forward. Default: 16.", show_default=False)] = None,
):
    """Solve a Sudoku with the diffusion model, the board filling in live (or evaluate a puzzle file)."""
    path = resolve_model(model)
    _plugin("sudoku").main(model=path, **_given(puzzle=puzzle, eval_file=eval_file, output=output, steps=steps,
                                                threads=threads, seed=seed, batch=batch), guide=not no_guide)


if __name__ == "__main__":
    app()
