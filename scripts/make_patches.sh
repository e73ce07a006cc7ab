#!/usr/bin/env bash
# Regenerate patches/ from a git checkout of the vendored llama.cpp (maintainers only).
#   scripts/make_patches.sh /path/to/llama.cpp BASE
# The checkout holds the unpatched vendored tree at BASE (a commit or tag) and one commit per patch on top, in the
# series' order: the generic patches first, then the diffusion-gemma ones. Each commit's message is its patch's
# message (a subject line, a blank line, then why); `git format-patch` writes them, authored and signed off.
# Fix a patch by amending its commit (git rebase -i BASE), never by a commit of its own on top.
set -euo pipefail
src=${1:?usage: make_patches.sh LLAMA_CPP_GIT_DIR BASE}
base=${2:?usage: make_patches.sh LLAMA_CPP_GIT_DIR BASE}
root=$(cd "$(dirname "$0")/.." && pwd)
git -C "$src" diff --quiet HEAD || { echo "commit the work in $src first" >&2; exit 1; }
rm -f "$root"/patches/[0-9][0-9][0-9][0-9]-*.patch
git -C "$src" format-patch --quiet --no-signature --zero-commit --full-index -o "$root/patches" "$base..HEAD"
python3 "$root/scripts/check_patches.py"
