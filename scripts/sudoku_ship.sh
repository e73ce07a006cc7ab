#!/usr/bin/env bash
# Regenerate the shipped Sudoku model, dglocal/data/sudoku.gguf (f32, ~4.4 MiB), from the HF checkpoint.
#
#     scripts/sudoku_ship.sh [CHECKPOINT_DIR] [OUT.gguf]     # defaults: scripts/sudoku/checkpoint, dglocal/data/sudoku.gguf
#
# A training run rewrites the checkpoint every --save-minutes: the script converts a copy, taken again until no
# file changed while it was copied. f32 because the file is tiny and the tests compare it with the reference at ~1e-4.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
src=${1:-$root/scripts/sudoku/checkpoint}
out=${2:-$root/dglocal/data/sudoku.gguf}
[[ -f $src/config.json ]] || { echo "error: $src: no config.json (not a checkpoint directory)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
copy=$tmp/sudoku  # the directory name becomes general.name
for attempt in 1 2 3 4 5; do
    before=$(stat -c '%n %Y %s' "$src"/* | sort)
    rm -rf "$copy" && cp -r "$src" "$copy"
    sleep 2
    after=$(stat -c '%n %Y %s' "$src"/* | sort)
    [[ $before == "$after" ]] && break
    [[ $attempt == 5 ]] && { echo "error: $src kept changing while copied" >&2; exit 1; }
done

mkdir -p "$(dirname "$out")"
dglocal convert "$copy" "$out" --type f32 --force
sha256sum "$copy/model.safetensors" "$out"
