"""What a windowed sliding cache costs a chat turn, against the full cache, on one GGUF (one run, side by side).

    python3 scripts/swa_turn_cost.py MODEL.gguf [--n-ctx 8192] [--prompt 2000] [--blocks 8] [--cut 700] [--threads 2]

Prints the KV bytes of each cache, the time and size of one checkpoint, and what cutting back `--cut` tokens
costs: nothing with the full cache, a checkpoint restore plus re-encoding with the windowed one, or a
re-encode from the start without checkpoints.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dglocal
from dglocal.runtime.diagnostics import memory_breakdown


def kv_bytes(m) -> int:
    return sum(parts["context"] for parts in memory_breakdown(m).values())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=8, help="canvases committed after the prompt")
    ap.add_argument("--cut", type=int, default=700, help="tokens cut from the end of the sequence")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    common = dict(n_ctx=a.n_ctx, n_threads=a.threads)
    for label, opts in [("full", dict(swa_full=True)), ("windowed", dict(swa_full=False)),
                        ("windowed, no checkpoints", dict(swa_full=False, swa_checkpoints=0))]:
        with dglocal.load(a.model, **common, **opts) as m:
            prompt = rng.integers(10, m.n_vocab, a.prompt).tolist()
            seq = m.sequence()
            _, t_prefill = timed(lambda: seq.prefill(prompt))
            blocks = rng.integers(10, m.n_vocab, (a.blocks, m.canvas_length)).tolist()
            _, t_commit = timed(lambda: [seq.commit(b) for b in blocks])
            t_commit /= a.blocks
            ck = seq._window.saved[-1] if seq._window and seq._window.saved else None
            n = len(seq.tokens) - a.cut
            reencoded, t_cut = timed(lambda: seq.truncate(n))
            line = (f"{label:26s} KV {kv_bytes(m) / 2**20:8.1f} MiB  prefill {a.prompt} {t_prefill:6.2f} s  "
                    f"commit {t_commit * 1e3:7.1f} ms  cut {a.cut} back: {reencoded} re-encoded, {t_cut:6.2f} s")
            if ck is not None:
                line += f"  checkpoint {len(ck.data) / 2**20:.1f} MiB"
            print(line, flush=True)


if __name__ == "__main__":
    main()
