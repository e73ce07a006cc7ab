"""Evaluate the HF Sudoku checkpoint through the reference transformers `generate` (the oracle numbers).

    python scripts/sudoku_eval_reference.py                                   # shipped checkpoint, held-out set
    python scripts/sudoku_eval_reference.py --steps 16 --output grids.txt --json result.json

A grid counts as solved only if `check_grid` passes (every rule, every given kept). Blank-cell accuracy
needs the solution column of the file. Mean steps = decoder passes per puzzle (early stopping included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sudoku_data import read_pairs  # noqa: E402
from sudoku_train import HERE, evaluate  # noqa: E402

from dglocal.sudoku.core import format_grid  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(HERE / "checkpoint"))
    ap.add_argument("--file", default=str(HERE / "heldout.txt"), help="lines `puzzle [solution]`")
    ap.add_argument("--limit", type=int, default=0, help="first N puzzles only (0: all)")
    ap.add_argument("--steps", type=int, default=None, help="max_denoising_steps (default: the checkpoint's)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--output", help="write each returned grid (81 digits, one per line, input order)")
    ap.add_argument("--json", help="write the numbers as JSON")
    args = ap.parse_args(argv)

    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_num_threads(args.threads)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.checkpoint).to(args.device)
    model.set_experts_implementation("eager")
    pairs = read_pairs(args.file)
    if args.limit:
        pairs = pairs[: args.limit]
    overrides = {"max_denoising_steps": args.steps or model.generation_config.max_denoising_steps}
    t0 = time.time()
    r = evaluate(model, pairs, batch=args.batch, seed=args.seed, **overrides)
    seconds = time.time() - t0
    grids = r.pop("grids")
    r.update(seconds=round(seconds, 1), checkpoint=args.checkpoint, file=args.file, seed=args.seed, **overrides)
    print(f"{r['n']} puzzles: solved {r['solved']:.1%}, blank-cell accuracy {r['blank_acc']:.1%}, "
          f"mean steps {r['steps']:.1f} (max {overrides['max_denoising_steps']}), {seconds:.0f} s")
    if args.output:
        Path(args.output).write_text("".join(format_grid(g).replace(".", "0") + "\n" for g in grids))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
