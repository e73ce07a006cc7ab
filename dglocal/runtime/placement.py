"""Where the weights go: llama.cpp's devices, tensor buffer overrides (`-ot`, `--n-cpu-moe`) and ggml RPC servers.

    devices(rpc=["127.0.0.1:50052"])          # the devices a model is loaded onto (RPC servers first, then GPUs)
    overrides(["exps=CPU"], n_cpu_moe=2)      # llama_model_params.tensor_buft_overrides, as llama.cpp's -ot

The model parameters take pointers; `Placement` keeps the arrays they point to alive while the model loads.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field

from ..errors import BackendError, ConfigError, ModelError
from . import checks

# llama.cpp's --n-cpu-moe pattern: the expert tensors of one layer
_EXPERTS = r"blk\.{}\.ffn_(up|down|gate|gate_up)_(ch|)exps"
_rpc_regs: dict[str, int] = {}  # endpoint -> registry entry: each server is registered once per process


def _nat():
    from . import native  # the library loads with the first call that needs it, not on import

    return native


def _backend(dev) -> str:
    """The name of the backend a device belongs to: "CPU", "Vulkan", "CUDA", "RPC", ..."""
    nat = _nat()
    return nat.ggml_backend_reg_name(nat.ggml_backend_dev_backend_reg(dev)).decode()


def _local_devices() -> list[int]:
    """Registered devices other than CPUs and RPC servers (GPUs), in registry order."""
    nat = _nat()
    gpus = (nat.GGML_BACKEND_DEVICE_TYPE_GPU, nat.GGML_BACKEND_DEVICE_TYPE_IGPU)
    out = []
    for i in range(nat.ggml_backend_dev_count()):
        dev = nat.ggml_backend_dev_get(i)
        if nat.ggml_backend_dev_type(dev) in gpus and _backend(dev) != "RPC":
            out.append(dev)
    return out


PRECISIONS = ("auto", "f32")
_precision: str | None = None  # what this process' devices were set up with (the first load decides)


def device_precision(precision: str) -> None:
    """The math of f32 tensors on the devices, before the first model of the process loads: "auto" is each
    backend's default; "f32" keeps it f32 where a backend would round through f16 (Vulkan rounds matmul operands
    through f16 on devices with f16 support: ggml's GGML_VK_DISABLE_F16). ggml sets a device up once per
    process, so a later load cannot change it."""
    global _precision
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if os.environ.get("GGML_VK_DISABLE_F16"):
        precision = "f32"  # set by hand: ggml reads it as is
    if _precision is None:
        if precision == "f32":
            os.environ["GGML_VK_DISABLE_F16"] = "1"
        _precision = precision
    elif precision == "f32" and _precision != "f32" and any(_backend(d) == "Vulkan" for d in _local_devices()):
        raise ConfigError("precision 'f32' needs a new process: the Vulkan device was set up with f16 math by an "
                          "earlier load in this one")


def parse_endpoint(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ModelError(f"RPC server {text!r} is not HOST:PORT")
    return f"{host}:{int(port)}"


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    import socket

    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise BackendError(f"RPC server {endpoint}: cannot connect ({e.strerror or e}); "
                           f"start one there with: dglocal rpc-server --host HOST --port {port}") from None


def rpc_devices(endpoints: list[str]) -> list[int]:
    """Register each RPC server (once per process) and return its devices."""
    nat = _nat()
    reg = nat.ggml_backend_reg_by_name(b"RPC")
    add = nat.reg_proc(reg, "ggml_backend_rpc_add_server", nat.rpc_add_server_t)
    if add is None:
        raise BackendError("this llama.cpp build has no RPC backend (build it with scripts/build_backend.py)")
    devs = []
    for ep in map(parse_endpoint, endpoints):
        if ep not in _rpc_regs:
            _check_reachable(ep)  # ggml's RPC client aborts the process when it cannot connect
            r = add(ep.encode())
            if not r:
                raise BackendError(f"RPC server {ep}: could not connect: {nat.last_errors() or 'no answer'}")
            nat.ggml_backend_register(r)
            _rpc_regs[ep] = r
        r = _rpc_regs[ep]
        devs += [nat.ggml_backend_reg_dev_get(r, i) for i in range(nat.ggml_backend_reg_dev_count(r))]
    if not devs:
        raise BackendError(f"the RPC servers {endpoints} offer no device")
    return devs


def load_devices(rpc: list[str] | None) -> list[int]:
    """The devices a load uses, in llama.cpp's order: this load's RPC servers, then local GPUs."""
    return (rpc_devices(rpc) if rpc else []) + _local_devices()


def _device_buffer_types():
    """(device, name, handle) of every device's own buffer type and of the CPU's extra ones (CPU_REPACK, AMX, ...)."""
    nat = _nat()
    for i in range(nat.ggml_backend_dev_count()):
        dev = nat.ggml_backend_dev_get(i)
        bufts = [nat.ggml_backend_dev_buffer_type(dev)]
        extra = nat.reg_proc(nat.ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts",
                             nat.dev_get_extra_bufts_t)
        if extra is not None:
            p = extra(dev)
            k = 0
            while p and p[k]:
                bufts.append(p[k])
                k += 1
        for buft in bufts:
            yield dev, nat.ggml_backend_buft_name(buft).decode(), buft


def buffer_types() -> dict[str, int]:
    """Buffer type name -> handle: every device's own, and the CPU's extra ones (CPU_REPACK, AMX, ...)."""
    return {name: buft for _, name, buft in _device_buffer_types()}


def host_buffer_types() -> set[str]:
    """The names of the buffer types a CPU device owns: its own and its extra layouts (AMX's name does not say
    CPU)."""
    nat = _nat()
    return {name for dev, name, _ in _device_buffer_types()
            if nat.ggml_backend_dev_type(dev) == nat.GGML_BACKEND_DEVICE_TYPE_CPU}


def is_host_buffer(name: str, host_types: set[str] | None = None) -> bool:
    """A buffer type in host memory: the CPU's (its extra layouts too), or a GPU's pinned host buffers."""
    if host_types is None:
        host_types = host_buffer_types()
    return name in host_types or name.startswith("CPU") or name.endswith("_Host")


def parse_overrides(rules: list[str], n_cpu_moe: int = 0) -> list[tuple[str, str]]:
    """(regex, buffer type name) pairs from `REGEX=BUFT` rules (comma-separated lists allowed) and --n-cpu-moe."""
    pairs = []
    for rule in rules:
        for item in filter(None, (s.strip() for s in rule.split(","))):
            pattern, sep, buft = item.rpartition("=")
            if not sep or not pattern or not buft:
                raise ModelError(f"tensor override {item!r} is not REGEX=BUFFER_TYPE")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ModelError(f"tensor override {item!r}: bad regex: {e}") from None
            pairs.append((pattern, buft))
    if n_cpu_moe < 0:
        raise ModelError(f"n_cpu_moe must be >= 0, got {n_cpu_moe}")
    pairs += [(_EXPERTS.format(i), "CPU") for i in range(n_cpu_moe)]
    return pairs


@dataclass
class Placement:
    """The pointers llama_model_params needs for devices and overrides, and the arrays behind them."""

    devices: ctypes.Array | None = None
    overrides: ctypes.Array | None = None
    split: ctypes.Array | None = None
    keep: list = field(default_factory=list)

    def apply(self, mparams) -> None:
        if self.devices is not None:
            mparams.devices = ctypes.cast(self.devices, ctypes.c_void_p)
        if self.split is not None:
            mparams.tensor_split = ctypes.cast(self.split, ctypes.POINTER(ctypes.c_float))
        if self.overrides is not None:
            mparams.tensor_buft_overrides = ctypes.cast(self.overrides, ctypes.c_void_p)


def parse_split(split) -> list[float]:
    """llama.cpp's --tensor-split: "3,1" or [3, 1], each device's share of the layers (relative, not all zero)."""
    items = split.split(",") if isinstance(split, str) else list(split)
    try:
        shares = [float(x) for x in items]
    except (TypeError, ValueError):
        raise ModelError(f"tensor split {split!r} is not a list of numbers like 3,1") from None
    if not shares or any(not x >= 0 for x in shares) or not sum(shares) > 0:
        raise ModelError(f"tensor split {split!r}: shares must be >= 0 and not all zero")
    return shares


def placement(rpc: list[str] | None = None, tensor_overrides: list[str] | None = None, n_cpu_moe: int = 0,
              tensor_split=None) -> Placement:
    nat = _nat()
    out = Placement()
    if tensor_split is not None:
        shares = parse_split(tensor_split)
        n_max = nat.llama_max_devices()
        if len(shares) > n_max:
            raise ModelError(f"tensor split {tensor_split!r}: this build takes at most {n_max} devices")
        out.split = (ctypes.c_float * n_max)(*shares)
    if rpc or _rpc_regs:
        # explicit device list: this load's RPC servers, then local GPUs; never servers another load registered
        devs = load_devices(rpc)
        out.devices = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
    pairs = parse_overrides(tensor_overrides or [], n_cpu_moe)
    if pairs:
        known = buffer_types()
        extra = set(known) - {nat.ggml_backend_buft_name(nat.ggml_backend_dev_buffer_type(d)).decode()
                              for d in map(nat.ggml_backend_dev_get, range(nat.ggml_backend_dev_count()))}
        items = []
        for pattern, name in pairs:
            if name not in known:
                raise ModelError(f"tensor override {pattern}={name}: unknown buffer type {name!r}; "
                                 f"known: {', '.join(sorted(set(known) - extra))}")
            if name in extra:
                # llama.cpp's loader writes a tensor it cannot repack into such a buffer through a null layout
                raise ModelError(f"tensor override {pattern}={name}: {name} is a CPU weight layout llama.cpp "
                                 f"picks per tensor by itself; override to CPU instead")
            pat = pattern.encode()
            out.keep.append(pat)
            items.append(nat.llama_model_tensor_buft_override(pat, known[name]))
        out.overrides = (nat.llama_model_tensor_buft_override * (len(items) + 1))(*items)
    return out


def serve_rpc(host: str, port: int, *, threads: int | None = None, device: str | None = None) -> None:
    """Run llama.cpp's RPC server (ggml_backend_rpc_start_server) in this process until it is killed."""
    import os
    import signal

    nat = _nat()
    checks.integer("--port", port, 1, 65535)
    if threads is not None:
        checks.integer("--threads", threads, 1, checks.MAX_THREADS)
    checks.listenable(host, port)
    nat.init()
    start = nat.reg_proc(nat.ggml_backend_reg_by_name(b"RPC"), "ggml_backend_rpc_start_server", nat.rpc_start_server_t)
    if start is None:
        raise BackendError("this llama.cpp build has no RPC backend (build it with scripts/build_backend.py)")
    devs = {nat.ggml_backend_dev_name(d).decode(): d
            for d in map(nat.ggml_backend_dev_get, range(nat.ggml_backend_dev_count()))
            if _backend(d) != "RPC"}
    cpu = nat.GGML_BACKEND_DEVICE_TYPE_CPU
    name = device or next(n for n, d in devs.items() if nat.ggml_backend_dev_type(d) == cpu)
    if name not in devs:
        raise ModelError(f"--device {name!r} is not one of: {', '.join(devs)}")
    description = nat.ggml_backend_dev_description(devs[name]).decode()
    print(f"ggml RPC server on {host}:{port} serving {name} ({description})", flush=True)
    # the server loop never returns to Python: let SIGINT/SIGTERM end the process as they would a C program
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    arr = (ctypes.c_void_p * 1)(devs[name])
    start(f"{host}:{port}".encode(), None, threads or os.cpu_count() or 1, 1, arr)
    raise BackendError(f"the RPC server on {host}:{port} stopped (is the port in use?)")
