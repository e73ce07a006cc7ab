"""The denoise pass' filters (top-k, top-p, min-p and token masks) against the reference's distributions.

The reference model gives each position's x = logits / T; the truncation, renormalisation and inverse-CDF draw
are recomputed here in numpy (float64, written out below, not dglocal's code), and the backend's argmax and draw
must be the same ids, its entropy the entropy of the truncated distribution. The CPU tier checks the fused CPU
op and (reductions="chain") the op chain other backends run; the GPU tier the device's.
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny
from reference_harness import ReferenceModel

from dglocal.errors import ConfigError
from dglocal.runtime.filters import Filters

pytestmark = [pytest.mark.backend, pytest.mark.gpu_tier]

C, V = tiny.CANVAS, tiny.VOCAB
# token masks as bias rows of 0 / -inf, and the same masks packed (32 ids per word, expanded on the device)
MASKED = [dict(bias=True), dict(bias=True, top_k=4), dict(bias=True, top_p=0.5), dict(mask=True),
          dict(mask=True, top_k=4), dict(mask=True, min_p=0.1)]
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


def packed(bias: np.ndarray) -> np.ndarray:
    """The rows of 0 / -inf bias as packed allow masks: bit v % 32 of word v // 32 set where id v is kept."""
    bits = np.zeros((len(bias), -(-V // 32) * 32), dtype=np.uint8)
    bits[:, :V] = bias == 0.0
    return np.packbits(bits, axis=1, bitorder="little").view("<u4").astype(np.uint32)


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
    for k, case in enumerate(CASES + MASKED):
        rng = np.random.default_rng(100 + k)
        canvas = rng.integers(0, V, C).astype(np.int32)
        u, T = rng.random(C), 0.55 + 0.05 * k
        bias = rows = None
        as_bits = case.pop("mask", False)
        if case.pop("bias", False) or as_bits:
            bias, rows = masks(k)
        filters = Filters(**case, allow=packed(bias), allow_row=rows) if as_bits else \
            Filters(**case, bias=bias, bias_row=rows)
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
    assert check_all(llama_model, ref) == len(CASES) + len(MASKED)


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


@pytest.mark.cpu_only  # the GPU tier runs the chain on the device in every other test of this module
def test_op_chain_matches_numpy(tiny_f32_gguf):
    """reductions="chain": the ggml op chain (argsort, cumsum, set_rows) the GPU backends run, on the CPU, in the
    same process as the fused op's contexts (a context parameter, not a process-wide switch)."""
    import dglocal

    with dglocal.load(str(tiny_f32_gguf), n_ctx=1024, kv_type="f32", n_threads=2, flash_attn=False,
                      reductions="chain") as m:
        assert check_all(m, ReferenceModel(tiny.tiny_model())) == len(CASES) + len(MASKED)


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


def test_packed_masks_equal_bias_rows_at_a_32nd_of_the_bytes(llama_model):
    """A token mask given packed (allow) gives the step the same bias rows would, token for token, and crosses to
    the backend as 24 ids per f32 word: the per-step bytes are counted exactly (llama_dg_last_io_bytes)."""
    from dglocal.runtime.diagnostics import last_io_bytes

    seq = llama_model.sequence()
    seq.prefill([5, 6, 7])
    bias, rows = masks(3)
    canvas, u = np.arange(C, dtype=np.int32) + 3, np.random.default_rng(2).random(C)
    sent = {}
    for name, filters in [("none", Filters(top_k=V + 5)), ("bias", Filters(bias=bias, bias_row=rows)),
                          ("allow", Filters(allow=packed(bias), allow_row=rows))]:
        out = seq.denoise(canvas, temperature=0.7, uniforms=u, self_condition=False, filters=filters)
        sent[name] = (last_io_bytes(llama_model)[0], out)
    for field in ("argmax", "sampled", "entropy"):
        np.testing.assert_array_equal(getattr(sent["allow"][1], field), getattr(sent["bias"][1], field))
    rows_per_row = C * 4  # each position's row index (int32)
    assert sent["bias"][0] - sent["none"][0] == (1 + len(bias)) * V * 4 + rows_per_row  # a zero row, then the rows
    words = -(-V // 24)  # an all-allowed row, then the masks, 24 ids per f32 word; and the 24 bit scales
    assert sent["allow"][0] - sent["none"][0] == (1 + len(bias)) * words * 4 + 24 * 4 + rows_per_row


def test_bad_packed_masks_are_refused(llama_model):
    seq = llama_model.sequence()
    seq.prefill([5, 6])
    bias, rows = masks(1)
    allow = packed(bias)
    canvas = np.arange(C, dtype=np.int32)
    for bad, message in [(Filters(allow=allow, allow_row=None), "together"),
                         (Filters(allow=allow[:, :-1], allow_row=rows), "allow must be"),
                         (Filters(allow=np.zeros_like(allow), allow_row=rows), "removes every token"),
                         (Filters(allow=allow, allow_row=np.full(C, 3)), "allow_row"),
                         (Filters(allow=allow, allow_row=rows, bias=bias, bias_row=rows), "not both")]:
        with pytest.raises(ConfigError, match=message):
            seq.denoise(canvas, temperature=0.7, filters=bad)
