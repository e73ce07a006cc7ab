"""Sudoku puzzles for training and evaluation: a generator, symmetry augmentation, and a CLI.

    python scripts/sudoku_data.py --n 20000 --seed 1 --out pool.txt          # training pool
    python scripts/sudoku_data.py --n 256 --seed 1000003 --out scripts/sudoku/heldout.txt
    python scripts/sudoku_data.py --n 100 --seed 2000003 --min-givens 17 --max-givens 25 --out scripts/sudoku/hard.txt

Each output line is `puzzle solution` (81 characters each, '.' for blanks). Every puzzle has exactly
one solution (checked by the counting solver in `dglocal.sudoku.core`) and `--min-givens`..`--max-givens`
givens. Training seeds are small integers; the held-out set uses seed 1000003 and the training
pool is checked against it for identical solution grids.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

from dglocal.sudoku.core import count_solutions, format_grid, parse_grid, random_symmetry, solve

HELDOUT_SEED = 1_000_003
HARD_SEED = 2_000_003  # scripts/sudoku/hard.txt: 100 puzzles of 17-25 givens


def random_solution(rng: random.Random) -> list[int]:
    """A uniformly shuffled search of the empty grid: a random valid solved grid."""
    return solve([0] * 81, limit=1, rng=rng)[0]


def dig(solution: list[int], givens: int, rng: random.Random) -> list[int]:
    """Blank cells of `solution` in random order while the puzzle stays unique, down to `givens` givens or as far
    as uniqueness allows (a minimal puzzle: 22-26 givens for most grids)."""
    puzzle = solution.copy()
    n = 81
    for i in rng.sample(range(81), 81):
        if n == givens:
            break
        puzzle[i] = 0
        if count_solutions(puzzle, limit=2) == 1:
            n -= 1
        else:
            puzzle[i] = solution[i]
    return puzzle


def generate(rng: random.Random, min_givens: int = 30, max_givens: int = 40) -> tuple[list[int], list[int]]:
    """One (puzzle, solution) pair with a unique solution and min..max givens (uniform where digging reaches the
    target; below ~24, most grids stop at their minimal puzzle first, which is kept when it is in range)."""
    while True:
        solution = random_solution(rng)
        puzzle = dig(solution, rng.randint(min_givens, max_givens), rng)
        if min_givens <= 81 - puzzle.count(0) <= max_givens:
            return puzzle, solution


# --- symmetry augmentation (validity, uniqueness and the givens count are all preserved) ----------


def augment(grids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply one random symmetry per row to a batch of stacked grids: shape (B, K, 81), K grids that
    must move together (e.g. puzzle and solution)."""
    out = np.empty_like(grids)
    for b in range(grids.shape[0]):
        cell_map, digit_map = random_symmetry(random.Random(int(rng.integers(1 << 62))))
        out[b] = np.asarray(digit_map)[grids[b][:, cell_map]]
    return out


# --- files --------------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[tuple[list[int], list[int] | None]]:
    """Lines `puzzle [solution]`; blank lines and '#' comments are skipped."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        pairs.append((parse_grid(fields[0]), parse_grid(fields[1]) if len(fields) > 1 else None))
    return pairs


def pairs_array(pairs) -> np.ndarray:
    """(N, 2, 81) uint8 array of puzzle, solution."""
    return np.array([[p, s] for p, s in pairs], dtype=np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True, help="number of puzzles")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True, help="output file (appended with --append)")
    ap.add_argument("--min-givens", type=int, default=30)
    ap.add_argument("--max-givens", type=int, default=40)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    for seed, name in ((HELDOUT_SEED, "heldout.txt"), (HARD_SEED, "hard.txt")):
        if args.seed == seed and not args.out.endswith(name):
            print(f"seed {seed} is reserved for the held-out set {name}", file=sys.stderr)
            return 2
    rng = random.Random(args.seed)
    t0 = time.time()
    with open(args.out, "a" if args.append else "w") as f:
        for k in range(args.n):
            puzzle, solution = generate(rng, args.min_givens, args.max_givens)
            f.write(f"{format_grid(puzzle)} {format_grid(solution)}\n")
            if (k + 1) % 1000 == 0:
                f.flush()
                print(f"{k + 1}/{args.n} puzzles, {(k + 1) / (time.time() - t0):.1f}/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
