"""The `dglocal` commands: parse → options → call → render (dglocal.cli.render, dglocal.cli.views).

Errors end as one red line and exit code 1; DGLOCAL_DEBUG=1 prints the traceback first.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from dglocal.convert.hub import resolve_model
from dglocal.errors import ConfigError, DglocalError
from dglocal.files import os_error_text
from dglocal.runtime.options import DEFAULT_CTX, DEFAULT_IMAGE_TOKENS

from .options import (
    CacheTypeOption, CpuMoeOption, FastKOption, ImageTokensOption, LoraOption, LoraScaledOption, MmprojOption, ModelArgs, NglOption, OverrideOption,
    PrecisionOption, QuantOption, RpcOption, SamplerOption, SplitOption, SwaOption, ThreadsOption, TimeLimitOption, api_key_option,
    fit, generation, image_dir_option, load_options, model_options,
)

MAX_FILE_BYTES = 16 * 2**20  # --grammar, --json-schema, --draft: the most read of one


class _App(typer.Typer):
    """typer takes no repeated two-value option: llama.cpp's `--lora-scaled FILE SCALE` arrives as FILE=SCALE."""

    def __call__(self, *args, **kwargs):
        sys.argv[1:] = join_pairs(sys.argv[1:], "--lora-scaled")
        return super().__call__(*args, **kwargs)


def join_pairs(argv: list[str], option: str) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] == option and i + 2 < len(argv) and _is_number(argv[i + 2]):
            out += [option, f"{argv[i + 1]}={argv[i + 2]}"]
            i += 3
        else:
            out.append(argv[i])
            i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


app = _App(
    name="dglocal", help="Run block-diffusion language models (DiffusionGemma) locally on llama.cpp.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

# click's ClickException, wherever this typer keeps click (newer typers vendor it)
_USAGE_ERRORS = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def handle_errors(fn):
    """One red line and exit 1 for any error; the traceback only with DGLOCAL_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dglocal.cli import render as ui

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


def _plugin(command: str, module: str):
    """A command's module, imported when the command runs: a build without it says so."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in (module, "dglocal"):
            raise
        raise DglocalError(f"`dglocal {command}` is not available in this build (module {module} is missing)") from e


def _resolve(model, quant: str = "Q4_K_M") -> Path:
    """resolve_model, with a status line and a progress bar while an HF safetensors repo is converted."""
    from dglocal.cli import render as ui

    @contextlib.contextmanager
    def converting(message):
        ui.print_status(message)
        with ui.byte_progress("converting") as progress:
            yield progress

    return resolve_model(model, quant, converting=converting)


# -- commands ------------------------------------------------------------------------------------------------

@app.command()
@handle_errors
@model_options
def run(
    model: Annotated[Optional[str], typer.Argument(
        metavar="MODEL", help="GGUF file, HF repo id with GGUF files, or HF safetensors repo (converted once). "
             "Default: the built-in Sudoku model.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "-p", "--prompt", help="Answer this one prompt and exit (no chat).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "-n", "--max-new-tokens", help="Most tokens per answer. Default: from the model (256).",
        show_default=False)] = None,
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
    time_limit: TimeLimitOption = None,
    json_schema: Annotated[Optional[Path], typer.Option(
        "--json-schema", help="Answers are JSON matching this JSON-schema file (enforced while they denoise).",
        show_default=False)] = None,
    grammar: Annotated[Optional[Path], typer.Option(
        "--grammar", help="Answers match this grammar file: Lark, or GBNF (llama.cpp's) when it has '::='.",
        show_default=False)] = None,
    draft: Annotated[Optional[Path], typer.Option(
        "--draft", help="Start each answer's canvases from this file's text instead of noise (a warm start).",
        show_default=False)] = None,
    image: Annotated[Optional[list[Path]], typer.Option(
        "--image", help="An image for the first message (or the -p prompt); repeat for several. Needs --mmproj.",
        show_default=False)] = None,
    think: Annotated[bool, typer.Option(
        "--think", help="Let the model think first (the chat template's enable_thinking).")] = False,
    hide_thinking: Annotated[bool, typer.Option(
        "--hide-thinking", help="Do not show the model's thinking (shown dimmed by default).")] = False,
    *, args: ModelArgs,
):
    """Chat with a model in the terminal, the canvas drawn live as it denoises (or answer one -p prompt)."""
    import dglocal
    from dglocal.cli import render as ui
    from dglocal.cli.chat import ChatLoop
    from dglocal.cli.views import is_terminal, make_view
    from dglocal.generation.config import GenerationConfig
    from dglocal.runtime.gguf import read_header
    from dglocal.sudoku.solve import is_sudoku_model

    settings = {**args.generation(), **generation(
        max_new_tokens=max_new_tokens, stability_threshold="off" if no_early_stop else stability,
        confidence_threshold=confidence)}
    path = _resolve(model, args.quant)
    kv = read_header(path).kv
    config = GenerationConfig.from_metadata(kv, **settings)  # bad options fail before the slow load
    sudoku = model is None or is_sudoku_model(kv)
    spec = output_grammar(json_schema, grammar)
    if not sudoku and time_limit is not None:
        raise ConfigError("--time-limit applies to the Sudoku model (its guided restarts)")
    if sudoku and (think or hide_thinking):
        raise ConfigError(f"{'--think' if think else '--hide-thinking'} does not apply to the Sudoku model: it has no "
                          "chat template and never thinks")
    if sudoku and (spec is not None or draft is not None or image or args.mmproj):
        raise ConfigError("--json-schema, --grammar, --draft, --mmproj and --image do not apply to the Sudoku "
                          "model: it answers the 81 cells")
    if image and args.mmproj is None:
        raise ConfigError("--image needs the model's vision tower: --mmproj FILE")
    draft_text = read_text_file(draft, "--draft") if draft is not None else None
    if sudoku:  # a Sudoku model (the built-in one by default): a puzzle per message (or the -p puzzle), a board
        if max_new_tokens is not None:
            raise ConfigError("-n does not apply to the Sudoku model: it always answers the 81 cells")
        sudoku_main = _plugin("sudoku", "dglocal.cli.sudoku").main
        rest = {k: v for k, v in settings.items() if k != "max_denoising_steps"}
        sudoku_main(model=path, **generation(puzzle=prompt, steps=args.steps, threads=args.threads, seed=args.seed,
                                             n_ctx=args.ctx_size, lora=args.load().lora, time_limit=time_limit),
                    generation=rest, guide=not no_guide)
        return
    opts = fit(path, args.load()) if args.fit else args.load()
    with ui.status(f"loading {path.name}"):
        llm = dglocal.load(path, seed=args.seed, **vars(opts))
    with llm:
        if spec is not None:  # what needs the vocabulary: a first token, an end within -n tokens
            check_grammar_file(llm.model, spec, json_schema or grammar, config.max_new_tokens)
        interactive = is_terminal()
        view = make_view(llm, interactive=interactive)
        chat = ChatLoop(llm, view, grammar=spec, draft=draft_text, show_thinking=not hide_thinking,
                        template_kwargs={"enable_thinking": True} if think else None,
                        **generation(seed=args.seed), **settings)  # --seed: every answer starts from it
        for path in image or ():  # given on the command line: attached without a word (-p prints just the answer)
            chat.attach(str(path), announce=False)
        if prompt is not None:
            if chat.ask(prompt) is None:
                raise typer.Exit(130)
            return
        if interactive:
            name = llm.metadata.get("general.name") or path.name
            view.banner(f"dglocal · {name}", f"ctx {llm.n_ctx} · canvas {llm.canvas_length}")
        chat.run()


def read_text_file(path: Path, option: str, limit: int = MAX_FILE_BYTES) -> str:
    """`path`'s text, at most `limit` bytes of it read (a device such as /dev/zero, a pipe, a huge file: an error,
    not all of memory)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot read it ({os_error_text(e)})") from None
    if len(data) > limit:
        raise ConfigError(f"{option} {path}: more than {limit // 2**20} MiB, the most it reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{option} {path}: not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from None


def output_grammar(json_schema: Path | None, grammar: Path | None):
    """--json-schema / --grammar as the GrammarSpec answers must match (None without either)."""
    from dglocal.generation.grammar import GrammarSpec

    if json_schema is not None and grammar is not None:
        raise ConfigError("--json-schema and --grammar: one at a time")
    path = json_schema or grammar
    if path is None:
        return None
    source = read_text_file(path, "--json-schema" if json_schema is not None else "--grammar")
    kind = "json_schema" if json_schema is not None else "gbnf" if "::=" in source else "lark"
    spec = GrammarSpec(kind, source)
    try:
        spec.check()  # a schema that is not JSON, a grammar that does not parse: here, before the model loads
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec


def check_grammar_file(model, spec, path: Path, max_new_tokens: int) -> None:
    """The checks of an output grammar that need the model's vocabulary (dglocal.generation.grammar.CanvasGrammar),
    once, before the first answer: an error names the file."""
    from dglocal.generation.grammar import CanvasGrammar

    try:
        CanvasGrammar(model, spec, model.eos_ids, max_tokens=max_new_tokens)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


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
        "--context", help="With --dry-run: context size for the KV-cache estimate.")] = DEFAULT_CTX,
    tokenizer_from: Annotated[Optional[Path], typer.Option(
        "--tokenizer-from", help="Take the tokenizer (and chat template) from this GGUF instead of the "
                                 "checkpoint's files.", show_default=False)] = None,
    lora: Annotated[bool, typer.Option(
        "--lora", help="SOURCE is a PEFT LoRA adapter of a DiffusionGemma checkpoint: write a llama.cpp adapter "
                       "GGUF (for --lora on run, serve, bench).")] = False,
    mmproj: Annotated[Optional[Path], typer.Option(
        "--mmproj", help="Where the vision tower goes (an mmproj GGUF for --mmproj on run and serve). Default: "
                         "mmproj-OUTPUT beside OUTPUT, when the checkpoint has a tower.", show_default=False)] = None,
    mmproj_type: Annotated[str, typer.Option(
        "--mmproj-type", help="The vision tower's type: f32, f16, bf16 or q8_0.")] = "f16",
    no_mmproj: Annotated[bool, typer.Option("--no-mmproj", help="Leave the vision tower out.")] = False,
):
    """Convert an HF DiffusionGemma checkpoint to a diffusion-gemma GGUF."""
    from dglocal import convert as conv
    from dglocal.cli import render as ui

    if lora:
        from dglocal.convert.lora import convert_lora

        if dry_run or type != "f16" or tokenizer_from is not None:
            raise ConfigError("--lora writes the adapter as it is (f32): --type, --dry-run and --tokenizer-from do "
                              "not apply")
        if output is None:
            raise typer.BadParameter("OUTPUT is required", param_hint="OUTPUT")
        result = convert_lora(Path(source), output, force=force)
        ui.show_converted(result)
        return
    if dry_run:
        ui.show_dry_run(conv.dry_run(source, type, vram=vram, context=context))
        return
    if output is None:
        raise typer.BadParameter("OUTPUT is required (unless --dry-run)", param_hint="OUTPUT")
    with ui.byte_progress("converting") as progress:
        result = conv.convert(source, output, type, force=force, tokenizer_from=tokenizer_from, progress=progress,
                              mmproj=False if no_mmproj else mmproj, mmproj_type=mmproj_type)
    ui.show_converted(result)


@app.command()
@handle_errors
def info(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="GGUF file, or HF repo id with GGUF files (see run).")],
    quant: Annotated[str, typer.Option("--quant", help="Which GGUF of an HF repo.")] = "Q4_K_M",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Summarise a GGUF from its header: architecture, diffusion settings, tensor types, tokenizer."""
    from dglocal import convert as conv
    from dglocal.cli import render as ui

    summary = conv.info(resolve_model(model, quant))
    if as_json:
        print(json.dumps(asdict(summary), indent=2, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
    else:
        ui.show_info(summary)


@app.command()
@handle_errors
def bench(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="GGUF file or HF repo id (see run).")],
    quant: QuantOption = "Q4_K_M",
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
    n_gpu_layers: NglOption = -1,
    threads: ThreadsOption = None,
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
    sampler: SamplerOption = None,
    fast_k: FastKOption = None,
    active: Annotated[Optional[list[int]], typer.Option(
        "--active", help="With --sampler fast: also time a step with N of the canvas' positions run and the rest "
                         "frozen; repeat for several (e.g. --active 64 --active 16).", show_default=False)] = None,
    rpc: RpcOption = None,
    override_tensor: OverrideOption = None,
    n_cpu_moe: CpuMoeOption = 0,
    tensor_split: SplitOption = None,
    lora: LoraOption = None,
    lora_scaled: LoraScaledOption = None,
    roofline: Annotated[Optional[str], typer.Option(
        "--roofline", help="Estimate instead of run: a step, a commit and an autoregressive token on h100, h200, "
                           "rtx4090, rtx5090, m3max, or cpu (this machine, measured), from the model's own graphs "
                           "(docs/performance.md). The weights are not loaded.", show_default=False)] = None,
):
    """Measure speed: fixed-step and adaptive canvases, and the autoregressive baseline."""
    from dglocal.cli import render

    path = _resolve(model, quant)
    if roofline:
        from dglocal.tools.roofline import roofline as estimate

        result = estimate(path, roofline, **generation(n_ctx=ctx_size, threads=threads))
        print(json.dumps(result, indent=2)) if as_json else render.show_roofline(result)
        return
    measure = _plugin("bench", "dglocal.tools.bench").bench
    where = load_options(rpc=rpc, override_tensor=override_tensor, n_cpu_moe=n_cpu_moe, tensor_split=tensor_split,
                         precision=precision, lora=lora, lora_scaled=lora_scaled)
    placement = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(where).items()
                 if k in ("rpc", "tensor_overrides", "n_cpu_moe", "tensor_split", "lora") and v}
    placement |= generation(precision=precision)
    result = measure(path, **generation(
        steps=tuple(steps) if steps else None, adaptive=adaptive, adaptive_steps=adaptive_steps, canvases=canvases,
        prompt_tokens=prompt_tokens, ar_tokens=ar_tokens, n_ctx=ctx_size, n_gpu_layers=n_gpu_layers,
        threads=threads, flash_attn=flash_attn, kv_type=kv_type, seed=seed, batch=batch, sampler=sampler,
        fast_k=fast_k, active=tuple(active) if active else None), placement=placement)
    print(json.dumps(result, indent=2)) if as_json else render.show_bench(result)


@app.command()
@handle_errors
@model_options
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
    image_files: Annotated[Optional[Path], typer.Option(
        "--image-files", help="Let image_url parts name local files (file:// or an absolute path) under this "
                              "directory. Default: data: URLs only.", show_default=False)] = None,
    *, args: ModelArgs,
):
    """Serve the OpenAI API (chat and text completions, streaming, the live canvas) on HTTP."""
    import dglocal
    from dglocal.cli import render as ui
    from dglocal.generation.config import GenerationConfig
    from dglocal.runtime.checks import integer, listenable
    from dglocal.runtime.diagnostics import weights_where
    from dglocal.runtime.gguf import read_header
    from dglocal.serving.app import serve as run_server
    from dglocal.sudoku.solve import is_sudoku_model, load_model as load_sudoku

    integer("--parallel", parallel, 1, 256)
    integer("--port", port, 1, 65535)
    if queue is not None:  # 0 would answer every request 503
        integer("--queue", queue, 1, 1_000_000)
    api_key = api_key_option(api_key)
    image_files = image_dir_option(image_files, args.mmproj)
    listenable(host, port)  # before the load, which may take minutes
    path = _resolve(model, args.quant)
    defaults = args.generation()  # the requests' defaults
    kv = read_header(path).kv
    GenerationConfig.from_metadata(kv, **defaults)  # bad defaults fail before the load
    sudoku = model is None or is_sudoku_model(kv)
    opts = args.load(parallel=parallel)
    if args.fit and not sudoku:
        opts = fit(path, opts)
    with ui.status(f"loading {path.name}"):
        llm = load_sudoku(path, threads=args.threads, batch=parallel, lora=opts.lora) if sudoku else \
            dglocal.load(path, seed=args.seed, **vars(opts))
    with llm:
        model_id = "sudoku" if model is None else alias or path.name.removesuffix(".gguf")
        ui.print_status(f"dglocal serve: {model_id} on http://{host}:{port}/v1 · {parallel} slot(s) · weights on "
                        f"{weights_where(llm.model)}")
        run_server(llm, model_id=model_id, host=host, port=port, parallel=parallel, api_key=api_key,
                   defaults=defaults, sudoku=sudoku, queue_size=queue, image_files=image_files)


@app.command()
@handle_errors
def plan(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="GGUF file or HF repo id (see run).")],
    vram: Annotated[str, typer.Option("--vram", help="Device memory to fit: 12G (each device) or 24G,12G (one size "
                                                     "per device, RPC servers first; the layers split in proportion).")],
    quant: QuantOption = "Q4_K_M",
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens.")] = DEFAULT_CTX,
    parallel: Annotated[int, typer.Option("-np", "--parallel", help="Slots (sequences) served at once.")] = 1,
    cache_type: CacheTypeOption = None,
    swa_full: SwaOption = None,
    rpc: RpcOption = None,
    mmproj: MmprojOption = None,
    image_tokens: ImageTokensOption = DEFAULT_IMAGE_TOKENS,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
):
    """Choose -ngl and --n-cpu-moe for a device of --vram, from the buffers llama.cpp allocates (no weights read).
    With --mmproj, the vision tower's weights and compute buffer are set aside on the first device."""
    from dglocal.cli import render
    from dglocal.runtime.plan import plan as make_plan

    path = _resolve(model, quant)
    opts = load_options(ctx_size=ctx_size, parallel=parallel, cache_type=cache_type, swa_full=swa_full, rpc=rpc,
                        mmproj=mmproj, image_tokens=image_tokens)
    result = make_plan(path, vram, n_ctx=opts.n_ctx, parallel=parallel, kv_type=opts.kv_type, swa_full=opts.swa_full,
                       rpc=list(opts.rpc) if opts.rpc else None, mmproj=opts.mmproj, image_tokens=opts.image_tokens)
    print(json.dumps(result, indent=2)) if as_json else render.show_plan(result)


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
    from dglocal.runtime.placement import serve_rpc

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
    from dglocal.cli import render as ui
    from dglocal.convert.synth import synth as write

    with ui.byte_progress("writing") as progress:
        result = write(preset, type, output, seed=seed, force=force, progress=progress,
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
    threads: ThreadsOption = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Sampling seed.", show_default=False)] = None,
    no_guide: Annotated[bool, typer.Option(
        "--no-guide", help="The model alone: do not re-noise cells that break a rule.")] = False,
    batch: Annotated[Optional[int], typer.Option(
        "--batch", help="With --eval: puzzles denoised per forward. Default: 16.", show_default=False)] = None,
    time_limit: TimeLimitOption = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Contexts a puzzle's attempts race on, one thread each; the first solved grid stops the "
                          "others. Default: one per core (at most 8); 1 with --eval.", show_default=False)] = None,
    lora: LoraOption = None,
    lora_scaled: LoraScaledOption = None,
    sampler: SamplerOption = None,
    fast_k: FastKOption = None,
):
    """Solve a Sudoku with the diffusion model, the board filling in live (or evaluate a puzzle file)."""
    main = _plugin("sudoku", "dglocal.cli.sudoku").main
    adapters = load_options(lora=lora, lora_scaled=lora_scaled).lora
    main(model=_resolve(model), **generation(puzzle=puzzle, eval_file=eval_file, output=output, steps=steps,
                                             threads=threads, seed=seed, batch=batch, lora=adapters,
                                             time_limit=time_limit, workers=workers),
         generation=generation(sampler=sampler, fast_k=fast_k), guide=not no_guide)


if __name__ == "__main__":
    app()
