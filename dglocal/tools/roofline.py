"""`dglocal bench MODEL --roofline DEVICE`: a step's time on hardware we cannot run, from the real graphs.

llama.cpp builds the denoise, commit and autoregressive-decode graphs of the loaded model (`diagnostics.graph_nodes`,
walked without running them; a model too large for this machine loads with `no_alloc`). Each node's time is
max(FLOPs / peak, bytes moved / memory bandwidth), with the peak of the unit that runs it: matmuls and attention
on tensor cores (int8 for quantized weights, which llama.cpp's CUDA kernels multiply in int8; fp16 for
f16/bf16), everything else on the vector units at fp32. Nodes run back to back, at their roofline: no launch
overhead, no overlap, perfect caches - a lower bound that moves with every change to the graph.

The GPU figures are the vendors' published dense peaks. "cpu" measures this machine: a float32 GEMM through
numpy for the peak and a large copy for the bandwidth.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from dglocal.runtime.options import DEFAULT_CTX

# ggml type ids (ggml.h): the float types; anything else here is a quantized weight
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
MATMUL_OPS = {"MUL_MAT", "MUL_MAT_ID", "FLASH_ATTN_EXT"}


@dataclass(frozen=True)
class Device:
    name: str
    fp16_tensor: float  # FLOP/s, dense, fp32 accumulate where the vendor says
    int8_tensor: float  # OP/s, dense
    fp32_vector: float  # FLOP/s
    bandwidth: float  # bytes/s


DEVICES = {
    "h100": Device("NVIDIA H100 SXM", 989e12, 1979e12, 67e12, 3.35e12),
    "h200": Device("NVIDIA H200", 989e12, 1979e12, 67e12, 4.8e12),
    "rtx4090": Device("NVIDIA RTX 4090", 165e12, 661e12, 82.6e12, 1.008e12),
    "rtx5090": Device("NVIDIA RTX 5090", 209.5e12, 838e12, 104.8e12, 1.792e12),
    "m3max": Device("Apple M3 Max (40-core GPU)", 14.2e12, 14.2e12, 14.2e12, 0.4e12),  # no int8 matrix units
}


def measure_cpu() -> Device:
    """This machine: float32 GEMM FLOP/s (numpy's BLAS on all its threads, 2048^3, best of 3) and copy bandwidth
    (256 MiB, read + write)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    gemm = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        gemm.append(2 * 2048**3 / (time.perf_counter() - t0))
    src = np.ones(64 << 20, np.float32)
    dst = np.empty_like(src)
    copy = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy.append(2 * src.nbytes / (time.perf_counter() - t0))
    peak = max(gemm)
    return Device("this CPU (measured)", peak, peak, peak, max(copy))


def node_seconds(dev: Device, op: str, src0_type: int, flops: float, nbytes: float) -> float:
    if op == "FLASH_ATTN_EXT" or (op in MATMUL_OPS and src0_type in (GGML_F16, GGML_BF16)):
        peak = dev.fp16_tensor  # f16 K/V and weights: tensor cores
    elif op in MATMUL_OPS and src0_type != GGML_F32:
        peak = dev.int8_tensor  # quantized weights: llama.cpp's int8 matmul kernels
    else:
        peak = dev.fp32_vector
    return max(flops / peak, nbytes / dev.bandwidth)


def _family(name: str, op: str) -> str:
    """A node's name without its layer index ("ffn_moe_up-12" -> "ffn_moe_up"), with its op; nodes llama.cpp
    leaves unnamed ("node_123") go by their op."""
    name = re.sub(r"-\d+$", "", name)
    return op if not name or re.fullmatch(r"node_\d+|leaf_\d+", name) else f"{name} ({op})"


def graph_time(dev: Device, nodes) -> tuple[float, dict[str, float]]:
    """Seconds for one pass, and seconds per node family."""
    per = defaultdict(float)
    for n in nodes:
        per[_family(n.name, n.op)] += node_seconds(dev, n.op, n.src0_type, n.flops, n.bytes)
    return sum(per.values()), per


def estimate(model, dev: Device, *, steps: int = 16, top: int = 10) -> dict:
    """The roofline of a loaded Model (no_alloc is enough): denoise step, commit, autoregressive token."""
    from dglocal.runtime.diagnostics import graph_nodes

    C = model.canvas_length
    step, per = graph_time(dev, graph_nodes(model, "denoise", C))
    commit, _ = graph_time(dev, graph_nodes(model, "encode", C))
    token, _ = graph_time(dev, graph_nodes(model, "encode", 1))
    worst = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return {
        "device": dev.name, "canvas_length": C, "n_ctx": model.n_ctx, "steps": steps,
        "ms_per_step": 1000 * step, "commit_ms": 1000 * commit,
        "canvas_tok_s": C / (steps * step + commit), "ar_tok_s": 1 / token, "ar_ms_per_token": 1000 * token,
        "top_nodes": [{"node": k, "ms": 1000 * v, "share": v / step} for k, v in worst],
    }


def roofline(path, device: str, *, n_ctx: int = DEFAULT_CTX, threads: int | None = None, steps: int = 16) -> dict:
    """`dglocal bench MODEL --roofline DEVICE`: load the shapes (no_alloc), walk the graphs, estimate. GPU devices
    get the graph GPU backends run (the reductions as a ggml op chain); cpu gets this CPU's own."""
    from dglocal.errors import ConfigError
    from dglocal.runtime.model import Model

    if device != "cpu" and device not in DEVICES:
        raise ConfigError(f"--roofline takes {', '.join([*DEVICES, 'cpu'])}, got {device!r}")
    dev = measure_cpu() if device == "cpu" else DEVICES[device]
    # a GPU runs the reductions as the op chain: walk that graph, not the CPU's fused op
    reductions = "auto" if device == "cpu" else "chain"
    with Model(path, n_ctx=n_ctx, n_threads=threads, no_alloc=True, reductions=reductions) as model:
        result = estimate(model, dev, steps=steps)
    result.update(model=str(path), peaks={"fp16_tensor": dev.fp16_tensor, "int8_tensor": dev.int8_tensor,
                                          "fp32_vector": dev.fp32_vector, "bandwidth": dev.bandwidth})
    return result
