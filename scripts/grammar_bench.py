"""What structured output costs per denoising step: the same prompt and seed with and without a grammar, runs
interleaved in one process (the machine's noise falls on both alike), and the grammar's own host time.

    python scripts/grammar_bench.py small.gguf                      # a JSON schema, 4 runs each
    python scripts/grammar_bench.py small.gguf --kind plain         # pydantic's strings, no maxLength
    python scripts/grammar_bench.py small.gguf --regex '[a-z ]{20,80}\\.' --runs 6

Prints ms per step for each and their ratio, steps per canvas, the ms per step spent on the host in the grammar
(walking the draft for masks, validating it, keeping the answer within its budget, committing a block) and its
share of a step, the bytes each step sends to the backend, and how many of the constrained answers parse.
`--masks rows` sends the grammar's masks as float32 bias rows (0 / -inf, a whole vocabulary each) instead of the
packed bit rows, the way they went before: the two side by side are the packed masks' saving.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import numpy as np

import dglocal
from dglocal.generation import grammar as g
from dglocal.runtime import model as runtime_model
from dglocal.runtime.diagnostics import last_io_bytes
from dglocal.runtime.filters import Filters

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
# what pydantic writes: strings with no maxLength, an enum, an optional field, a bounded list, a nested object
PLAIN = {"type": "object", "properties": {"name": {"type": "string"}, "color": {"enum": ["red", "green", "blue"]},
                                          "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                          "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                                          "pet": {"type": "object", "properties": {"kind": {"type": "string"},
                                                                                   "age": {"type": "integer"}},
                                                  "required": ["kind", "age"]}},
         "required": ["name", "color", "tags", "pet"]}
KINDS = {"schema": {"json_schema": SCHEMA}, "plain": {"json_schema": PLAIN},
         "object": {"grammar": g.GrammarSpec("json_object")}}


class HostClock:
    """Time spent in CanvasGrammar's per-step methods."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("filters", "valid_prefix", "commit"):
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


class Traffic:
    """Bytes each denoise pass sends to the backend (its graph inputs: tokens, masks, uniforms, ...)."""

    def __init__(self):
        self.passes, self.to_backend = 0, 0
        original = runtime_model.Model.denoise_batch

        def counted(model, *a, **kw):
            out = original(model, *a, **kw)
            self.passes += 1
            self.to_backend += last_io_bytes(model)[0]
            return out

        runtime_model.Model.denoise_batch = counted

    def mark(self) -> tuple[int, int]:
        return self.passes, self.to_backend


def as_bias_rows() -> None:
    """The grammar's packed masks sent as float32 bias rows (0 keeps a token, -inf removes it)."""
    original = g.CanvasGrammar.filters

    def filters(obj, *a, **kw):
        f = original(obj, *a, **kw)
        if f is None or f.allow is None:
            return f
        bits = np.unpackbits(f.allow.view(np.uint8), axis=1, bitorder="little")[:, : obj.n_vocab].astype(bool)
        bias = np.where(bits, np.float32(0), np.float32(-np.inf)).astype(np.float32)
        return Filters(f.top_k, f.top_p, f.min_p, bias=bias, bias_row=f.allow_row)

    g.CanvasGrammar.filters = filters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--kind", choices=sorted(KINDS), default="schema",
                    help="a JSON schema with bounded strings, pydantic's plain one, or any JSON object")
    ap.add_argument("--regex", help="a regex instead of a JSON constraint")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--masks", choices=("packed", "rows"), default="packed",
                    help="how the masks reach the backend: packed bits (dglocal's way) or float32 bias rows")
    args = ap.parse_args()
    constraint = {"regex": args.regex} if args.regex else KINDS[args.kind]
    clock, traffic = HostClock(), Traffic()
    if args.masks == "rows":
        as_bias_rows()
    llm = dglocal.load(args.model, n_ctx=1024, n_threads=args.threads)
    opts = dict(max_new_tokens=args.tokens, max_denoising_steps=args.steps)
    llm.generate("warm up", **opts, seed=0)
    ms = {"free": [], "grammar": []}
    host, steps, parsed, sent = [], [], 0, {"free": [], "grammar": []}
    for run in range(args.runs):
        opts["seed"] = run  # run k: the same seed with and without the grammar
        mark = traffic.mark()
        ms["free"].append(llm.generate("Describe a person.", **opts).stats.ms_per_step)
        sent["free"].append(_per_pass(mark, traffic.mark()))
        before, mark = clock.seconds, traffic.mark()
        c = llm.generate("Describe a person.", **opts, **constraint)
        sent["grammar"].append(_per_pass(mark, traffic.mark()))
        ms["grammar"].append(c.stats.ms_per_step)
        n = sum(c.stats.steps_per_canvas)
        host.append(1000 * (clock.seconds - before) / n)
        steps.append(n)
        parsed += _parses(c.text, args.regex)
    free, constrained = statistics.median(ms["free"]), statistics.median(ms["grammar"])
    print(json.dumps({"model": args.model, "constraint": "regex" if args.regex else args.kind,
                      "max_tokens": args.tokens, "ms_per_step_free": round(free, 2),
                      "ms_per_step_grammar": round(constrained, 2), "ratio": round(constrained / free, 3),
                      "grammar_host_ms_per_step": round(statistics.median(host), 2),
                      "grammar_host_share": round(statistics.median(host) / constrained, 4), "masks": args.masks,
                      "bytes_to_backend_per_step_free": round(statistics.median(sent["free"])),
                      "bytes_to_backend_per_step_grammar": round(statistics.median(sent["grammar"])),
                      "parsed": f"{parsed}/{args.runs}", "steps_grammar": steps, "last_output": c.text[:200]}, indent=1))
    llm.close()


def _per_pass(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[1] - before[1]) / max(after[0] - before[0], 1)


def _parses(text: str, regex: str | None) -> bool:
    if regex is not None:
        return re.fullmatch(regex, text) is not None
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()
