#!/usr/bin/env bash
# Regenerate patches/ from a git checkout of the vendored llama.cpp (maintainers only).
#   scripts/make_patches.sh /path/to/llama.cpp
# The checkout holds the unpatched vendored tree with one commit per patch on top, each commit's subject being
# the patch's file name without .patch (e.g. "0003-denoise-c-api"); every such commit becomes patches/<subject>.patch.
set -euo pipefail
src=${1:?usage: make_patches.sh LLAMA_CPP_GIT_DIR}
out=$(cd "$(dirname "$0")/.." && pwd)/patches
git -C "$src" diff --quiet HEAD || { echo "commit the work in $src first" >&2; exit 1; }
rm -f "$out"/[0-9][0-9][0-9][0-9]-*.patch
git -C "$src" log --reverse --format='%H %s' | while read -r sha subject; do
    [[ $subject =~ ^[0-9]{4}-[a-z0-9-]+$ ]] || continue
    git -C "$src" diff "$sha^" "$sha" > "$out/$subject.patch"
    echo "$subject.patch: $(git -C "$src" diff --shortstat "$sha^" "$sha")"
done
