"""Run one fixed denoise trajectory on a GGUF and save its logits: the child process of tests/test_placement.py.

    python tests/placement_probe.py MODEL.gguf OUT.npz '{"extra_bufts": false, "rpc": ["127.0.0.1:50052"]}'

In a child process so that a backend abort or segfault fails one test instead of killing the test run.
Trajectory (fixed canvases, so placements that round differently still see the same inputs):
prefill PROMPT; denoise C1 (no self-conditioning, T=1); C2 and C3 self-conditioned (T=0.8, 0.6);
commit C3; denoise C1 again (no self-conditioning). Saved: enc (next-token logits at PROMPT positions 7..12: [6, V]), steps [4, C, V].
Then the fast sampler's top-K pass (fast_k 24) on C2 beside the whole pass on the same input, and a self-conditioned
top-K pass after it, which reads the embedding rows the first gathered: saved as their argmax (`whole`, `top_k`)
and the second's entropy (`after`).
"""

from __future__ import annotations

import json
import sys

import numpy as np

PROMPT = [int(t) for t in np.random.default_rng(11).integers(3, 512, 13)]  # beyond the tiny sliding window (8)
CANVASES = [np.random.default_rng(20 + k).integers(0, 512, 16).astype(np.int32) for k in range(3)]
STEPS = [(0, 1.0, False), (1, 0.8, True), (2, 0.6, True), ("commit", None, None), (0, 1.0, False)]


def denoise_steps(seq) -> np.ndarray:
    """Raw decoder logits [4, C, V] along STEPS, after PROMPT was prefilled; `seq` is a dglocal Sequence or the
    reference harness's (whose logits are processed, raw / T: scaled back here)."""
    steps = []
    for k, temperature, sc in STEPS:
        if k == "commit":
            seq.commit(CANVASES[2])
            continue
        out = seq.denoise(CANVASES[k], temperature=temperature, self_condition=sc, return_logits=True)
        steps.append(out.logits if hasattr(seq, "seq_id") else out.logits * np.float32(temperature))
    return np.stack(steps)


def fast_passes(seq) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole pass's argmax and the top-K pass's on the same input (equal: the argmax is among the top K), and
    the entropy of a top-K pass self-conditioned on the rows the previous one gathered."""
    from dglocal.runtime.fastpass import FastPass

    whole = seq.denoise(CANVASES[1], temperature=0.8, self_condition=False).argmax
    top_k = seq.denoise(CANVASES[1], temperature=0.8, self_condition=False, fast=FastPass(fast_k=24)).argmax
    after = seq.denoise(CANVASES[1], temperature=0.8, self_condition=True, fast=FastPass(fast_k=24)).entropy
    return whole, top_k, after


def main(path: str, out: str, options: str) -> int:
    import dglocal

    opts = {"n_ctx": 64, "kv_type": "f32", "flash_attn": False, "n_threads": 2, **json.loads(options)}
    with dglocal.load(path, **opts) as model:
        seq = model.sequence()
        enc = [seq.prefill(PROMPT[:8], logits_last=True)] + [seq.prefill([t], logits_last=True) for t in PROMPT[8:]]
        steps = denoise_steps(seq)
        whole, top_k, after = fast_passes(seq)
    np.savez(out, enc=np.stack(enc), steps=steps, whole=whole, top_k=top_k, after=after)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
