"""What a loaded model costs, read from llama.cpp without running it: the compute nodes of its graphs as the
scheduler splits them between backends, the bytes per buffer type, and the host traffic of the last denoise call.
Used by memory plans, `dglocal bench --roofline` and the serve banner."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

from ..errors import BackendError, ConfigError
from . import checks

GRAPH_KINDS = {"encode": 0, "denoise": 1}  # llama_dg_graph_walk's kind: the causal encoder, a canvas pass


class GraphNode(NamedTuple):
    """One compute node of a graph as llama.cpp builds and schedules it."""

    op: str
    name: str
    src0_type: int  # ggml type id of the first source (a matmul's weight), -1 if none
    flops: float
    bytes: float  # read + written
    backend: str  # where the scheduler runs it ("CPU", "Vulkan0", "CUDA0", ...)
    copied: float  # bytes of its sources the scheduler copies in from another backend


def graph_nodes(model, kind: str, n_tokens: int) -> list[GraphNode]:
    """The compute nodes of the graph llama.cpp builds for one micro-batch of n_tokens ("encode" or "denoise"),
    walked without running it. Works with no_alloc."""
    model.check_open()
    if kind not in GRAPH_KINDS:
        raise ConfigError(f"graph kind must be one of {sorted(GRAPH_KINDS)}, got {kind!r}")
    n_tokens = checks.integer("n_tokens", n_tokens, 1, model.n_ubatch)
    nat, nodes = model._nat, []
    cb = nat.llama_dg_node_cb(lambda _u, op, name, t, flops, nbytes, backend, copied: nodes.append(
        GraphNode(op.decode(), name.decode(), t, flops, nbytes, backend.decode(), copied)))
    if model.native(nat.llama_dg_graph_walk, model._ctx, GRAPH_KINDS[kind], n_tokens, cb, None) < 0:
        raise BackendError(f"could not build the {kind} graph: {nat.last_errors()}")
    return nodes


def memory_breakdown(model) -> dict[str, dict[str, int]]:
    """Bytes per llama.cpp buffer type: {"CUDA0": {"model": .., "context": .., "compute": ..}, ...}, as allocated
    (or, with no_alloc, as llama.cpp would allocate them)."""
    model.check_open()
    out = {}
    cb = model._nat.llama_dg_memory_cb(lambda _u, name, m, c, k: out.__setitem__(
        name.decode(), {"model": m, "context": c, "compute": k}))
    model._nat.llama_dg_memory_breakdown(model._ctx, cb, None)
    return out


def last_io_bytes(model) -> tuple[int, int]:
    """(to backend, to host): bytes the last denoise call's graphs took from the host as inputs and gave back,
    summed over its passes: the per-step traffic when the layers run on a GPU or an RPC device."""
    model.check_open()
    to_backend, to_host = ctypes.c_int64(), ctypes.c_int64()
    model._nat.llama_dg_last_io_bytes(model._ctx, ctypes.byref(to_backend), ctypes.byref(to_host))
    return to_backend.value, to_host.value


def weights_where(model) -> str:
    """Where llama.cpp put the weights, largest first: "Vulkan0 2.4 MiB, CPU_Mapped 0.1 MiB"."""
    held = sorted(((d["model"], name) for name, d in memory_breakdown(model).items() if d["model"]), reverse=True)
    return ", ".join(f"{name} {size / 2**20:.1f} MiB" for size, name in held)
