"""`dglocal sudoku` (and `dglocal run` with no model): one puzzle with the board filling in live, a puzzle per
input line, or a file evaluated; the solving is dglocal.sudoku's."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

from dglocal.errors import ConfigError
from dglocal.generation.config import MAX_STEPS, GenerationConfig
from dglocal.runtime.checks import integer, seed_value
from dglocal.sudoku import core as sc
from dglocal.sudoku.race import MAX_WORKERS, default_workers
from dglocal.sudoku.solve import EVAL_BATCH, bad_cells, evaluate, load_models, read_puzzles, solve_stream, write_grids
from dglocal.sudoku.stream import TIME_LIMIT, Solved, guide_steps

from . import render as ui
from .views import is_terminal


def main(model: Path, *, puzzle: str | None = None, eval_file: Path | None = None, output: Path | None = None,
         steps: int | None = None, threads: int | None = None, seed: int | None = None,
         pin_givens: bool = False, n_ctx: int | None = None, generation: dict | None = None, guide: bool = True,
         batch: int | None = None, lora=None, time_limit: float | None = None, workers: int | None = None) -> None:
    """The `dglocal sudoku` command. `workers`: contexts a puzzle's attempts race on (sudoku.race); by default one
    per core for a puzzle, and one for --eval, whose figures must not depend on the machine."""
    if puzzle is not None and eval_file is not None:
        raise ConfigError("give a PUZZLE or --eval FILE, not both")
    if steps is not None:
        integer("--steps", steps, 1, MAX_STEPS)
    seed = seed_value(seed)  # -1: a random seed, as `dglocal run --seed -1` (llama.cpp's spelling)
    cells = sc.check_puzzle(puzzle) if puzzle is not None else None  # bad input fails before the slow load
    pairs = read_puzzles(eval_file) if eval_file is not None else None
    if output is not None:
        _check_output(Path(output))
    options = dict(steps=steps, seed=seed, pin_givens=pin_givens, guide=guide, **(generation or {}))
    if time_limit is not None:
        options["time_limit"] = time_limit
    workers = integer("--workers", workers, 1, MAX_WORKERS) if workers is not None else \
        1 if pairs else default_workers(threads)
    if batch is not None and integer("--batch", batch, 1, 256) > 1 and workers > 1:
        raise ConfigError(f"--batch {batch} with --workers {workers}: racing workers solve one puzzle at a time")
    batch = batch or (EVAL_BATCH if pairs and workers == 1 else 1)

    with ui.status(f"loading {Path(model).name}"):
        models = load_models(model, workers, threads=threads, n_ctx=n_ctx, batch=batch, lora=lora)
    llm = models if workers > 1 else models[0]
    with ExitStack() as stack:
        for m in models:
            stack.enter_context(m)
        if pairs is not None:
            with ui.sudoku_progress(len(pairs)) as advance:
                result = evaluate(llm, pairs, **options, on_result=lambda i, r: advance())
            cap = steps or GenerationConfig.from_metadata(models[0].metadata).max_denoising_steps
            ui.show_sudoku_eval(result, cap, guide_steps(steps) if guide else None)
            if output is not None:  # after the figures: a failed write loses the file, not the evaluation
                write_grids(output, result.results)
        elif cells is not None:
            done = _solve_live(llm, cells, options)
            if output is not None:
                write_grids(output, [done])
        else:
            _solve_lines(llm, options, output)


def _check_output(path: Path) -> None:
    """A bad --output fails before the work, not after it: the grids are written at the end."""
    if path.is_dir():
        raise ConfigError(f"--output {path}: a folder, not a file")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {path}: no such folder {path.parent}")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output {path}: the folder {path.parent} is not writable")


def _solve_live(llm, cells, options) -> Solved:
    with ui.sudoku_live(len(llm) if isinstance(llm, list) else 1) as draw:
        for event in solve_stream(llm, cells, **options):
            if event.kind == "step":
                draw(cells, sc.decode_canvas(event.argmax.tolist()), event)
    ui.show_sudoku(event, bad_cells(event.puzzle, event.grid), hint=_hint(event, options))
    return event


def _hint(event: Solved, options) -> str | None:
    """What to try after an unsolved puzzle (show_sudoku prints it only then)."""
    givens = sum(1 for c in event.puzzle if c)
    if givens < sc.MIN_GIVENS:  # more time rarely helps: such grids are far from what the model learned
        return (f"the model was trained on puzzles of {sc.MIN_GIVENS} givens or more (the fewest a puzzle with one "
                f"solution can have); this one has {givens}")
    limit = options.get("time_limit", TIME_LIMIT) if options.get("guide", True) else None
    # only when the time ran out: an attempt cap reached first is no matter of time
    if limit is not None and event.seconds >= limit:
        return f"a longer --time-limit (it had {limit:g} s) gives it more attempts"
    return None


def _solve_lines(llm, options, output) -> None:
    """A puzzle per input line until end of input or /exit (`dglocal run` with no model)."""
    interactive = is_terminal()
    done = []
    if interactive:
        ui.print_status("one puzzle per line (81 characters, '.' or '0' for blanks) · Ctrl-D quits")
    while True:
        try:
            line = input("puzzle> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if not text:
            continue
        try:
            cells = sc.check_puzzle(text)
        except ConfigError as e:
            ui.print_error(str(e))
            continue
        try:
            done.append(_solve_live(llm, cells, options))
        except KeyboardInterrupt:  # Ctrl-C stops this puzzle, as it stops an answer in the chat
            ui.print_status("stopped")
    if output is not None:
        write_grids(output, done)
    if interactive:
        print(file=sys.stderr)
