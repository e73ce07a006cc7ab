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
from typing import ClassVar
from pathlib import Path

from dglocal.errors import ConfigError, DglocalError, ModelError, os_error_text, remove_quietly
from dglocal.generation.events import Completion, Event, Step

from . import core as sc

N_CTX = 512  # prompt (326) + one canvas (81), rounded up
EVAL_BATCH = 16  # puzzles per forward in --eval: the model is small, a forward of 16 canvases costs little more
# a grid the guide still finds broken at the step cap is denoised again (from what the guide keeps of it): a puzzle
# solved alone gets TIME_LIMIT seconds (at most TIMED_RESTARTS attempts); an evaluation, whose results must not
# depend on the machine or the batch, GUIDE_RESTARTS attempts unless it is given a time limit
TIME_LIMIT = 5.0
TIMED_RESTARTS = 1023
GUIDE_RESTARTS = 63


@dataclass
class Solved(Event):
    """The outcome of one puzzle: the last event of solve_stream."""

    kind: ClassVar[str] = "solved"
    puzzle: list[int]
    grid: list[int]  # 81 cells, 0 where the model returned a non-digit (EOS, pad, ...)
    solved: bool  # check_grid: complete, every rule kept, every given kept
    steps: int  # denoising steps (decoder passes)
    seconds: float


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
    from dglocal.runtime.checks import integer

    from .race import MAX_WORKERS

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
    if isinstance(model, (list, tuple)):
        from .race import race

        yield from race(model, puzzle, steps=steps, seed=seed, pin_givens=pin_givens, guide=guide,
                        time_limit=time_limit, **generation)
        return
    t0 = time.perf_counter()
    events = model.stream(sc.encode_prompt(puzzle), **puzzle_options(puzzle, steps=steps, seed=seed,
                                                                     pin_givens=pin_givens, guide=guide,
                                                                     time_limit=time_limit, **generation))
    try:
        for event in events:
            if event.kind == "step":
                yield event
            elif event.kind == "done":
                yield _solved(puzzle, event, time.perf_counter() - t0)
    finally:
        events.close()  # a caller that breaks out leaves the sequence consistent


def puzzle_options(puzzle, *, steps=None, seed=None, pin_givens=False, guide=True, time_limit=None,
                   keep: str = "fresh", **generation) -> dict:
    """stream() options for one puzzle. `time_limit`: seconds for the restarts (None: GUIDE_RESTARTS of them);
    `keep`: what a restart keeps of the last attempt (sudoku.core.Guide). ConfigError for givens that break a rule."""
    puzzle = sc.check_puzzle(puzzle)
    constraints = {i: c + sc.DIGIT_BASE for i, c in enumerate(puzzle) if c} if pin_givens else None
    restarts = (TIMED_RESTARTS if time_limit is not None else GUIDE_RESTARTS) if guide else 0
    return dict(max_new_tokens=sc.CANVAS_LENGTH, max_denoising_steps=steps, seed=seed, constraints=constraints,
                guide=sc.guide_for(puzzle, keep, steps=guide_steps(steps)) if guide else None,
                guide_restarts=restarts, time_limit=time_limit if guide else None, **generation)


def guide_steps(steps: int | None) -> int:
    """The step cap of a guided attempt: the guide's own, shorter (sudoku.core.Guide.STEPS), and at most `steps`,
    the run's cap (--steps, a request's max_denoising_steps), which bounds every attempt."""
    return sc.Guide.STEPS if steps is None else min(sc.Guide.STEPS, steps)


def _solved(puzzle, completion: Completion, seconds: float) -> Solved:
    # the output stops before an EOS; the reference pads the rest of the canvas: those cells are blank
    tokens = completion.tokens + [sc.PAD_ID] * (sc.CANVAS_LENGTH - len(completion.tokens))
    grid = sc.decode_canvas(tokens)
    return Solved(list(puzzle), grid, sc.check_grid(puzzle, grid), sum(completion.stats.steps_per_canvas), seconds)


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
    from dglocal.generation.request import derive_seed
    from dglocal.runtime.checks import seed_value

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
    from dglocal.generation.driver import run_many
    from dglocal.generation.request import derive_seed

    specs = [(sc.encode_prompt(p), puzzle_options(p, seed=derive_seed(base, i), **options))
             for i, (p, _) in enumerate(pairs)]
    results: list[Solved | None] = [None] * len(pairs)

    def done(i, event):
        if event.kind == "done":
            results[i] = _solved(pairs[i][0], event, event.stats.total_seconds)
            if on_result is not None:
                on_result(i, results[i])

    run_many(model, specs, on_event=done)
    return results


def write_grids(path, results: Sequence[Solved]) -> None:
    """One line of 81 digits per puzzle, in input order ('0' where the model gave no digit). Written beside and
    renamed: a full disk leaves the file that was there as it was."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text("".join("".join(map(str, r.grid)) + "\n" for r in results), encoding="utf-8")
        partial.replace(path)
    except OSError as e:
        raise DglocalError(f"{path}: cannot write the grids: {os_error_text(e)}") from None
    finally:
        remove_quietly(partial)
