"""`dglocal plan MODEL --vram 12G`: a placement that fits a device, from the sizes llama.cpp itself allocates.

Every candidate placement is loaded with llama.cpp's `no_alloc` (shapes only, nothing read or allocated), and its
buffers are read back per buffer type (`Model.memory_breakdown`): weights, KV cache and self-conditioning state,
and the compute buffers of the larger of the encoder's and the denoise graph. The search keeps as much on the
device as fits `vram` minus a margin: all layers; else the experts of the first N layers on the host
(`--n-cpu-moe N`, the smallest N that fits); else every expert on the host and the first layers only
(`-ngl`). The device is the first GPU, or the `--rpc` servers; with neither, a temporary `dglocal rpc-server` on
127.0.0.1 stands in for a GPU (the CPU backend's compute buffers, close to a GPU's).
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from ..errors import BackendError, ConfigError
from . import swa
from .options import DEFAULT_CTX, DEFAULT_IMAGE_TOKENS, ubatch_for

PARTS = ("model", "context", "compute")


@dataclass
class Choice:
    n_gpu_layers: int  # llama.cpp's -ngl: -1 every layer and the output
    n_cpu_moe: int  # experts of the first N layers on the host
    device: dict  # bytes per part on the device
    host: dict  # bytes per part in host memory
    cache: str = ""  # the sliding layers' KV cache, in words
    devices: dict = field(default_factory=dict)  # total bytes per device buffer type (CUDA0, RPC0[...], ...)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())


def measure(path, *, n_ctx: int, parallel: int, n_ubatch: int, kv_type: str, n_gpu_layers: int, n_cpu_moe: int,
            rpc: list[str] | None, swa_full: bool | None = None, tensor_split: list[float] | None = None) -> Choice:
    """One placement's buffers, as llama.cpp sizes them (no_alloc), split into devices and host."""
    from .diagnostics import memory_breakdown
    from .placement import host_buffer_types, is_host_buffer
    from .model import Model

    with Model(path, n_ctx=n_ctx, n_seq_max=parallel, n_ubatch=n_ubatch, kv_type=kv_type, n_gpu_layers=n_gpu_layers,
               n_cpu_moe=n_cpu_moe, rpc=rpc, no_alloc=True, mmap=False, swa_full=swa_full,
               tensor_split=tensor_split) as m:
        breakdown = memory_breakdown(m)
        cache = swa.describe(m.swa_full, m.sliding_window)
        host_types = host_buffer_types()
    device = {p: 0 for p in PARTS}
    host = {p: 0 for p in PARTS}
    devices = {}
    for name, parts in breakdown.items():
        side = host if is_host_buffer(name, host_types) else device
        for p in PARTS:
            side[p] += parts[p]
        if side is device:
            devices[name] = sum(parts[p] for p in PARTS)
    return Choice(n_gpu_layers, n_cpu_moe, device, host, cache, devices)


def device_names(rpc: list[str] | None) -> list[str]:
    """The buffer type names of the devices a load uses, in llama.cpp's order (RPC servers, then GPUs)."""
    from . import native as nat
    from .placement import load_devices

    return [nat.ggml_backend_buft_name(nat.ggml_backend_dev_buffer_type(d)).decode() for d in load_devices(rpc)]


def _smallest(lo: int, hi: int, ok) -> int | None:
    """The smallest k in [lo, hi] with ok(k), for ok monotone (False ... True); None if ok(hi) is False."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def search(path, vram, *, n_ctx: int = DEFAULT_CTX, parallel: int = 1, kv_type: str = "f16",
           rpc: list[str] | None = None, margin: int | None = None, swa_full: bool | None = None,
           mmproj=None, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> dict:
    """The placement that keeps the most on the devices, `vram` bytes each (a list: one size per device, in
    llama.cpp's order; the layers are then split in proportion, as -ts); the candidates measured on the way.
    With `mmproj`, the vision tower (libmtmd puts it on the first device) is set aside there first: its weights
    and its compute buffer for `image_tokens` without flash attention, the bound that holds on every backend."""
    from . import checks
    from .gguf import read_header

    header = read_header(path)
    canvas = checks.model_file(path, header)
    n_layer = int(header.kv["diffusion-gemma.block_count"])  # model_file checked the architecture
    # as run / serve load it (LoadOptions.resolve)
    n_ubatch = ubatch_for(canvas, parallel, image_tokens=image_tokens if mmproj is not None else None)
    names = device_names(rpc)
    sizes = list(vram) if isinstance(vram, (list, tuple)) else [vram] * len(names)
    if len(sizes) != len(names):
        raise ConfigError(f"--vram gives {len(sizes)} sizes for {len(names)} devices ({', '.join(names)})")
    margins = [max(256 << 20, v // 32) if margin is None else margin for v in sizes]
    budget = {n: v - m for n, v, m in zip(names, sizes, margins)}
    tower = None
    if mmproj is not None:
        from .vision import tower_memory

        tower = tower_memory(mmproj, int(header.kv["diffusion-gemma.embedding_length"]), image_tokens)
        if names:
            budget[names[0]] -= tower["weights"] + tower["compute"]
    split = sizes if len(sizes) > 1 else None
    seen: dict[tuple[int, int], Choice] = {}

    def at(ngl: int, k: int) -> Choice:
        if (ngl, k) not in seen:
            seen[ngl, k] = measure(path, n_ctx=n_ctx, parallel=parallel, n_ubatch=n_ubatch, kv_type=kv_type,
                                   n_gpu_layers=ngl, n_cpu_moe=k, rpc=rpc, swa_full=swa_full, tensor_split=split)
        return seen[ngl, k]

    def fits(ngl: int, k: int) -> bool:
        used = at(ngl, k).devices
        return all(used.get(n, 0) <= b for n, b in budget.items())

    k = _smallest(0, n_layer, lambda k: fits(-1, k))
    if k is not None:
        chosen = at(-1, k)
    else:  # every expert on the host is not enough: fewer layers on the device (ngl counts the output too)
        off = _smallest(0, n_layer + 1, lambda d: fits(n_layer + 1 - d, n_layer))
        chosen = at(n_layer + 1 - off, n_layer) if off is not None else at(0, n_layer)
    return {"model": str(path), "vram": sum(sizes), "margin": sum(margins), "n_ctx": n_ctx, "parallel": parallel,
            "kv_type": kv_type, "n_layer": n_layer, "choice": asdict(chosen),
            "devices": [{"name": n, "vram": v, "budget": budget[n], "used": chosen.devices.get(n, 0)}
                        for n, v in zip(names, sizes)],
            "tensor_split": split, "fits": fits(chosen.n_gpu_layers, chosen.n_cpu_moe),
            "words": describe(chosen, n_layer), "measured": [asdict(c) for c in seen.values()], "vision": tower}


def describe(c: Choice, n_layer: int) -> str:
    """In words. llama.cpp offloads the last -ngl layers, the output layer (LM head, and here the soft embedding's
    copy and the vocabulary-wide compute buffers) counting as one."""
    if c.n_gpu_layers == 0:
        return "everything on the host"
    if c.n_gpu_layers < 0 or c.n_gpu_layers > n_layer:
        where = f"all {n_layer} layers on the device"
    else:
        where = f"the output layer and the last {c.n_gpu_layers - 1} of {n_layer} layers on the device"
    if c.n_cpu_moe:
        where += f"; the experts of the first {c.n_cpu_moe} layers in host memory"
    return where


@contextmanager
def stand_in_device():
    """A `dglocal rpc-server` on a free 127.0.0.1 port, for sizing a device this machine does not have."""
    import socket

    from .placement import _check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dglocal.cli", "rpc-server", "--port", str(port), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _check_reachable(f"127.0.0.1:{port}", timeout=1)
                break
            except BackendError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BackendError("could not start a local rpc-server to size the device") from None
                time.sleep(0.2)
        yield [f"127.0.0.1:{port}"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def parse_vram(vram):
    """--vram: "12G" (each device), "24G,12G" (one per device), bytes, or a list of those."""
    from .checks import parse_size

    items = vram.split(",") if isinstance(vram, str) else vram if isinstance(vram, (list, tuple)) else [vram]
    sizes = [parse_size(v) if isinstance(v, str) else int(v) for v in items]
    if not sizes or any(v <= 0 for v in sizes):
        raise ConfigError(f"--vram must be positive sizes (e.g. 12G or 24G,12G), got {vram!r}")
    return sizes if len(sizes) > 1 else sizes[0]


def plan(path, vram, *, n_ctx: int = DEFAULT_CTX, parallel: int = 1, kv_type: str = "f16", rpc: list[str] | None = None,
         margin=None, swa_full: bool | None = None, mmproj=None, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> dict:
    """search() on this machine's GPU, the given RPC servers, or a local stand-in for a device."""
    from .checks import parse_size
    from .placement import _local_devices

    vram = parse_vram(vram)
    margin = parse_size(margin) if isinstance(margin, str) else margin
    kw = dict(n_ctx=n_ctx, parallel=parallel, kv_type=kv_type, margin=margin, swa_full=swa_full, mmproj=mmproj,
              image_tokens=image_tokens)
    if rpc or _local_devices():
        result = search(path, vram, rpc=rpc, **kw)
        result["device"] = "rpc" if rpc else "gpu"
        return result
    with stand_in_device() as endpoints:
        result = search(path, vram, rpc=endpoints, **kw)
    result["device"] = "stand-in"
    return result


def fit(path, *, n_ctx: int, parallel: int = 1, kv_type: str = "f16", rpc: list[str] | None = None,
        swa_full: bool | None = None, mmproj=None, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> dict | None:
    """`run --fit` / `serve --fit`: the plan for the free memory of the first GPU (or RPC server) now, as load
    options {n_gpu_layers, n_cpu_moe} plus its words; None without a device (everything stays on the host)."""
    import ctypes

    from . import native as nat
    from .placement import load_devices

    devs = load_devices(rpc)
    if not devs:
        return None
    free = []
    for d in devs:
        f, total = ctypes.c_size_t(), ctypes.c_size_t()
        nat.ggml_backend_dev_memory(d, ctypes.byref(f), ctypes.byref(total))
        free.append(int(f.value))
    r = search(path, free if len(free) > 1 else free[0], n_ctx=n_ctx, parallel=parallel, kv_type=kv_type, rpc=rpc,
               swa_full=swa_full, mmproj=mmproj, image_tokens=image_tokens)
    c = r["choice"]
    return {"n_gpu_layers": c["n_gpu_layers"], "n_cpu_moe": c["n_cpu_moe"], "words": r["words"],
            "free": sum(free), "tensor_split": r["tensor_split"]}
