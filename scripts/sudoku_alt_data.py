"""A second, independent Sudoku generator, for a held-out set the training pool's generator never saw.

    python scripts/sudoku_alt_data.py --n 256 --seed 7 --out scripts/sudoku/heldout_alt.txt

It shares no code with `sudoku_data.py` or `dglocal.sudoku.core`: a bitmask solver of its own (the most
constrained cell first) fills an empty grid in a random digit order, then cells are removed in
180-degree-symmetric pairs (as published puzzles are) while that solver still finds exactly one solution. Lines `puzzle solution`,
as `sudoku_data.py` writes them.
"""

from __future__ import annotations

import argparse
import random
import sys

ALL = 0x1FF  # digits 1..9 as bits 0..8


PEERS = [sorted({r * 9 + k for k in range(9)} | {k * 9 + c for k in range(9)}
                | {(r // 3 * 3 + i) * 9 + c // 3 * 3 + j for i in range(3) for j in range(3)} - {r * 9 + c})
         for r in range(9) for c in range(9)]


def count(cells: list[int], limit: int = 2) -> int:
    """Solutions of `cells` (0 = blank), counted up to `limit`."""
    best, best_free = -1, None
    for i, v in enumerate(cells):
        if v:
            continue
        used = 0
        for p in PEERS[i]:
            if cells[p]:
                used |= 1 << (cells[p] - 1)
        free = ALL & ~used
        if free == 0:
            return 0
        if best_free is None or bin(free).count("1") < bin(best_free).count("1"):
            best, best_free = i, free
    if best < 0:
        return 1
    n = 0
    for d in range(9):
        if best_free >> d & 1:
            cells[best] = d + 1
            n += count(cells, limit - n)
            cells[best] = 0
            if n >= limit:
                break
    return n


def random_fill(rng: random.Random) -> list[int]:
    """A random solution grid: the most constrained cell first, its candidates in random order."""
    cells = [0] * 81

    def fill() -> bool:
        best, options = -1, None
        for i, v in enumerate(cells):
            if not v:
                free = [d for d in range(1, 10) if all(cells[p] != d for p in PEERS[i])]
                if options is None or len(free) < len(options):
                    best, options = i, free
        if best < 0:
            return True
        for d in rng.sample(options, len(options)):
            cells[best] = d
            if fill():
                return True
        cells[best] = 0
        return False

    fill()
    return cells


def puzzle_from(solution: list[int], givens: int, rng: random.Random) -> list[int] | None:
    puzzle = solution.copy()
    order = rng.sample(range(41), 41)  # cell i and its mirror 80 - i; 40 is the centre
    n = 81
    for i in order:
        pair = {i, 80 - i}
        if n - len(pair) < givens:
            continue
        saved = [puzzle[j] for j in pair]
        for j in pair:
            puzzle[j] = 0
        if count(puzzle.copy()) == 1:
            n -= len(pair)
        else:
            for j, v in zip(pair, saved):
                puzzle[j] = v
        if n == givens:
            return puzzle
    return puzzle if n <= givens + 1 else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-givens", type=int, default=30)
    ap.add_argument("--max-givens", type=int, default=40)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    lines = []
    while len(lines) < args.n:
        solution = random_fill(rng)
        puzzle = puzzle_from(solution, rng.randint(args.min_givens, args.max_givens), rng)
        if puzzle is None or not args.min_givens <= 81 - puzzle.count(0) <= args.max_givens:
            continue
        lines.append("".join(str(v) if v else "." for v in puzzle) + " " + "".join(map(str, solution)))
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
