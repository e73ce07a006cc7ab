"""The denoise pass' filters (top-k, top-p, min-p and token masks) against the reference's distributions.

The reference model gives each position's x = logits / T; the truncation, renormalisation and inverse-CDF draw
are recomputed here in numpy (float64, written out below, not dglocal's code), and the backend's argmax and draw
must be the same ids, its entropy the entropy of the truncated distribution. The CPU tier checks the fused CPU
op and (in a subprocess, LLAMA_DG_REDUCE=chain) the op chain other backends run; the GPU tier the device's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny
from reference_harness import ReferenceModel

from dglocal.errors import ConfigError
from dglocal.runtime.filters import Filters

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

C, V = tiny.CANVAS, tiny.VOCAB
CASES = [dict(top_k=3), dict(top_k=1), dict(top_p=0.6), dict(top_p=0.05), dict(min_p=0.2),
         dict(top_k=40, top_p=0.8, min_p=0.05), dict(top_k=V + 5)]


def truncated(x: np.ndarray, top_k=0, top_p=1.0, min_p=0.0, bias=None) -> np.ndarray:
    """Rows of x with what the filters remove set to -inf: bias added; then, in descending order of x, ids kept
    while rank < top_k, while the (top-k renormalised) mass before them is < top_p, while x - max >= log min_p."""
    x = x.astype(np.float64) + (0.0 if bias is None else bias)
    out = np.empty_like(x)
    for r, row in enumerate(x):
        order = np.argsort(-row, kind="stable")
        xs = row[order]
        keep = np.ones(len(row), dtype=bool)
        if top_k:
            keep &= np.arange(len(row)) < top_k
        p = np.exp(np.where(keep, xs, -np.inf) - xs[0])
        p /= p.sum()
        if top_p < 1.0:
            keep &= np.cumsum(p) - p < top_p
        if min_p > 0:
            keep &= xs - xs[0] >= np.log(min_p)
        flags = np.zeros(len(row), dtype=bool)
        flags[order] = keep
        out[r] = np.where(flags, row, -np.inf)
    return out


def expected(x: np.ndarray, u: np.ndarray):
    """(argmax, inverse-CDF draw, entropy) of softmax over each row of x (-inf: removed)."""
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    draw = np.minimum((np.cumsum(p, axis=1) < u[:, None]).sum(axis=1), x.shape[1] - 1)
    logp = np.log(np.where(p > 0, p, 1.0))
    return x.argmax(axis=1), draw, -(p * logp).sum(axis=1)


def masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three random token masks (each keeps 5..200 ids) and each position's row (-1 for a few: unmasked)."""
    rng = np.random.default_rng(seed)
    bias = np.full((3, V), -np.inf, dtype=np.float32)
    for row in bias:
        row[rng.choice(V, rng.integers(5, 200), replace=False)] = 0.0
    rows = rng.integers(-1, 3, C).astype(np.int32)
    return bias, rows


TIE = 1e-5  # relative: two logits this close are equal at the f32 precision the device computes in


def assert_same_ids(got, want, x, what: str) -> None:
    """Equal argmax ids, except where the reference's logits of the two ids are equal at f32 precision (a tie the
    device's kernels may break either way: seen on AVX-512, 26.022940 against 26.022942)."""
    rows = np.arange(len(want))
    tied = np.abs(x[rows, got] - x[rows, want]) <= TIE * np.abs(x[rows, want])
    assert ((got == want) | tied).all(), f"{what}: {got.tolist()} != {want.tolist()}"


def check_all(model, ref) -> int:
    """Every case on fresh canvases: the device's ids equal numpy's; returns the number of checks."""
    seq, rseq = model.sequence(), ref.sequence()
    prompt = np.random.default_rng(1).integers(3, V, 9).tolist()
    seq.prefill(prompt)
    rseq.prefill(prompt)
    n = 0
    for k, case in enumerate(CASES + [dict(bias=True), dict(bias=True, top_k=4), dict(bias=True, top_p=0.5)]):
        rng = np.random.default_rng(100 + k)
        canvas = rng.integers(0, V, C).astype(np.int32)
        u, T = rng.random(C), 0.55 + 0.05 * k
        bias = rows = None
        if case.pop("bias", False):
            bias, rows = masks(k)
        filters = Filters(**case, bias=bias, bias_row=rows)
        got = seq.denoise(canvas, temperature=T, uniforms=u, self_condition=False, filters=filters)
        x = rseq.denoise(canvas, temperature=T, uniforms=u, self_condition=False, return_logits=True).logits
        per_position = None if bias is None else np.where(rows[:, None] >= 0, bias[np.maximum(rows, 0)], 0.0)
        kept = truncated(x, **case, bias=per_position)
        want = expected(kept, u.astype(np.float32).astype(np.float64))
        assert_same_ids(got.argmax, want[0], kept, f"argmax {case}")
        np.testing.assert_array_equal(got.sampled, want[1], err_msg=f"draw {case}")
        np.testing.assert_allclose(got.entropy, want[2], atol=2e-4, rtol=2e-4, err_msg=f"entropy {case}")
        n += 1
    return n


@pytest.fixture(scope="module")
def ref(tiny_model):
    return ReferenceModel(tiny_model)


def test_filters_match_numpy_over_the_reference(llama_model, ref):
    assert check_all(llama_model, ref) == len(CASES) + 3


def test_filtered_and_plain_passes_interleave(llama_model, ref):
    """A graph built for filters and one without alternate on one context: each call gets its own."""
    seq = llama_model.sequence()
    seq.prefill([5, 6, 7])
    canvas = np.arange(C, dtype=np.int32) + 3
    plain = seq.denoise(canvas, temperature=0.7, self_condition=False)
    seq.denoise(canvas, temperature=0.7, self_condition=False, filters=Filters(top_k=1))
    again = seq.denoise(canvas, temperature=0.7, self_condition=False)
    np.testing.assert_array_equal(plain.argmax, again.argmax)
    np.testing.assert_array_equal(plain.entropy, again.entropy)
    greedy = seq.denoise(canvas, temperature=0.7, uniforms=np.full(C, 0.999), self_condition=False,
                         filters=Filters(top_k=1))
    np.testing.assert_array_equal(greedy.sampled, plain.argmax)  # top-1: the draw is the argmax
    np.testing.assert_array_equal(greedy.entropy, np.zeros(C, np.float32))


@pytest.mark.skipif(bool(os.environ.get("DGLOCAL_TEST_DEVICE")), reason="the chain runs on the device in the GPU tier")
def test_op_chain_matches_numpy(tiny_f32_gguf):
    """LLAMA_DG_REDUCE=chain: the ggml op chain (argsort, cumsum, set_rows) the GPU backends run, on the CPU."""
    code = ("import sys; sys.path.insert(0, 'tests'); import dglocal, test_filters as t, tiny; "
            "from reference_harness import ReferenceModel; "
            f"m = dglocal.load({str(tiny_f32_gguf)!r}, n_ctx=1024, kv_type='f32', n_threads=2, flash_attn=False); "
            "print('checks', t.check_all(m, ReferenceModel(tiny.tiny_model())))")
    env = dict(os.environ, LLAMA_DG_REDUCE="chain")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"checks {len(CASES) + 3}" in r.stdout


@pytest.mark.parametrize("bad, message", [
    (Filters(top_k=-1), "top_k"), (Filters(top_p=0.0), "top_p"), (Filters(min_p=1.5), "min_p"),
    (Filters(bias=np.zeros((1, V)), bias_row=None), "together"),
    (Filters(bias=np.zeros((1, V - 1)), bias_row=np.zeros(C)), "bias must be"),
    (Filters(bias=np.zeros((1, V)), bias_row=np.full(C, 1)), "bias_row"),
    (Filters(bias=np.full((1, V), -np.inf), bias_row=np.zeros(C)), "every token"),
    (Filters(bias=np.full((1, V), np.nan), bias_row=np.zeros(C)), "finite"),
])
def test_bad_filters_are_refused(llama_model, bad, message):
    seq = llama_model.sequence()
    seq.prefill([5, 6])
    with pytest.raises(ConfigError, match=message):
        seq.denoise(np.arange(C, dtype=np.int32), temperature=0.7, filters=bad)
