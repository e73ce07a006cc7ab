#!/usr/bin/env bash
# Regenerate patches/ from a git checkout of the vendored llama.cpp with the work applied (maintainers only).
#   scripts/make_patches.sh /path/to/llama.cpp   (its HEAD commit must be the unpatched vendored tree)
set -euo pipefail
src=${1:?usage: make_patches.sh LLAMA_CPP_GIT_DIR}
out=$(cd "$(dirname "$0")/.." && pwd)/patches
git -C "$src" add -A
d() { git -C "$src" diff --cached HEAD -- "$@"; }
d src/llama-hparams.h src/llama-kv-cache.cpp                  > "$out/0001-canvas-attention-mask.patch"
d src/llama-arch.h src/llama-arch.cpp src/llama-model.cpp \
     src/models/models.h src/models/diffusion-gemma.cpp          > "$out/0002-diffusion-gemma-arch.patch"
d include/llama.h src/CMakeLists.txt src/llama-cparams.h \
     src/llama-context.h src/llama-dg.h src/llama-dg.cpp        > "$out/0003-denoise-c-api.patch"
d ggml/src/ggml-cpu/vec.h                                         > "$out/0004-cpu-gelu-f32.patch"
git -C "$src" diff --cached --stat HEAD
