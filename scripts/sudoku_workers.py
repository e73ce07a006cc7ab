"""Denoising steps a second for the Sudoku model, the ways the cores can be spent, side by side in one run:
one context on one thread, one context on every core's thread, a batch of canvases in one context, and a
context per core raced by dglocal.sudoku.race.

    python scripts/sudoku_workers.py [--n 8] [--rounds 2]

Each way solves the same hard puzzles, the model alone for 16 steps (no guide, so each does the same work);
steps a second = canvas steps / wall time, prompt encodes included. The median over rounds; ways alternate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from dglocal import sudoku
from dglocal.generation.driver import run_many
from dglocal.sudoku import core as sc
from dglocal.sudoku.race import default_workers

ROOT = Path(__file__).resolve().parent
GGUF = Path(sudoku.__file__).parent.parent / "data" / "sudoku.gguf"
OPTIONS = dict(steps=16, guide=False, entropy_bound=1e-9)  # every step accepts nothing early: 16 steps a canvas


def batched(model, puzzles) -> int:
    specs = [(sc.encode_prompt(p), sudoku.puzzle_options(p, seed=i, **OPTIONS)) for i, p in enumerate(puzzles)]
    return sum(sum(c.stats.steps_per_canvas) for c in run_many(model, specs))


def one_by_one(model, puzzles) -> int:
    return sum(sudoku.solve(model, p, seed=i, **OPTIONS).steps for i, p in enumerate(puzzles))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    cores = default_workers()
    puzzles = [puzzle for puzzle, _ in sudoku.read_puzzles(ROOT / "sudoku" / "hard.txt")[: args.n]]
    ways = {
        "1 context, 1 thread": (sudoku.load_model(GGUF), one_by_one),
        f"1 context, {cores} threads": (sudoku.load_model(GGUF, threads=cores), one_by_one),
        f"1 context, batch of {args.n}": (sudoku.load_model(GGUF, batch=args.n), batched),
        f"{cores} contexts raced, 1 thread each": (sudoku.load_models(GGUF, cores), one_by_one),
    }
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, (model, run) in ways.items():
            t0 = time.perf_counter()
            steps = run(model, puzzles)
            rates[name].append(steps / (time.perf_counter() - t0))
    base = statistics.median(rates["1 context, 1 thread"])
    print(f"{args.n} hard puzzles x {args.rounds} rounds, 16 steps a canvas, {cores} core(s)")
    for name, r in rates.items():
        print(f"{name:<34} {statistics.median(r):7.0f} steps/s  {statistics.median(r) / base:4.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
