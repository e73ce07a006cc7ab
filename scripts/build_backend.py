#!/usr/bin/env python3
"""Build and install the patched llama-cpp-python that dglocal runs on.

    python scripts/build_backend.py --backend cpu|cuda|metal|vulkan [--cuda-arch 90] [--jobs N] [--target DIR]

Fetches the pinned sdist with pip, checks its sha256, applies patches/NNNN-*.patch in order to its vendored
llama.cpp, builds a wheel and installs it into the current environment. Wheels are cached under
$DGLOCAL_CACHE (default ~/.cache/dglocal) keyed by (sdist hash, patch hash, build flags), so a rebuild happens
only when the patches or flags change. --target installs the build into DIR alone (ahead of the environment's own
build on PYTHONPATH: a second backend beside the first, as the GPU test tier runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the pin lives in the package: dglocal/runtime/upstream.py
from dglocal.files import replacing  # noqa: E402
from dglocal.runtime.upstream import PACKAGE, SDIST, SDIST_SHA256, VERSION, DglocalError, cache_dir, fetch_sdist  # noqa: E402

PATCHES = ROOT / "patches"
CACHE = cache_dir()

# CMake flags per backend, as llama.cpp's build docs name them; tools and tests are not needed by dglocal and only
# cost build time. The multimodal library (libmtmd, images in) and ggml RPC (`dglocal rpc-server`, `--rpc`) are on
# everywhere, and the CPU's GELU and tanh run in f32 (patch 0001: the fp16 table moves Gemma 4's logits by ~1e-2).
COMMON_FLAGS = ["-DLLAVA_BUILD=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_RPC=ON",
                "-DGGML_CPU_F32_ACTIVATIONS=ON"]
BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "metal": ["-DGGML_METAL=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
}


class BuildError(DglocalError):
    pass


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def cmake_flags(backend: str, cuda_arch: str | None) -> list[str]:
    flags = COMMON_FLAGS + BACKEND_FLAGS[backend]
    if backend == "cuda" and cuda_arch:
        flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}")
    return flags


def build_key(flags: list[str]) -> str:
    h = hashlib.sha256(SDIST_SHA256.encode())
    for p in patch_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:20]


def apply_patches(src: Path) -> None:
    vendored = src / "vendor" / "llama.cpp"
    if shutil.which("patch"):
        tool = ["patch", "-p1", "--forward", "--batch", "-i"]
    elif shutil.which("git"):
        tool = ["git", "apply", "--whitespace=nowarn"]
    else:
        raise BuildError("applying the patches needs `patch` or `git` on PATH (Debian: apt-get install patch)")
    for p in patch_files():
        r = subprocess.run(tool + [str(p)], cwd=vendored, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"patch {p.name} does not apply to llama.cpp of {PACKAGE} {VERSION}:\n{r.stdout}{r.stderr}")
        print(f"applied {p.name}", flush=True)


def run(cmd: list[str], what: str, env: dict | None = None) -> None:
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise BuildError(f"{what} (exit {r.returncode}): {' '.join(cmd)}")


def build_wheel(backend: str, flags: list[str], out: Path, jobs: int) -> Path:
    sdist = fetch_sdist()
    # one fixed directory per backend, so that the same sources compile at the same paths each time: with ccache
    # installed (llama.cpp's CMake uses it when found), a rebuild after a patch recompiles only what it touched
    tmp = CACHE / "build" / backend
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / SDIST.removesuffix(".tar.gz")
        apply_patches(src)
        env = dict(os.environ, CMAKE_ARGS=" ".join(flags), CMAKE_BUILD_PARALLEL_LEVEL=str(jobs),
                   SKBUILD_BUILD_DIR=str(tmp / "cmake"))
        staging = Path(tmp) / "wheel"
        print(f"building the wheel (CMAKE_ARGS={env['CMAKE_ARGS']}) ...", flush=True)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(staging), str(src)], "wheel build failed", env)
        wheel = next(staging.glob("*.whl"))
        out.mkdir(parents=True, exist_ok=True)
        with replacing(out / wheel.name) as partial:  # an interrupted build never leaves a wheel that looks complete
            shutil.copyfile(wheel, partial)
        return out / wheel.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_target(wheel: Path, target: Path, build: str) -> None:
    """The wheel alone in `target` (its dependencies come from the environment); kept while the build matches."""
    stamp = target / ".dglocal-build"
    if stamp.is_file() and stamp.read_text().strip() == build:
        print(f"{target} holds build {build}", flush=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial), str(wheel)],
        "pip install --target failed")
    (partial / ".dglocal-build").write_text(build + "\n")
    # renamed last, so an interrupted install never looks complete (a folder: dglocal.files.replacing is for files)
    partial.rename(target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=sorted(BACKEND_FLAGS), default="cpu")
    ap.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES, e.g. 90 for H100/H200, 89 for Ada")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    ap.add_argument("--rebuild", action="store_true", help="ignore a cached wheel")
    ap.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    ap.add_argument("--target", type=Path, help="install into this directory only (for PYTHONPATH)")
    args = ap.parse_args(argv)

    flags = cmake_flags(args.backend, args.cuda_arch)
    key = build_key(flags)
    if args.print_key:
        print(key)
        return 0
    cached = CACHE / "wheels" / f"{args.backend}-{key}"
    wheels = sorted(cached.glob("*.whl"))
    try:
        if args.rebuild or not wheels:
            wheels = [build_wheel(args.backend, flags, cached, args.jobs)]
        else:
            print(f"using cached wheel {wheels[0]}", flush=True)
        if args.target:
            install_target(wheels[0], args.target, f"{args.backend}-{key}")
        else:
            # replace any other llama-cpp-python build, then add its missing dependencies (without touching numpy)
            run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheels[0])],
                "pip install failed")
            run([sys.executable, "-m", "pip", "install", str(wheels[0])], "pip install of the wheel's dependencies failed")
            (CACHE / "installed-backend").write_text(f"{args.backend}-{key}\n")
    except DglocalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"installed {PACKAGE} {VERSION} + {len(patch_files())} patches ({args.backend}, key {key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
