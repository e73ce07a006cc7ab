"""What structured output costs per denoising step: the same prompt and seed with and without a grammar, runs
interleaved in one process (the machine's noise falls on both alike), and the grammar's own host time.

    python scripts/grammar_bench.py small.gguf                      # a JSON schema, 4 runs each
    python scripts/grammar_bench.py small.gguf --regex '[a-z ]{20,80}\\.' --runs 6

Prints ms per step for each and their ratio, steps per canvas, and the ms per step spent walking the draft in the
grammar engine (masks and validation) on the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import dglocal
from dglocal.generation import grammar as g

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


class HostClock:
    """Time spent in CanvasGrammar's per-step methods."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("filters", "valid_prefix"):
            self._wrap(name)

    def _wrap(self, name):
        original = getattr(g.CanvasGrammar, name)

        def timed(obj, *a, **kw):
            t0 = time.perf_counter()
            try:
                return original(obj, *a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(g.CanvasGrammar, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--regex", help="a regex instead of the JSON schema")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    constraint = {"regex": args.regex} if args.regex else {"json_schema": SCHEMA}
    clock = HostClock()
    llm = dglocal.load(args.model, n_ctx=1024, n_threads=args.threads)
    opts = dict(max_new_tokens=args.tokens, max_denoising_steps=args.steps, seed=0)
    llm.generate("warm up", **opts)
    ms = {"free": [], "grammar": []}
    host, steps = [], []
    for _ in range(args.runs):
        ms["free"].append(llm.generate("Describe a person.", **opts).stats.ms_per_step)
        before = clock.seconds
        c = llm.generate("Describe a person.", **opts, **constraint)
        ms["grammar"].append(c.stats.ms_per_step)
        n = sum(c.stats.steps_per_canvas)
        host.append(1000 * (clock.seconds - before) / n)
        steps.append(n)
    free, constrained = statistics.median(ms["free"]), statistics.median(ms["grammar"])
    print(json.dumps({"model": args.model, "constraint": "regex" if args.regex else "json_schema",
                      "ms_per_step_free": round(free, 2), "ms_per_step_grammar": round(constrained, 2),
                      "ratio": round(constrained / free, 3), "grammar_host_ms_per_step": round(statistics.median(host), 2),
                      "steps_grammar": steps, "last_output": c.text[:200]}, indent=1))
    llm.close()


if __name__ == "__main__":
    main()
