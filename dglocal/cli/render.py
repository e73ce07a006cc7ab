"""Everything else the CLI draws: errors and status lines, progress bars, and the reports of convert, info,
plan, bench, roofline and the Sudoku board. Library code returns plain results; this module renders them."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import numpy as np

from rich.markup import escape

from .views import RichView, _text

def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def print_error(message: str, traceback_text: str | None = None) -> None:
    """One red line on stderr (plain when stderr is not a terminal), after the traceback if given."""
    from rich.text import Text

    if traceback_text:
        sys.stderr.write(printable(traceback_text))
    _console(stderr=True).print(Text(f"error: {printable(message)}", style="bold red"), soft_wrap=True)


def printable(text: str) -> str:
    """Text a terminal can take: a file name that is not UTF-8 (its bytes kept as surrogates) shows its bytes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def print_status(message: str) -> None:
    """A dim status line on stderr (stdout stays the answer's)."""
    from rich.text import Text

    _console(stderr=True).print(Text(printable(message), style="dim"), soft_wrap=True)


@contextmanager
def status(message: str):
    """A spinner on a terminal while something slow runs (loading a model); nothing otherwise."""
    console = _console(stderr=True)
    if console.is_terminal:
        with console.status(printable(message)):
            yield
    else:
        yield


@contextmanager
def byte_progress(description: str):
    """A progress bar over bytes; yields the `progress(name, done, total)` callback convert() takes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
               TextColumn("[dim]{task.fields[item]}")]
    with Progress(*columns, console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None, item="")

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, item=name)

        yield progress


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def show_converted(result) -> None:
    """A ConvertResult (or synth's SynthResult): the file written and its notes."""
    console = _console()
    console.print(f"wrote [bold]{escape(printable(str(result.path)))}[/] ({result.type}, {result.n_tensors} tensors, "
                  f"{_size(result.size)})")
    for note in getattr(result, "notes", ()):
        console.print(f"[dim]note: {note}[/]")


def show_dry_run(plan) -> None:
    from collections import Counter

    from rich.table import Table

    console = _console()
    counts, sizes = Counter(), Counter()
    for row in plan.tensors:
        counts[row.type] += 1
        sizes[row.type] += row.nbytes
    t = Table(title=f"plan: {plan.type}{' (estimated mix)' if plan.estimated else ''}", title_justify="left")
    t.add_column("type")
    t.add_column("tensors", justify="right")
    t.add_column("size", justify="right")
    for name in sorted(counts, key=lambda k: -sizes[k]):
        t.add_row(name, str(counts[name]), _size(sizes[name]))
    console.print(t)
    if plan.placement is not None:  # llama.cpp's own sizes for these shapes, and the placement that fits
        show_plan(plan.placement, console)
        return
    rows = [("weights (file)", _size(plan.weights_bytes)),
            (f"KV cache (f16, {plan.context} tokens)", _size(plan.kv_cache_bytes)),
            ("compute (estimate)", _size(plan.compute_bytes)),
            ("total", _size(plan.total_bytes))]
    if plan.vram_bytes is not None:
        verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
        rows.append((f"VRAM {_size(plan.vram_bytes)}", verdict))
    for key, value in rows:
        console.print(f"{key:<32} {value}")
    if plan.generation:
        console.print("[dim]generation config: " + ", ".join(f"{k}={v}" for k, v in plan.generation.items()) + "[/]")


def show_info(info) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    console.print(Text(printable(str(info.path)), style="bold") + Text(f"  {_size(info.file_size)}"))
    head = [("architecture", info.architecture), ("name", info.name), ("file type", info.file_type),
            ("tensors", info.n_tensors), ("parameters", f"{info.n_params:,}")]
    for title, rows in (("model", head), ("diffusion", info.diffusion.items()),
                        ("hyperparameters", info.hparams.items()), ("tokenizer", info.tokenizer.items())):
        t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 2))
        for key, value in rows:
            t.add_row(f"[cyan]{key}[/]", _text(_short(value)))
        console.print(t)
    t = Table(title="tensor types", title_justify="left")
    t.add_column("type")
    t.add_column("tensors", justify="right")
    t.add_column("size", justify="right")
    for name, mix in info.quant_mix.items():
        t.add_row(name, str(mix["tensors"]), _size(mix["bytes"]))
    console.print(t)
    if info.kv_cache:
        console.print(f"KV cache: {info.kv_cache}")


def _short(value, limit: int = 80) -> str:
    value = value.tolist() if hasattr(value, "tolist") else value
    text = f"{value:.7g}" if isinstance(value, float) else str(value)  # GGUF floats are f32: 7 digits
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- dglocal sudoku: the board ----------------------------------------------------------------------------------

def sudoku_board(puzzle, cells, accepted=None, bad=(), guided=()):
    """A 9x9 board as rich Text: givens bold, accepted digits green, still-noisy draft digits dim, cells the guide
    re-noised this step yellow on red, `bad` cells red."""
    from rich.text import Text

    board = Text()
    for r in range(9):
        if r and r % 3 == 0:
            board.append("───────┼───────┼───────\n", style="dim")
        for c in range(9):
            i = r * 9 + c
            if c and c % 3 == 0:
                board.append(" │", style="dim")
            style = ("bold red" if i in bad else "bold yellow on red" if i in guided else "bold" if puzzle[i] else
                     "green" if accepted is None or accepted[i] else "dim magenta")
            board.append(" " + (str(cells[i]) if cells[i] else "·"), style=style)
        board.append("\n")
    return board


@contextmanager
def sudoku_live(workers: int = 1):
    """Yields draw(puzzle, cells, step): the board redrawn in place on a terminal (at most RichView.FPS a second);
    with racing `workers`, the first one's board."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = _console()
    if not console.is_terminal:
        yield lambda puzzle, cells, step: None
        return
    drawn, interventions = [0.0], [0]

    def draw(puzzle, cells, step) -> None:
        guided = set(np.flatnonzero(step.guided).tolist()) if step.guided is not None else set()
        interventions[0] += len(guided)
        now = time.perf_counter()
        if now - drawn[0] >= 1 / RichView.FPS:  # re-noised cells show in the frames drawn: guided steps come in runs
            consistent = f" · consistent {81 - len(guided)}/81" if step.guided is not None else ""
            worker = f"worker 1 of {workers}: " if workers > 1 else ""
            status = Text(f"{worker}step {step.step} · T {step.temperature:.2f} · "
                          f"accepted {int(step.accepted.sum())}/81 · entropy {step.mean_entropy:.3f}{consistent}"
                          + (f" · guide re-noised {interventions[0]}" if step.guided is not None else ""), style="dim")
            live.update(Group(sudoku_board(puzzle, cells, step.accepted.tolist(), guided=guided), status),
                        refresh=True)
            drawn[0] = now

    with Live(console=console, auto_refresh=False, transient=True) as live:
        yield draw


def show_sudoku(result, bad=(), hint: str | None = None) -> None:
    """The final board and its verdict: solved only if check_grid passed; `hint` follows an unsolved one."""
    from rich.text import Text

    console = _console()
    console.print(sudoku_board(result.puzzle, result.grid, bad=set(bad)), end="", soft_wrap=True)
    detail = Text(f" · {result.steps} steps · {result.seconds:.2f} s", style="dim")
    if result.solved:
        console.print(Text("solved", style="bold green") + detail, soft_wrap=True)
    else:
        console.print(Text(f"unsolved: {81 - len(bad)}/81 cells consistent ({len(bad)} break a rule)",
                           style="bold red") + detail, soft_wrap=True)
        if hint:
            console.print(Text(hint, style="dim"), soft_wrap=True)


@contextmanager
def sudoku_progress(total: int):
    """A progress bar over puzzles on stderr (transient); yields advance()."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("solving"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("solving", total=total)
        yield lambda: bar.advance(task)


def show_sudoku_eval(result, max_steps, guided_steps: int | None = None) -> None:
    """`max_steps`: the step cap of the model's own attempt; `guided_steps`: that of the guide's restarts."""
    acc = "n/a (no solutions in the file)" if result.blank_acc is None else f"{result.blank_acc:.1%}"
    cap = f"max {max_steps}" if guided_steps is None else f"max {max_steps} alone, {guided_steps} a guided attempt"
    _console().print(f"{result.n} puzzles: solved {result.solved:.1%}, blank-cell accuracy {acc}, "
                     f"mean steps {result.steps:.1f} ({cap}), {result.seconds:.0f} s", soft_wrap=True)


# -- plan, bench, roofline ------------------------------------------------------------------------------------

def show_plan(r: dict, console=None) -> None:
    """A memory plan (dglocal.runtime.plan): each side's buffers and the placement chosen."""
    from rich.table import Table

    from dglocal.runtime.plan import PARTS

    console = console or _console()
    gib = 1 << 30
    c = r["choice"]
    note = " (no GPU here: a local rpc-server stood in for it)" if r["device"] == "stand-in" else ""
    console.print(f"{r['model']}: n_ctx {r['n_ctx']}, {r['parallel']} slot(s), KV {r['kv_type']}, device "
                  f"{r['vram'] / gib:.1f} GiB with {r['margin'] / gib:.2f} GiB spare{note}")
    if len(r["devices"]) > 1:
        shares = ",".join(f"{v / gib:g}" for v in r["tensor_split"])
        console.print("  " + ", ".join(f"{d['name']}: {d['used'] / gib:.2f} of {d['vram'] / gib:.1f} GiB"
                                       for d in r["devices"]) + f" (-ts {shares})")
    t = Table()
    for col in ("", "weights", "KV + state", "compute", "total"):
        t.add_column(col, justify="right" if col else "left")
    for side in ("device", "host"):
        parts = c[side]
        t.add_row(side, *(f"{parts[p] / gib:.2f}" for p in PARTS), f"{sum(parts.values()) / gib:.2f} GiB")
    console.print(t)
    flags = f"-ngl {c['n_gpu_layers']}" + (f" --n-cpu-moe {c['n_cpu_moe']}" if c["n_cpu_moe"] else "")
    verdict = "fits" if r["fits"] else "does not fit even with everything on the host"
    console.print(f"{r['words']}: {flags} ({verdict}; {len(r['measured'])} placements sized)")
    console.print(f"KV cache: {c['cache']}")
    if r.get("vision"):
        v = r["vision"]
        console.print(f"vision tower (first device): weights {v['weights'] / gib:.2f} GiB, compute {v['compute'] / gib:.2f}"
                      f" GiB for {v['max_tokens']}-token images ({v['compute_flash'] / gib:.2f} GiB with flash attention)")


def show_bench(result: dict, console=None) -> None:
    """A benchmark (dglocal.tools.bench): diffusion runs, then the autoregressive baseline and memory."""
    from rich.table import Table

    console = console or _console()
    size = result["file_size"] / 2**30
    title = (f"{result['name']}  {result['file_type']}  {size:.2f} GiB  canvas {result['canvas_length']}  "
             f"prompt {result['prompt_tokens']}{'  (random weights)' if result['synthetic'] else ''}")
    t = Table(title=title, caption="tok/s = canvas / (steps x ms/step + commit): a long generation's rate")
    for col in ("mode", "sampler", "steps", "ms/step", "positions", "vs floor", "commit ms", "TTFT s", "tok/s",
                "wall tok/s", "vs AR"):
        t.add_column(col, justify="left" if col in ("mode", "sampler") else "right")
    for r in result["runs"]:
        vs_floor = f"{r['step_vs_floor']:.2f}x" if r["step_vs_floor"] is not None else "-"
        t.add_row(f"{r['mode']} {r['max_steps']}", r.get("sampler", "reference"), f"{r['steps_per_canvas']:.1f}",
                  f"{r['ms_per_step']:.1f}", f"{r['forward_positions_per_canvas']:.0f}", vs_floor,
                  f"{r['commit_ms']:.1f}", f"{r['ttft_s']:.2f}", f"{r['canvas_tok_s']:.1f}", f"{r['wall_tok_s']:.1f}",
                  f"{r['vs_ar']:.2f}x")
    console.print(t)
    for a in result.get("active") or ():
        console.print(f"fast sampler, {a['active']} of {result['canvas_length']} positions run: "
                      f"{a['ms_per_step']:.1f} ms/step, {a['vs_full_step']:.2f}x a whole reference step "
                      f"({a['full_step_ms']:.1f} ms)")
    f = result["floor"]
    console.print(f"step floor: transformer {f['transformer_ms']:.1f} ms + 2 x LM head {f['lm_head_ms']:.1f} ms "
                  f"= {f['floor_ms']:.1f} ms")
    if result["offloaded"]:
        io = result["step_io_bytes"]
        console.print(f"per step across the device boundary: {io['to_backend'] / 1e6:.2f} MB in, "
                      f"{io['to_host'] / 1e6:.3f} MB out")
    ar = result["autoregressive"]
    gpu = result["gpu_memory_mib"]
    console.print(f"autoregressive: {ar['tok_s']:.1f} tok/s ({ar['ms_per_token']:.1f} ms/token, {ar['tokens']} "
                  f"tokens), TTFT {ar['ttft_s']:.2f} s, prefill {ar['prefill_tok_s']:.0f} tok/s")
    for key, name in (("batched", "batched"), ("batched_fast", "batched, fast sampler")):
        b = result.get(key)
        if b:
            console.print(f"{name}: {b['batch']} sequences x {b['max_steps']} steps: {b['canvas_tok_s']:.1f} tok/s in "
                          f"all, {b['per_sequence_tok_s']:.1f} per sequence ({b['wall_s']:.1f} s, prefills included)")
    console.print(f"peak RSS {result['peak_rss_mib']:.0f} MiB"
                  + (f", GPU {gpu:.0f} MiB" if gpu is not None else "")
                  + f"; n_gpu_layers {result['n_gpu_layers']}, threads {result['threads']}, "
                    f"layers off the host {'yes' if result['offloaded'] else 'no'}, load {result['load_s']:.1f} s")


def show_roofline(r: dict, console=None) -> None:
    """A roofline estimate (dglocal.tools.roofline)."""
    from rich.table import Table

    console = console or _console()
    console.print(f"roofline on {r['device']} (n_ctx {r['n_ctx']}, canvas {r['canvas_length']}): "
                  f"{r['ms_per_step']:.2f} ms/step, commit {r['commit_ms']:.2f} ms, "
                  f"{r['canvas_tok_s']:.0f} canvas tok/s at {r['steps']} steps; autoregressive "
                  f"{r['ar_tok_s']:.0f} tok/s ({r['ar_ms_per_token']:.2f} ms/token)")
    t = Table(title="most expensive nodes of a denoise step")
    for col in ("node (op)", "ms", "share"):
        t.add_column(col, justify="left" if col.startswith("node") else "right")
    for n in r["top_nodes"]:
        t.add_row(n["node"], f"{n['ms']:.3f}", f"{100 * n['share']:.1f}%")
    console.print(t)
