"""The reference with llama.cpp's CPU rounding, and the weight scales under which the decoder amplifies it most.

llama.cpp's CPU kernels round the f32 input of every matrix product with a quantized weight into the weight type's
`vec_dot_type` blocks (q8_0 blocks of 32 for q8_0 / q4_0 / q5_0 / iq4_nl, q8_1 for q4_1 / q5_1, q8_K blocks of 256
for the K-quants; f16 / bf16 for f16 / bf16 weights) and compute the soft embedding through an f16 copy of the
embedding. `rounded_activations` does the same to the reference, so that "how far does the reference itself move
under that rounding" can be set against llama.cpp's error (docs/quantization.md, scripts/quant_sweep.py).
`rescale` redraws the q/k norm weights, the other norm weights or the layer scalars of a tests/tiny.py model.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

Q8_0_FAMILY = {"Q8_0", "Q4_0", "Q5_0", "IQ4_NL"}
Q8_1_FAMILY = {"Q4_1", "Q5_1"}  # q8_1: q8_0's rounding plus each block's sum of quants kept in f16
Q8_K_FAMILY = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}


def round_blocks(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x rounded as ggml's CPU quantize_row_<kind> then dequantized: q8_0 (blocks of 32, scale amax/127 kept in
    f16, round half to even), q8_K (blocks of 256, scale -127/max in f32), f16, bf16."""
    if kind == "f16":
        return x.half().float()
    if kind == "bf16":
        return x.bfloat16().float()
    b = x.float().reshape(-1, 32 if kind == "q8_0" else 256)
    if kind == "q8_0":
        amax = b.abs().amax(-1, keepdim=True)
        q = torch.round(b * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
        return (q * (amax / 127).half().float()).reshape(x.shape)
    mx = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
    iscale = torch.where(mx != 0, -127 / mx, torch.zeros_like(mx))
    q = torch.clamp(torch.round(b * iscale), max=127)
    return torch.where(mx != 0, q / iscale, torch.zeros_like(b)).reshape(x.shape)


def q8_1_sum_error(x: torch.Tensor) -> torch.Tensor:
    """Per block of 32 of x, what q8_1 adds to the block's sum: llama.cpp keeps s = f16(d * sum q) (d the f32
    scale) for the weight's offset term, while the quants carry f16(d). [..., K/32]"""
    b = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1)
    d = amax / 127
    qsum = torch.round(b * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)).unsqueeze(-1)).sum(-1)
    return (d * qsum).half().float() - d.half().float() * qsum


def block_offsets(tensor) -> np.ndarray:
    """The per-block offsets m of a Q4_1 / Q5_1 GGUF tensor (f16 at bytes 2..3 of each block): [..., rows, K/32]."""
    data = np.ascontiguousarray(tensor.data)
    size = {"Q4_1": 20, "Q5_1": 24}[tensor.tensor_type.name]
    blocks = data.reshape(*data.shape[:-1], -1, size)
    return np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)


@contextlib.contextmanager
def rounded_activations(model, path, soft_type: str = "f16"):
    """Inside the block, `model` (a reference holding the weights of the GGUF at `path`, test_convert's
    _dequantized_model) rounds every linear layer's input as llama.cpp's CPU kernels do for that weight's type in
    the file; the experts run on torch's eager path so that they go through F.linear. The soft embedding goes
    through a `soft_type` copy of E: "f16" (llama.cpp's default for a quantized file: E and the probabilities
    times 2^14 rounded to f16) or "f32" (exact)."""
    import gguf
    from test_convert import expected_tensors

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    by_address = {}  # a weight's storage address -> (rounding, Q4_1/Q5_1 offsets or None, bytes per expert or 0)
    for name, arr in expected_tensors(model).items():
        if arr is None:
            continue
        t = tensors[name].tensor_type.name
        kind = ("q8_0" if t in Q8_0_FAMILY | Q8_1_FAMILY else "q8_K" if t in Q8_K_FAMILY else
                {"F16": "f16", "BF16": "bf16"}.get(t))
        if kind:
            offsets = torch.from_numpy(block_offsets(tensors[name])) if t in Q8_1_FAMILY else None
            by_address[arr.__array_interface__["data"][0]] = (kind, offsets, arr[0].nbytes if arr.ndim == 3 else 0)

    linear, matmul = torch.nn.functional.linear, torch.matmul
    embed = model.model.decoder.embed_tokens.weight

    def rounded_linear(x, w, bias=None):
        address = w.untyped_storage().data_ptr()
        if address not in by_address:
            return linear(x, w, bias)
        kind, offsets, expert_bytes = by_address[address]
        y = linear(round_blocks(x, kind), w, bias)
        if offsets is not None:  # an expert is a slice of the 3D tensor: its index from the view's offset
            m = offsets[(w.data_ptr() - address) // expert_bytes] if expert_bytes else offsets
            y = y + q8_1_sum_error(x) @ m.T
        return y

    def rounded_matmul(a, b, **kw):
        if b is embed and soft_type == "f16":  # the soft embedding: probabilities @ E
            return matmul((a * 2 ** 14).half().float(), b.half().float(), **kw) / 2 ** 14
        return matmul(a, b, **kw)

    experts = [m for m in model.modules() if type(m).__name__.endswith("TextExperts")]
    saved = [m.config._experts_implementation for m in experts]
    torch.nn.functional.linear, torch.matmul = rounded_linear, rounded_matmul
    for m in experts:
        m.config._experts_implementation = "eager"
    try:
        yield
    finally:
        torch.nn.functional.linear, torch.matmul = linear, matmul
        for m, s in zip(experts, saved):
            m.config._experts_implementation = s


@torch.no_grad()
def rescale(model, seed: int, *, qk_norm=None, norms=None, scalars=None):
    """Redraw, uniformly in (lo, hi), the q/k norm weights (`qk_norm`), the other norm weights (`norms`) or the
    layer scalars (`scalars` = ((encoder lo, hi), (decoder lo, hi))) of a tests/tiny.py model; returns it."""
    g = torch.Generator().manual_seed(1000 + seed)

    def redraw(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    if scalars:
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                redraw(b, *scalars[0 if ".encoder." in name else 1])
    for name, p in model.named_parameters():
        if ".vision_tower." in name or ".embed_vision." in name:
            continue
        qk = name.endswith(("q_norm.weight", "k_norm.weight"))
        if qk and qk_norm:
            redraw(p, *qk_norm)
        elif not qk and norms and (name.endswith("norm.weight") or "layernorm" in name):
            redraw(p, *norms)
    return model
