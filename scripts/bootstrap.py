#!/usr/bin/env python3
"""Set up dglocal from a fresh clone and run it: the two commands of the README.

    python3 scripts/bootstrap.py run  [ARGS...]   # install dglocal + the patched llama.cpp, then `dglocal run ARGS`
    python3 scripts/bootstrap.py test [ARGS...]   # install that + the reference and test tools, then pytest ARGS

Needs python3 (3.10+), a C/C++ compiler and cmake. Idempotent: packages already installed are kept, and the
backend wheel is rebuilt only when the patches or flags change (scripts/build_backend.py caches it). It installs
into the running interpreter, or into ./.venv (created once) when that interpreter's packages are managed by the
system (PEP 668). `run` with no ARGS and no terminal solves a sample puzzle with the built-in Sudoku model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
# instructor 1.17 caps jiter below 0.15 (and rich below 15), where the openai 3.x that pydantic-ai and openai-agents
# need takes jiter 0.16 or later: no resolver installs it beside them. It runs with both
# (tests/test_client_instructor.py), so it goes in after the [test] extra, without its dependencies (the one it
# alone needs is in the extra).
INSTRUCTOR = "instructor==1.17.0"
SAMPLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def step(what: str, cmd: list[str], **kw) -> None:
    print(f"== {what}: {' '.join(cmd)}", flush=True)
    r = subprocess.run(cmd, cwd=ROOT, **kw)
    if r.returncode != 0:
        sys.exit(f"bootstrap: {what} failed (exit {r.returncode})")


def interpreter() -> str:
    """The Python to install into: this one, unless the system manages its packages (then ./.venv)."""
    managed = Path(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED").exists()
    if sys.prefix != sys.base_prefix or not managed:
        return sys.executable
    python = VENV / "bin" / "python"
    if not python.exists():
        step("create ./.venv (this Python's packages are managed by the system)", [sys.executable, "-m", "venv",
                                                                                   str(VENV)])
    return str(python)


def installed(python: str, extra: str) -> bool:
    """dglocal (with `extra`'s packages) importable from this checkout already."""
    modules = ["fastapi", "uvicorn", "llguidance", "prometheus_client", "PIL"] + (
        ["torch", "transformers", "pytest", "openai", "hypothesis", "jsonschema", "playwright", "peft", "agents",
         "ollama", "instructor", "langchain_openai", "pydantic_ai", "llm", "litellm"] if extra else [])
    probe = ("import importlib.util as u, dglocal, sys; "
             f"sys.exit(0 if dglocal.__file__.startswith({str(ROOT)!r}) and "
             f"all(u.find_spec(m) for m in {modules!r}) else 1)")
    return subprocess.run([python, "-c", probe], cwd="/", capture_output=True).returncode == 0


def install(python: str, extra: str) -> None:
    if installed(python, extra):
        print("== dglocal is installed", flush=True)
    else:
        step("install dglocal", [python, "-m", "pip", "install", "-q", "-e", f".{extra}"])
        if extra:
            step("install instructor", [python, "-m", "pip", "install", "-q", "--no-deps", INSTRUCTOR])
    step("patched llama.cpp backend", [python, str(ROOT / "scripts" / "build_backend.py"), "--backend",
                                       os.environ.get("DGLOCAL_BACKEND", "cpu")])


def ensure_system_tools() -> None:
    """The chat tests drive the program in a real terminal (tmux), the web page's in a real browser (Chromium)."""
    missing = [pkg for pkg, exe in (("tmux", "tmux"), ("chromium", "chromium")) if not shutil.which(exe)]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        step(f"install {' '.join(missing)}", ["apt-get", "update", "-qq"])
        step(f"install {' '.join(missing)}", ["apt-get", "install", "-y", "-qq", *missing])
    else:
        sys.exit(f"bootstrap: the tests need {' and '.join(missing)} (e.g. sudo apt-get install {' '.join(missing)})")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.version_info < (3, 10):
        sys.exit(f"bootstrap: dglocal needs Python 3.10 or newer, this is {sys.version.split()[0]}")
    mode, rest = argv[0], argv[1:]
    python = interpreter()
    if mode == "run":
        install(python, "")
        if not rest and not sys.stdin.isatty():
            rest = ["-p", SAMPLE]
        dglocal = [python, "-m", "dglocal.cli", "run", *rest]
        print(f"== {' '.join(dglocal[2:])}", flush=True)
        return subprocess.run(dglocal).returncode
    install(python, "[test]")
    ensure_system_tools()
    gpu = GpuTier(python, rest)  # builds and runs beside the CPU tier: its tests leave a core idle much of the time
    print(f"== pytest {' '.join(rest)}", flush=True)
    cpu = subprocess.run([python, "-m", "pytest", "-q", *rest], cwd=ROOT).returncode
    return gpu.result() or cpu


# -- the GPU tier: llama.cpp's Vulkan backend, on Mesa's software driver (lavapipe) where no GPU is present ------

VULKAN_PACKAGES = ["glslc", "libvulkan-dev", "spirv-headers", "mesa-vulkan-drivers"]
VULKAN_FILES = {"glslc": "/usr/bin/glslc", "libvulkan-dev": "/usr/include/vulkan/vulkan.h",
                "spirv-headers": "/usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake",
                "mesa-vulkan-drivers": "/usr/share/vulkan/icd.d"}


BACKPORTS = Path("/etc/apt/sources.list.d/dglocal-bookworm-backports.list")


def _deb_version(package: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def _debian_codename() -> str:
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return ""
    return fields.get("VERSION_CODENAME", "").strip('"')


def _newer_lavapipe() -> None:
    """Debian 12's Mesa 22.3 lavapipe crashes (a segfault in its queue thread) on some of ggml's Vulkan graphs;
    the Mesa 25 of bookworm-backports runs them, and runs them faster."""
    if _debian_codename() != "bookworm" or int((_deb_version("mesa-vulkan-drivers") or "0").split(".")[0]) >= 24:
        return
    if not BACKPORTS.exists():
        BACKPORTS.write_text("deb http://deb.debian.org/debian bookworm-backports main\n")
    step("Mesa's lavapipe from bookworm-backports", ["apt-get", "update", "-qq"])
    step("Mesa's lavapipe from bookworm-backports", ["apt-get", "install", "-y", "-qq", "-t", "bookworm-backports",
                                                     "mesa-vulkan-drivers"])


def vulkan_missing() -> str | None:
    """Why the Vulkan tier cannot run here, after installing Debian's packages where we may; None if it can."""
    if os.environ.get("DGLOCAL_GPU_TIER", "1") == "0":
        return "DGLOCAL_GPU_TIER=0"
    if sys.platform != "linux":
        return "the GPU tier runs on Linux (Mesa's lavapipe, or a GPU's Vulkan driver)"
    may_install = os.geteuid() == 0 and shutil.which("apt-get") is not None
    missing = [p for p, f in VULKAN_FILES.items() if not Path(f).exists()]
    if missing and may_install:
        step("install the Vulkan build and driver packages", ["apt-get", "update", "-qq"])
        step("install the Vulkan build and driver packages", ["apt-get", "install", "-y", "-qq", *VULKAN_PACKAGES])
        missing = [p for p, f in VULKAN_FILES.items() if not Path(f).exists()]
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install {' '.join(VULKAN_PACKAGES)})"
    if may_install:
        _newer_lavapipe()
    return None


SHARDS = 2  # lavapipe compiles a pipeline on one core: two processes keep both busy (tests/conftest.py splits them)


def niced() -> None:
    os.nice(19)  # the CPU tier comes first; the GPU tier takes the time it leaves


class GpuTier:
    """The tests marked gpu_tier with every layer on Vulkan0, from the start of the CPU tier and beside it: the Vulkan
    wheel (build_backend.py, its own cache key) built into a directory of its own, then the tier in SHARDS processes,
    each with that build ahead of the CPU one on PYTHONPATH, all niced, each writing a log that result() shows.
    Lavapipe is a CPU device, which ggml lists only when asked (GGML_VK_VISIBLE_DEVICES); Mesa's shader cache keeps
    its compiled pipelines between runs."""

    def __init__(self, python: str, rest: list[str]):
        self.python, self.rest, self.code, self.logs, self.thread = python, rest, 0, [], None
        self.why = vulkan_missing()
        if self.why:
            return
        sys.path.insert(0, str(ROOT))
        from dglocal.runtime.upstream import cache_dir

        self.target, self.dir = cache_dir() / "envs" / "vulkan", cache_dir() / "gpu-tier"
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, str(ROOT / "scripts" / "build_backend.py"), "--backend", "vulkan", "--target",
               str(self.target)]
        print(f"== GPU tier, in the background: patched llama.cpp backend, Vulkan: {' '.join(cmd)}; then pytest "
              f"{' '.join(rest)} in {SHARDS} shards (logs: {self.dir})", flush=True)
        # the thread prints nothing: the CPU tier's output has the terminal until result()
        self.thread = threading.Thread(target=self._guarded, args=(cmd,), daemon=True)
        self.thread.start()

    def _guarded(self, cmd: list[str]) -> None:
        try:
            self._run(cmd)
        except Exception as e:  # noqa: BLE001 -- the tier's failure, reported by result(), never a pass
            self.code, self.why = 1, f"the GPU tier failed to start: {type(e).__name__}: {e}"

    def _run(self, cmd: list[str]) -> None:
        build = self.dir / "vulkan-build.log"
        with open(build, "wb") as out:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=niced).returncode
        self.logs = [build]
        if code != 0:
            self.code, self.why = code, f"the Vulkan build failed (exit {code})"
            return
        env = dict(os.environ, DGLOCAL_TEST_DEVICE="Vulkan0",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(self.target), os.environ.get("PYTHONPATH")])),
                   GGML_VK_VISIBLE_DEVICES=os.environ.get("GGML_VK_VISIBLE_DEVICES", "0"))
        probe = ("from dglocal.runtime import native as n; n.init(); print(*[n.ggml_backend_dev_name("
                 "n.ggml_backend_dev_get(i)).decode() for i in range(n.ggml_backend_dev_count())])")
        devices = subprocess.run([self.python, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                                 text=True).stdout.split()
        if "Vulkan0" not in devices:
            self.why = f"the Vulkan build finds no device (devices: {devices})"
            return
        self.logs = [self.dir / f"shard-{i}.log" for i in range(SHARDS)]
        procs = []
        for i, log in enumerate(self.logs):
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                               "--durations=12", *self.rest],  # where a cold tier's time goes
                                              cwd=ROOT, env=dict(env, DGLOCAL_TEST_SHARD=f"{i}/{SHARDS}"), stdout=out,
                                              stderr=subprocess.STDOUT, preexec_fn=niced))
        codes = [p.wait() for p in procs]
        self.code = next((c for c in codes if c not in (0, 5)), 0)  # pytest's 5: the arguments left a shard no tests

    def result(self) -> int:
        """The tier's exit code (0 where it cannot run here), after its logs."""
        if self.thread is None:
            print(f"== the GPU tier did not run: {self.why}; the CPU tier above is the whole result", flush=True)
            return 0
        print(f"== GPU tier (Vulkan0): pytest {' '.join(self.rest)}, waiting for its shards", flush=True)
        self.thread.join()
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines()
            shown = lines if "shard" in log.name else lines[-1 if self.code == 0 else -40:]
            print(f"== {log.name}\n" + "\n".join(f"   {line}" for line in shown), flush=True)
        if self.why:
            print(f"== the GPU tier did not run: {self.why}", flush=True)
        return self.code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
