"""`dglocal sudoku`: solve Sudoku puzzles with the Sudoku DiffusionGemma, the board filling in live.

    dglocal sudoku PUZZLE                       # one puzzle: 81 characters, '.' or '0' for a blank
    dglocal sudoku --eval FILE [--output OUT]   # lines `puzzle [solution]`: solve rate, blank-cell accuracy, steps
    dglocal sudoku                              # puzzles read from stdin, one per line (`dglocal run` with no model)

The prompt is built from token ids (`sudoku_core.encode_prompt`), never through the tokenizer. One canvas of 81
digits per puzzle, the model's own sampler settings. Every returned grid is judged by `check_grid`: a grid that
breaks a rule or changes a given is unsolved. The givens are not pinned in the canvas by default: the model was
trained without clamping, and clamping at inference only on a model trained that way made it worse (train and
sample alike, docs/sudoku.md); `pin_givens=True` pins them through `constraints`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dglocal.errors import ConfigError, DglocalError, ModelError
from dglocal.files import os_error_text, write_atomically
from dglocal.generation.driver import run_many
from dglocal.generation.events import Step
from dglocal.generation.request import derive_seed
from dglocal.runtime.checks import integer, seed_value

from . import core as sc
from .race import MAX_WORKERS, race
from .stream import TIME_LIMIT, Solved, outcome, puzzle_options, stream_one

N_CTX = 512  # prompt (326) + one canvas (81), rounded up
EVAL_BATCH = 16  # puzzles per forward in --eval: the model is small, a forward of 16 canvases costs little more


@dataclass
class EvalResult:
    n: int
    solved: float  # fraction of puzzles whose grid passes check_grid
    blank_acc: float | None  # fraction of blank cells equal to the file's solution; None without solutions
    steps: float  # mean denoising steps per puzzle
    seconds: float
    results: list[Solved] = field(repr=False, default_factory=list)


def load_model(path, *, threads: int | None = None, n_ctx: int | None = None, batch: int = 1, lora=None):
    """The Sudoku GGUF on the backend; ModelError if it is not a Sudoku model. The model is tiny, so the KV
    cache stays f32 and flash attention off (the numbers then match the reference at ~1e-4), and one thread is
    the default: its matrices are too small to split, and spinning thread barriers on a busy CPU cost ~50x.
    `lora`: LoRA adapters, as dglocal.load takes them."""
    import dglocal

    # a unified cache holds every sequence of a batch: n_ctx is per puzzle times the batch
    model = dglocal.load(path, n_ctx=(n_ctx or N_CTX) * batch, n_threads=threads or 1, kv_type="f32",
                         flash_attn=False, n_seq_max=batch, lora=lora)
    if model.n_vocab != sc.VOCAB_SIZE or model.canvas_length != sc.CANVAS_LENGTH:
        model.close()
        raise ModelError(f"{path}: not a Sudoku model (vocabulary {model.n_vocab}, canvas {model.canvas_length}; "
                         f"expected {sc.VOCAB_SIZE} and {sc.CANVAS_LENGTH})")
    return model


def is_sudoku_model(kv) -> bool:
    """Whether GGUF metadata (a header's kv) is a Sudoku model's: its vocabulary and canvas. `dglocal run` and
    `serve` given one as MODEL treat it as they treat the built-in one (a puzzle a message), not as a chat model."""
    return list(kv.get("tokenizer.ggml.tokens", ())) == sc.TOKENS and \
        kv.get("diffusion.canvas_length") == sc.CANVAS_LENGTH


def load_models(path, workers: int, **options) -> list:
    """`workers` copies of load_model(path, **options), each its own context: a puzzle's attempts race on them
    (sudoku.race). The model is a few MB, so each holds its own weights."""
    models = []
    try:
        for _ in range(integer("workers", workers, 1, MAX_WORKERS)):
            models.append(load_model(path, **options))
    except BaseException:
        for model in models:
            model.close()
        raise
    return models


def solve_stream(model, puzzle: Sequence[int], *, steps: int | None = None, seed: int | None = None,
                 pin_givens: bool = False, guide: bool = True, time_limit: float | None = TIME_LIMIT,
                 **generation) -> Iterator[Step | Solved]:
    """Denoise one puzzle: every Step (the draft board), then the Solved outcome. `guide`: re-noise cells that
    break a rule (sudoku_core.guide_for) and run to the step cap while any does. `generation`: other
    GenerationConfig fields (entropy_bound, t_min, ...). `model`: the Sudoku model, or a list of them
    (load_models) on which the attempts race (sudoku.race: the steps shown are the first model's)."""
    puzzle = sc.check_puzzle(puzzle)  # before any work: a race raises it here, before its threads start
    run = race if isinstance(model, (list, tuple)) else stream_one
    yield from run(model, puzzle, steps=steps, seed=seed, pin_givens=pin_givens, guide=guide, time_limit=time_limit,
                   **generation)


def solve(model, puzzle: Sequence[int], **options) -> Solved:
    for event in solve_stream(model, puzzle, **options):
        pass
    return event


def bad_cells(puzzle: Sequence[int], grid: Sequence[int]) -> set[int]:
    """Cells that make `grid` fail check_grid, as the guide sees them (sudoku_core.rule_breaks)."""
    return set(sc.rule_breaks(puzzle, grid))


def read_puzzles(path) -> list[tuple[list[int], list[int] | None]]:
    """Lines `puzzle [solution]`; blank lines and '#' comments skipped. ConfigError names the bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from e
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ConfigError(f"{path}:{number}: expected `puzzle [solution]`, got {len(fields)} fields")
        try:
            pairs.append((sc.check_puzzle(fields[0]), sc.parse_grid(fields[1]) if len(fields) > 1 else None))
        except ConfigError as e:
            raise ConfigError(f"{path}:{number}: {e}") from None
    if not pairs:
        raise ConfigError(f"{path}: no puzzles")
    return pairs


def evaluate(model, pairs, *, steps: int | None = None, seed: int | None = None, pin_givens: bool = False,
             guide: bool = True, on_result=None, **generation) -> EvalResult:
    """Solve every puzzle, up to model.n_seq_max per forward, and score it as the reference eval does. Puzzle i
    draws its noise from (seed, i): the grids do not depend on the batch size. `model`: the Sudoku model, or a list
    of them (load_models), on which each puzzle's attempts race, a puzzle at a time."""
    t0 = time.perf_counter()
    pairs = [(sc.check_puzzle(p), s) for p, s in pairs]  # every puzzle, before any work
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    seed = seed_value(seed)  # -1: random, as llama.cpp's
    base = models[0].seeds.next() if seed is None else seed
    # an evaluation's attempts are counted (GUIDE_RESTARTS), not timed, unless it is given a time limit
    options = {"time_limit": None, "steps": steps, "pin_givens": pin_givens, "guide": guide, **generation}
    if len(models) == 1:
        results = _evaluate_batched(models[0], pairs, base, options, on_result)
    else:
        results = []
        for i, (puzzle, _) in enumerate(pairs):
            results.append(solve(models, puzzle, seed=derive_seed(base, i), **options))
            if on_result is not None:
                on_result(i, results[i])
    blanks = right = 0
    for (puzzle, solution), r in zip(pairs, results):
        if solution is not None:
            for p, s, g in zip(puzzle, solution, r.grid):
                if not p:
                    blanks += 1
                    right += s == g
    n = len(results)
    has_solutions = any(s is not None for _, s in pairs)
    return EvalResult(n, sum(r.solved for r in results) / n, right / blanks if has_solutions and blanks else None,
                      sum(r.steps for r in results) / n, time.perf_counter() - t0, results)


def _evaluate_batched(model, pairs, base: int, options: dict, on_result) -> list[Solved]:
    specs = [(sc.encode_prompt(p), puzzle_options(p, seed=derive_seed(base, i), **options))
             for i, (p, _) in enumerate(pairs)]
    results: list[Solved | None] = [None] * len(pairs)

    def done(i, event):
        if event.kind == "done":
            results[i] = outcome(pairs[i][0], event, event.stats.total_seconds)
            if on_result is not None:
                on_result(i, results[i])

    run_many(model, specs, on_event=done)
    return results


def write_grids(path, results: Sequence[Solved]) -> None:
    """One line of 81 digits per puzzle, in input order ('0' where the model gave no digit). Written beside and
    renamed: a full disk leaves the file that was there as it was."""
    try:
        write_atomically(path, "".join("".join(map(str, r.grid)) + "\n" for r in results))
    except OSError as e:
        raise DglocalError(f"{path}: cannot write the grids: {os_error_text(e)}") from None
