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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
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
    modules = ["fastapi", "uvicorn"] + (["torch", "transformers", "pytest", "openai"] if extra else [])
    probe = ("import importlib.util as u, dglocal, sys; "
             f"sys.exit(0 if dglocal.__file__.startswith({str(ROOT)!r}) and "
             f"all(u.find_spec(m) for m in {modules!r}) else 1)")
    return subprocess.run([python, "-c", probe], cwd="/", capture_output=True).returncode == 0


def install(python: str, extra: str) -> None:
    if installed(python, extra):
        print("== dglocal is installed", flush=True)
    else:
        step("install dglocal", [python, "-m", "pip", "install", "-q", "-e", f".{extra}"])
    step("patched llama.cpp backend", [python, str(ROOT / "scripts" / "build_backend.py"), "--backend",
                                       os.environ.get("DGLOCAL_BACKEND", "cpu")])


def ensure_tmux() -> None:
    """The chat tests drive the program in a real terminal."""
    if shutil.which("tmux"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        step("install tmux", ["apt-get", "update", "-qq"])
        step("install tmux", ["apt-get", "install", "-y", "-qq", "tmux"])
    else:
        sys.exit("bootstrap: the tests need tmux (e.g. sudo apt-get install tmux, brew install tmux)")


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
    ensure_tmux()
    print(f"== pytest {' '.join(rest)}", flush=True)
    return subprocess.run([python, "-m", "pytest", "-q", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
