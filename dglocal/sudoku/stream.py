"""One puzzle denoised on one model: the options it runs with, the draft boards, and its outcome (`Solved`). Both
solve (the API) and race (a puzzle's attempts on several models) run it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from dglocal.generation.events import Completion, Event, Step

from . import core as sc

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


def stream_one(model, puzzle: Sequence[int], *, time_limit: float | None = TIME_LIMIT,
               **options) -> Iterator[Step | Solved]:
    """sudoku.solve_stream on one model: every Step (the draft board), then the Solved outcome. `options`:
    puzzle_options' (steps, seed, pin_givens, guide, ... and GenerationConfig fields)."""
    puzzle = sc.check_puzzle(puzzle)
    t0 = time.perf_counter()
    events = model.stream(sc.encode_prompt(puzzle), **puzzle_options(puzzle, time_limit=time_limit, **options))
    try:
        for event in events:
            if event.kind == "step":
                yield event
            elif event.kind == "done":
                yield outcome(puzzle, event, time.perf_counter() - t0)
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


def outcome(puzzle, completion: Completion, seconds: float) -> Solved:
    """A generation's Completion judged as a grid of `puzzle`."""
    # the output stops before an EOS; the reference pads the rest of the canvas: those cells are blank
    tokens = completion.tokens + [sc.PAD_ID] * (sc.CANVAS_LENGTH - len(completion.tokens))
    grid = sc.decode_canvas(tokens)
    return Solved(list(puzzle), grid, sc.check_grid(puzzle, grid), sum(completion.stats.steps_per_canvas), seconds)
