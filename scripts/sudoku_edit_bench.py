"""Editing on the Sudoku model: a solved grid with three cells made wrong, those three re-noised with `LLM.edit`
(every other cell pinned), against solving the puzzle from scratch; the model alone, same seeds, on the held-out
set.

    python scripts/sudoku_edit_bench.py scripts/sudoku/heldout.txt
"""

from __future__ import annotations

import argparse
import random

from dglocal.convert.hub import DEFAULT_MODEL
from dglocal.sudoku import core as sc
from dglocal.sudoku import load_model, read_puzzles, solve


def corrupt(puzzle, solution, rng: random.Random) -> tuple[str, list[int]]:
    """The solution as text with three non-given cells changed to another digit, and those cells."""
    cells = rng.sample([i for i in range(81) if not puzzle[i]], 3)
    grid = list(solution)
    for i in cells:
        grid[i] = rng.choice([d for d in range(1, 10) if d != solution[i]])
    return "".join(map(str, grid)), cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("puzzles")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs = read_puzzles(args.puzzles)
    rng = random.Random(args.seed)
    edited = scratch = edit_steps = scratch_steps = 0
    with load_model(args.model) as m:
        for k, (puzzle, solution) in enumerate(pairs):
            text, cells = corrupt(puzzle, solution, rng)
            out = m.edit(text, [(i, i + 1) for i in cells], prompt=sc.encode_prompt(puzzle), seed=args.seed + k)
            grid = sc.decode_canvas(out.completion.tokens)  # by position: a cell closed by a pad stays blank
            edited += sc.check_grid(puzzle, grid)
            edit_steps += sum(out.completion.stats.steps_per_canvas)
            alone = solve(m, puzzle, seed=args.seed + k, guide=False)
            scratch += alone.solved
            scratch_steps += alone.steps
    n = len(pairs)
    print(f"{n} puzzles, 3 wrong cells each: edit solves {edited / n:.1%} in {edit_steps / n:.1f} steps; "
          f"from scratch {scratch / n:.1%} in {scratch_steps / n:.1f} steps (the model alone, seed {args.seed})")


if __name__ == "__main__":
    main()
