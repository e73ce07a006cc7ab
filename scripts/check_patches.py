#!/usr/bin/env python3
"""Check the llama.cpp patch series as a reviewer and the build take it.

    python3 scripts/check_patches.py [--patches DIR]

Every patches/NNNN-*.patch must be `git format-patch` output with an author, a subject and a body that says why
(a Signed-off-by line alone is not a message), and the series must apply, in order, with `git apply --check`, to
llama.cpp as the pinned llama-cpp-python sdist vendors it. Only the files the series touches are extracted, so the
check takes seconds. Exit status 1 and one line per problem, naming the patch, otherwise 0.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dglocal.runtime.upstream import SDIST, fetch_sdist  # noqa: E402

VENDORED = f"{SDIST.removesuffix('.tar.gz')}/vendor/llama.cpp/"
TRAILER = re.compile(r"^(Signed-off-by|Co-authored-by|Reviewed-by):", re.I)


def series(directory: Path) -> list[Path]:
    return sorted(directory.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def message_problem(text: str) -> str | None:
    """What the patch lacks as a reviewer's mail: an author, a subject, a body; None when it has them."""
    head, sep, rest = text.partition("\n\n")
    if not sep or not head.startswith("From "):
        return "is not git format-patch output (no mail header)"
    fields = dict(re.findall(r"^(From|Subject): (.*)$", head, re.M))
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", fields.get("Subject", "")).strip()
    if not fields.get("From", "").strip():
        return "has no author (From:)"
    if not subject:
        return "has no subject"
    body, sep, _ = rest.partition("\n---\n")
    if not sep:
        return "has no diffstat separator (---) after its message"
    why = [line for line in body.splitlines() if line.strip() and not TRAILER.match(line)]
    if not why:
        return f"has no message saying why ({subject!r} has a subject only)"
    return None


def touched(patches: list[Path]) -> set[str]:
    paths = set()
    for p in patches:
        paths.update(re.findall(r"^diff --git a/(\S+) b/", p.read_text(errors="replace"), re.M))
    return paths


def extract(paths: set[str], tree: Path) -> None:
    """The files the series touches, as the sdist vendors them (files the series creates are absent)."""
    with tarfile.open(fetch_sdist()) as tf:
        for member in tf:  # one pass over the compressed archive
            path = member.name.removeprefix(VENDORED)
            if member.isfile() and path in paths:
                out = tree / path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tf.extractfile(member).read())


def apply_problems(patches: list[Path], tree: Path) -> list[str]:
    """Applies each patch in order; the first that does not apply is the problem (the rest depend on it)."""
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))  # never a repository above the tree
    for p in patches:
        for args in (["--check"], []):
            r = subprocess.run(["git", "apply", "--whitespace=nowarn", *args, str(p)], cwd=tree, env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                return [f"{p.name}: does not apply to {SDIST}: {r.stderr.strip()[:500]}"]
    return []


def check(directory: Path) -> list[str]:
    patches = series(directory)
    if not patches:
        return [f"{directory}: no NNNN-*.patch files"]
    problems = [f"{p.name}: {why}" for p in patches if (why := message_problem(p.read_text(errors="replace")))]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "llama.cpp"
        tree.mkdir()
        extract(touched(patches), tree)
        problems += apply_problems(patches, tree)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=Path, default=ROOT / "patches", help="the series' directory")
    args = ap.parse_args(argv)
    problems = check(args.patches)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{len(series(args.patches))} patches: each with a message, all applying to {SDIST}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
