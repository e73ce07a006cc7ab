"""Structured output at scale on any model: the test suite's 100 generated JSON schemas and 50 regular expressions
(tests/test_structured.py) against one GGUF, every answer validated (jsonschema, Python's re).

    python scripts/structured_check.py small.gguf --parallel 4      # the synth `small` preset, say

Prints a line per failure and, at the end, the counts, steps per answer and ms per step (scripts/grammar_bench.py
measures the masks' cost against unconstrained steps side by side).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jsonschema

import dglocal
from dglocal.generation.driver import run_many

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_structured import N_REGEXES, N_SCHEMAS, REGEXES, schema  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--parallel", type=int, default=4, help="canvases per forward")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    llm = dglocal.load(args.model, n_ctx=1024 * args.parallel, n_seq_max=args.parallel, n_threads=args.threads)
    budget = dict(max_new_tokens=args.tokens, max_denoising_steps=args.steps)
    specs = [(f"Item {i} as JSON.", dict(budget, seed=i, json_schema=schema(i))) for i in range(N_SCHEMAS)]
    specs += [(f"Value {i}:", dict(budget, seed=1000 + i, regex=REGEXES[i % len(REGEXES)])) for i in range(N_REGEXES)]
    t0 = time.perf_counter()
    outs = run_many(llm.model, specs)
    seconds = time.perf_counter() - t0
    failures = 0
    for i, ((_, opts), out) in enumerate(zip(specs, outs)):
        try:
            if "json_schema" in opts:
                jsonschema.validate(json.loads(out.text), opts["json_schema"])
            elif not re.fullmatch(opts["regex"], out.text):
                raise ValueError(f"{out.text!r} does not match {opts['regex']}")
            if out.finish_reason != "eos":
                raise ValueError(f"finished by {out.finish_reason}")
        except (ValueError, jsonschema.ValidationError) as e:
            failures += 1
            print(f"request {i}: {e}", flush=True)
    steps = [sum(o.stats.steps_per_canvas) for o in outs]
    print(json.dumps({"model": args.model, "requests": len(specs), "valid": len(specs) - failures,
                      "mean_steps": round(statistics.mean(steps), 1),
                      "ms_per_step": round(statistics.median(o.stats.ms_per_step for o in outs), 1),
                      "seconds": round(seconds, 1), "parallel": args.parallel}, indent=1))
    llm.close()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
