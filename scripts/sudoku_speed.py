"""Per-step time of the Sudoku model: dglocal (`Model.stream`) beside the reference transformers `generate`.

    python scripts/sudoku_speed.py [--n 16] [--threads 1] [--rounds 2]

Same checkpoint (the shipped GGUF is converted from it), same held-out puzzles, batch 1, the model alone (no
guide), each puzzle once per runtime per round, runtimes alternating. Per-step time = a generation's wall time
(prompt encode included) / its decoder passes, summed over the puzzles; for dglocal also the median of its
Step events (the decoder pass alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sudoku_data import read_pairs  # noqa: E402
from sudoku_train import HERE  # noqa: E402

from dglocal import sudoku  # noqa: E402
from dglocal.sudoku import core as sc  # noqa: E402
from dglocal.generation.events import Completion, Step  # noqa: E402

GGUF = Path(sudoku.__file__).parent.parent / "data" / "sudoku.gguf"


def reference(model, gc, puzzles) -> tuple[float, float]:
    wall = steps = 0.0
    for p in puzzles:
        ids = torch.tensor([sc.encode_prompt(p)])
        t0 = time.perf_counter()
        out = model.generate(ids, generation_config=gc)
        wall += time.perf_counter() - t0
        canvas = out.sequences[:, sc.PROMPT_LENGTH:]
        steps += ((canvas != sc.PAD_ID).sum(-1).float() / out.tokens_per_forward.float()).sum().item()
    return wall, steps


def ours(model, puzzles) -> tuple[float, float, list[float]]:
    wall = steps = 0.0
    step_s: list[float] = []
    for i, p in enumerate(puzzles):
        t0 = time.perf_counter()
        for event in model.stream(sc.encode_prompt(p), **sudoku.puzzle_options(p, seed=i, guide=False)):
            if isinstance(event, Step):
                step_s.append(event.seconds)
            elif isinstance(event, Completion):
                steps += sum(event.stats.steps_per_canvas)
        wall += time.perf_counter() - t0
    return wall, steps, step_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)

    from transformers import DiffusionGemmaForBlockDiffusion

    torch.set_num_threads(args.threads)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(HERE / "checkpoint")
    ref.set_experts_implementation("eager")
    ref.eval()
    gc = ref.generation_config
    puzzles = [p for p, _ in read_pairs(HERE / "heldout.txt")[: args.n]]
    llm = sudoku.load_model(GGUF, threads=args.threads)
    with torch.no_grad():
        reference(ref, gc, puzzles[:2])  # warm-up, both runtimes
    ours(llm, puzzles[:2])
    ref_ms, our_ms, pass_ms = [], [], []
    for _ in range(args.rounds):
        with torch.no_grad():
            wall, steps = reference(ref, gc, puzzles)
        ref_ms.append(1000 * wall / steps)
        wall, steps, step_s = ours(llm, puzzles)
        our_ms.append(1000 * wall / steps)
        pass_ms.append(1000 * statistics.median(step_s))
    r, o = statistics.median(ref_ms), statistics.median(our_ms)
    print(f"{args.n} puzzles x {args.rounds} rounds, {args.threads} thread(s), batch 1")
    print(f"transformers generate: {r:.2f} ms/step")
    print(f"dglocal Model.stream:  {o:.2f} ms/step (decoder pass alone {statistics.median(pass_ms):.2f} ms)")
    print(f"ratio dglocal / transformers: {o / r:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
