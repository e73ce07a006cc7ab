#!/usr/bin/env python3
"""Check that the patched llama.cpp still compiles and links with CUDA, on a machine without a GPU.

    python3 scripts/cuda_check.py [--cuda-arch 90] [--jobs N] [--force | --status] [--clean]

CI builds and tests the CPU and Vulkan backends only, so a patch that breaks the CUDA build would otherwise show
up on a user's GPU machine. This builds what `build_backend.py --backend cuda` builds (llama-cpp-python's CMake
project over the vendored llama.cpp, the same flags, one CUDA architecture) with nvcc, the CUDA runtime and
cuBLAS from NVIDIA's PyPI wheels, linking against a stub with the driver's soname; nothing runs. The result is
stamped under $DGLOCAL_CACHE/cuda-check/ by build_backend.py's key (sdist hash, patches, flags): a later run with
the same patches prints the recorded result at once; a changed patch builds again, and only what it touched
recompiles (the sources and build folder are kept, unchanged files keep their times). ~25 min on 2 cores cold.
Prints one line; exit status 0 when the build passes, 1 when it fails, 2 when --status finds no record.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_backend as bb  # noqa: E402  (its key, flags and patch series are the ones checked)
from dglocal.files import write_atomically  # noqa: E402

# the CUDA 13 toolchain as NVIDIA publishes it on PyPI (the pins scripts/gpu_bench.sh prep-cuda uses)
TOOLKIT_WHEELS = ["nvidia-cuda-nvcc==13.0.88", "nvidia-cuda-runtime==13.0.96", "nvidia-cublas==13.1.1.3",
                  "nvidia-cuda-cccl==13.0.85", "nvidia-cuda-crt==13.0.88", "nvidia-nvvm==13.0.88"]
HOME = bb.CACHE / "cuda-check"
LOG_TAIL = 40


def toolkit() -> Path:
    """The toolkit root (bin/nvcc, include, lib), installed once per set of pins."""
    where = bb.CACHE / "cuda-toolkit" / hashlib.sha256(" ".join(TOOLKIT_WHEELS).encode()).hexdigest()[:12]
    if not where.is_dir():
        partial = where.with_name(where.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        bb.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(partial), *TOOLKIT_WHEELS],
               "pip could not install the CUDA toolchain wheels")
        partial.rename(where)  # last, so an interrupted install never looks complete
    roots = sorted(where.glob("nvidia/cu*/bin/nvcc"))
    if not roots:
        raise bb.BuildError(f"no nvidia/cu*/bin/nvcc under {where}")
    cu = roots[-1].parent.parent
    # the wheels lay the toolkit out differently from NVIDIA's installer: nvcc.profile looks for lib64, CMake's
    # FindCUDAToolkit for unversioned .so names, and the driver (libcuda.so.1) is the GPU machine's own
    if not (cu / "lib64").exists():
        (cu / "lib64").symlink_to("lib")
    for lib in ("cublas", "cublasLt", "cudart"):
        link = cu / "lib" / f"lib{lib}.so"
        if not link.exists():
            link.symlink_to(next(p.name for p in (cu / "lib").glob(f"lib{lib}.so.*")))
    stub = cu / "lib" / "stubs" / "libcuda.so"
    if not stub.exists():
        stub.parent.mkdir(exist_ok=True)
        bb.run(["gcc", "-x", "c", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), "/dev/null"],
               "gcc could not build the libcuda stub")
    return cu


def sync_tree(new: Path, old: Path) -> None:
    """Make `old` equal `new`, rewriting only the files whose bytes differ, so that the kept build folder
    recompiles what the patches changed and nothing else."""
    for dirpath, dirnames, filenames in os.walk(old, topdown=False):
        rel = Path(dirpath).relative_to(old)
        for name in filenames:
            if not (new / rel / name).is_file():
                (Path(dirpath) / name).unlink()
        if not (new / rel).is_dir():
            shutil.rmtree(dirpath)
    for dirpath, _, filenames in os.walk(new):
        rel = Path(dirpath).relative_to(new)
        (old / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            src, dst = Path(dirpath) / name, old / rel / name
            if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
                shutil.copy(src, dst)  # a new mtime: newer than any object built from the old text


def patched_sources(log) -> Path:
    """The pinned sdist with the series applied, at HOME/src."""
    with tempfile.TemporaryDirectory(dir=HOME) as tmp:
        with tarfile.open(bb.fetch_sdist()) as tf:
            tf.extractall(tmp, filter="data")
        name = bb.SDIST.removesuffix(".tar.gz")
        fresh = Path(tmp) / name
        with contextlib.redirect_stdout(log):  # its "applied NNNN-..." lines
            bb.apply_patches(fresh)
        sync_tree(fresh, HOME / "src")
    log.write(f"applied {len(bb.patch_files())} patches\n")
    return HOME / "src"


def compile_and_link(flags: list[str], cu: Path, jobs: int, log) -> int:
    src = HOME / "src"
    build = HOME / "build"
    config = flags + ["-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={cu / 'bin' / 'nvcc'}",
                      f"-DCUDAToolkit_ROOT={cu}"]
    recorded = build / "dglocal-flags"
    if recorded.is_file() and recorded.read_text() != " ".join(config):
        shutil.rmtree(build)  # another architecture or toolkit: start that build afresh
    ninja = shutil.which("ninja")
    generator = ["-G", "Ninja"] if ninja and not (build / "Makefile").exists() else []
    r = subprocess.run(["cmake", "-S", str(src), "-B", str(build), *generator, *config], stdout=log, stderr=log)
    if r.returncode != 0:
        return r.returncode
    recorded.write_text(" ".join(config))
    # every default target (llama, ggml-cuda, ggml-rpc, mtmd, ...), and with Ninja every error, not the first
    keep_going = ["--", "-k", "0"] if (build / "build.ninja").exists() else []
    return subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), *keep_going],
                          stdout=log, stderr=log).returncode


def first_error(lines: list[str]) -> str:
    for line in lines:
        if re.search(r"\berror\b", line, re.I) and not line.startswith("ninja: build stopped"):
            return line.strip()
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")


def line_for(stamp: dict) -> str:
    head = (f"CUDA build check: {stamp['result'].upper()} (key {stamp['key']}, sm_{stamp['arch']}, "
            f"{stamp['patches']} patches, {stamp['seconds']} s, {stamp['date']})")
    if stamp["result"] == "pass":
        return head
    return f"{head}: {stamp['error']} [log: {stamp['log']}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda-arch", default="90", help="one CMAKE_CUDA_ARCHITECTURES value (default 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    ap.add_argument("--force", action="store_true", help="build even if this key has a recorded result")
    ap.add_argument("--status", action="store_true", help="print the recorded result only, never build")
    ap.add_argument("--clean", action="store_true", help="drop the kept sources and build folder first")
    args = ap.parse_args(argv)

    flags = bb.cmake_flags("cuda", args.cuda_arch)
    key = bb.build_key(flags)
    patches = len(bb.patch_files())
    stamp_path = HOME / f"cuda-{key}.json"
    HOME.mkdir(parents=True, exist_ok=True)
    if stamp_path.is_file() and not args.force:
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("toolkit") == TOOLKIT_WHEELS or args.status:
            print(line_for(stamp) + " (recorded)")
            return 0 if stamp["result"] == "pass" else 1
    if args.status:
        print(f"CUDA build check: not run for key {key} (the patches or flags changed): python3 scripts/cuda_check.py")
        return 2

    with open(HOME / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time in the shared folder
        if args.clean:
            shutil.rmtree(HOME / "src", ignore_errors=True)
            shutil.rmtree(HOME / "build", ignore_errors=True)
        log_path = HOME / f"cuda-{key}.log"
        print(f"CUDA build check: building key {key} for sm_{args.cuda_arch} with {args.jobs} jobs (log: {log_path})",
              flush=True)
        start = time.monotonic()
        applied = None  # why the series did not apply, if it did not
        try:
            cu = toolkit()
            with open(log_path, "w") as log:
                try:
                    patched_sources(log)
                    rc = compile_and_link(flags, cu, args.jobs, log)
                except bb.BuildError as e:  # a patch that does not apply is the series' failure, stamped as such
                    log.write(f"{e}\n")
                    applied, rc = str(e).splitlines()[0].rstrip(":"), 1
        except bb.DglocalError as e:  # no toolchain, no sdist: nothing known about the patches, nothing stamped
            print(f"CUDA build check: error: {e}", file=sys.stderr)
            return 1
    lines = log_path.read_text(errors="replace").splitlines()
    stamp = {"key": key, "result": "pass" if rc == 0 else "fail", "arch": args.cuda_arch, "patches": patches,
             "toolkit": TOOLKIT_WHEELS, "seconds": round(time.monotonic() - start),
             "date": datetime.datetime.now().isoformat(sep=" ", timespec="minutes"),
             "error": None if rc == 0 else applied or first_error(lines), "log": str(log_path),
             "log_tail": lines[-LOG_TAIL:]}
    write_atomically(stamp_path, json.dumps(stamp, indent=1) + "\n")
    print(line_for(stamp))
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
