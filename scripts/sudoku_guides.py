"""The Sudoku guide's restarts compared: from fresh noise, or from what the guide keeps of the last attempt, on the
same puzzles, seeds and budget (runs interleaved in one process).

    python scripts/sudoku_guides.py scripts/sudoku/hard.txt                 # 31 restarts each
    python scripts/sudoku_guides.py scripts/sudoku/hard.txt --time-limit 5 --batch 1
"""

from __future__ import annotations

import argparse

from dglocal.convert.hub import DEFAULT_MODEL
from dglocal.sudoku import evaluate, load_model, read_puzzles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("puzzles")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--time-limit", type=float, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", default=None)
    ap.add_argument("--keep", default="fresh,consistent,consensus", help="the restart policies to compare")
    ap.add_argument("--n", type=int, default=0, help="the first N puzzles only")
    args = ap.parse_args()
    pairs = read_puzzles(args.puzzles)[:args.n or None]
    with load_model(args.model, batch=args.batch, lora=args.lora) as m:
        for name, options in [("model alone", dict(guide=False))] + [(f"restart {k}", dict(keep=k))
                                                                      for k in args.keep.split(",")]:
            r = evaluate(m, pairs, seed=args.seed, time_limit=args.time_limit, **options)
            print(f"{name:14s} solved {r.solved:.1%}  blank-cell accuracy {r.blank_acc:.1%}  mean steps "
                  f"{r.steps:.1f}  {r.seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
