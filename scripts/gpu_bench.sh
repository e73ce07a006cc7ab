#!/usr/bin/env bash
# GPU benchmark of the 26B-A4B shape (issue 7): CUDA build of the patched llama.cpp, `dglocal synth` of the
# 26B-A4B at Q4_K_M, a GPU-vs-CPU check first, then `dglocal bench` (16 steps + adaptive, batch 1 and 4, with the
# autoregressive ratio; both samplers side by side, and the fast sampler's step at 256..16 active positions).
#
# The device machine (see /work/.library/device/README.md) has CUDA, cmake, ninja, numpy, jinja2, rich, typer,
# but no network and no gguf / diskcache, and a call may send only 64 MiB. So:
#
#   1. here, once per session:      bash scripts/gpu_bench.sh prep   (and, to skip the device's build,
#                                   bash scripts/gpu_bench.sh prep-cuda: ~25 min on 2 cores, see prep_cuda;
#                                   then carry=[".gpu-cuda"] instead of [".gpu"])
#      -> .gpu/ (git-ignored through .git/info/exclude, ~35 MiB): the pinned sdist trimmed to what the CMake
#         build and the llama_cpp Python bindings need, the vocab-only Gemma 4 GGUF, and gguf + diskcache wheels.
#   2. on the device, the same call until it prints GPU_BENCH_DONE (each call resumes where the last stopped:
#      a build left running in its own session goes on between calls; the machine keeps /tmp while warm, and it
#      goes back 30 s after a call ends, so make the next call straight away):
#         run(command="bash scripts/gpu_bench.sh device", carry=[".gpu"], timeout_s=600)
#      Each call stops itself before BUDGET_S (default 540 s) and prints GPU_BENCH_CONTINUE (exit 3) if work is
#      left. The whole device budget is 15 minutes, machine start included: call 1 builds (~5-9 min for one
#      arch on 16 cores), call 2 synthesises (~1-2 min, 16 GB), checks GPU against CPU on a tiny model
#      (NVIDIA_TF32_OVERRIDE=0) and benches (~2 min). Only with a lent device (`status`: can_start_another);
#      CI never runs this.
#   3. the results come back in $OUT: bench.json (dglocal bench --json), bench.txt (the table), logs.
#
# Locally (no GPU) the device stage can be dry-run on an existing build and a small preset:
#   DG_BUILD=/tmp/dgdev/build PRESET=tiny BENCH_STEPS=2 CANVASES=1 ADAPTIVE=0 OUT=/tmp/gpu_out \
#       bash scripts/gpu_bench.sh device
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VERSION=0.3.36
SDIST_DIR=llama_cpp_python-$VERSION
VOCAB_MEMBER=vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf

prep() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
    mkdir -p .gpu/whl
    local sdist
    sdist=$(python3 -c 'from dglocal.runtime.upstream import fetch_sdist; print(fetch_sdist())')
    python3 -c "from dglocal.runtime.upstream import sdist_file; print(sdist_file('$VOCAB_MEMBER'))" >/dev/null
    local tmp
    tmp=$(mktemp -d)
    tar -xzf "$sdist" -C "$tmp"
    # only the library sources and the Python bindings travel: no git pack, vocab files, docs, tools, tests
    local v=$SDIST_DIR/vendor/llama.cpp
    tar -czf .gpu/llama-src.tar.gz -C "$tmp" \
        --exclude="$SDIST_DIR/.git" --exclude="$v/models" --exclude="$v/docs" --exclude="$v/tools" \
        --exclude="$v/examples" --exclude="$v/tests" --exclude="$v/gguf-py" --exclude="$v/media" \
        --exclude="$v/.github" --exclude="$v/scripts" --exclude="$v/ci" \
        "$SDIST_DIR"
    rm -rf "$tmp"
    mkdir -p ".gpu/cache/upstream/$VERSION/$(dirname $VOCAB_MEMBER)"
    cp "${DGLOCAL_CACHE:-$HOME/.cache/dglocal}/upstream/$VERSION/$VOCAB_MEMBER" ".gpu/cache/upstream/$VERSION/$VOCAB_MEMBER"
    # pure-Python packages the device image lacks (its python3 is 3.12)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/whl \
        gguf==0.19.0 diskcache==5.6.3
    du -sh .gpu
}

# the pinned sources under DIR with dglocal's patches applied (once)
patched_src() {
    local dir=$1
    [ -f "$dir/.patched" ] && return 0
    rm -rf "$dir" && mkdir -p "$dir"
    tar -xzf .gpu/llama-src.tar.gz -C "$dir"
    python3 -c "import sys; sys.path.insert(0, 'scripts'); import build_backend as b; from pathlib import Path; b.apply_patches(Path('$dir/$SDIST_DIR'))"
    touch "$dir/.patched"
}

# the flags build_backend.py gives a CUDA wheel (sm_90), plus a plain shared-library build of llama.cpp itself
cuda_flags() {
    python3 -c "import sys; sys.path.insert(0, 'scripts'); import build_backend as b; print(' '.join(b.cmake_flags('cuda', '90')))"
    echo "-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF"
}

# the CUDA libraries built here, on the CPU machine, with NVIDIA's compiler, runtime and cuBLAS from PyPI wheels
# (sm_90 only, the CPU code for any AVX2 machine), so that the device's budget goes to running, not compiling:
# .gpu-cuda holds the stripped shared libraries. libcuda (the driver) is the device's own: the build links
# against an empty stub carrying its soname. They need the CUDA 13 runtime and cuBLAS on the device (ldd is
# checked first); where those are missing, carry .gpu and the device builds from the sources as before.
CUDA_WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.1.3 nvidia-cuda-cccl==13.0.85
             nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88"

prep_cuda() {
    [ -f .gpu/llama-src.tar.gz ] || prep
    local work=${PREP_WORK:-/tmp/dg-cuda-prep}
    local cu=$work/toolkit/nvidia/cu13
    mkdir -p "$work"
    if [ ! -x "$cu/bin/nvcc" ]; then
        # shellcheck disable=SC2086
        python3 -m pip install -q --target "$work/toolkit" $CUDA_WHEELS
    fi
    ln -sfn lib "$cu/lib64"  # where nvcc.profile looks for cudart
    for l in cublas cublasLt cudart; do ln -sf "lib$l.so.13" "$cu/lib/lib$l.so"; done
    mkdir -p "$cu/lib/stubs"
    echo 'void dglocal_cuda_stub(void) {}' | gcc -x c -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" -
    patched_src "$work/src"
    local src=$work/src/$SDIST_DIR
    # shellcheck disable=SC2046
    cmake -S "$src/vendor/llama.cpp" -B "$work/build" $(cuda_flags) -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_BMI2=ON -DCMAKE_CUDA_COMPILER="$cu/bin/nvcc" -DCUDAToolkit_ROOT="$cu" \
        > "$work/cmake.log" 2>&1 || { tail -30 "$work/cmake.log"; exit 1; }
    cmake --build "$work/build" -j "$(nproc)" --target llama ggml-rpc > "$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log"; exit 1; }
    # .gpu-cuda replaces .gpu on the device (carry=[".gpu-cuda"]), compressed to fit the 64 MiB a call may carry
    # with the working tree: the libraries (~40 MB), the vocabulary (~3 MB), the Python bindings and wheels
    rm -rf .gpu-cuda "$work/lib" && mkdir -p .gpu-cuda "$work/lib/cuda-lib"
    cp -P "$work/build/bin/"*.so* "$work/lib/cuda-lib/"
    strip --strip-unneeded "$work/lib/cuda-lib/"*.so.*.* 2>/dev/null || true
    "$cu/bin/nvcc" --version | tail -1 > "$work/lib/cuda-lib/BUILT"
    tar -C "$work/lib" -cf - cuda-lib | xz -6 -T0 > .gpu-cuda/cuda-lib.tar.xz
    xz -6 -T0 -c ".gpu/cache/upstream/$VERSION/$VOCAB_MEMBER" > .gpu-cuda/vocab.gguf.xz
    tar -czf .gpu-cuda/bindings.tar.gz -C "$work/src" "$SDIST_DIR/llama_cpp"
    cp -r .gpu/whl .gpu-cuda/whl
    grep -qx '/.gpu-cuda/' "$(git rev-parse --git-path info/exclude)" || echo '/.gpu-cuda/' >> "$(git rev-parse --git-path info/exclude)"
    du -sh .gpu-cuda
}

# -- device ------------------------------------------------------------------------------------------------------

WORK=${WORK:-/tmp/dgbench}
BUDGET_S=${BUDGET_S:-540}
PRESET=${PRESET:-26b-a4b}
TYPE=${TYPE:-q4_k_m}
OUT=${OUT:-$WORK/out}

left() { echo $((BUDGET_S - SECONDS)); }
again() { echo "GPU_BENCH_CONTINUE: $1 (call again at once)"; exit 3; }

setup_python() {
    export DGLOCAL_CACHE=$ROOT/.gpu/cache
    local carried=.gpu
    if [ -d .gpu-cuda ]; then  # prep-cuda's package: the vocabulary unpacked into a cache of our own
        carried=.gpu-cuda
        export DGLOCAL_CACHE=$WORK/cache
        local vocab=$DGLOCAL_CACHE/upstream/$VERSION/$VOCAB_MEMBER
        [ -f "$vocab" ] || { mkdir -p "$(dirname "$vocab")"; xz -dc .gpu-cuda/vocab.gguf.xz > "$vocab.tmp"; mv "$vocab.tmp" "$vocab"; }
    fi
    export PYTHONPATH=$WORK/pkg:$WORK/site:$WORK/src/$SDIST_DIR${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1
    if [ ! -f "$WORK/site/.done" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$carried"/whl/*.whl
        touch "$WORK/site/.done"
    fi
    # dglocal as pyproject.toml lays it out (convert/ is dglocal.convert), fresh from this call's tree
    rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg"
    cp -r dglocal "$WORK/pkg/dglocal" && cp -r convert "$WORK/pkg/dglocal/convert"
}

build() {
    if [ -n "${DG_BUILD:-}" ]; then BUILD=$DG_BUILD; else BUILD=$WORK/build; fi
    local src=$WORK/src/$SDIST_DIR
    if [ -z "${DG_BUILD:-}" ] && [ -f .gpu-cuda/cuda-lib.tar.xz ]; then
        [ -f "$WORK/cuda-lib/BUILT" ] || tar -xJf .gpu-cuda/cuda-lib.tar.xz -C "$WORK"
        [ -d "$src/llama_cpp" ] || { mkdir -p "$WORK/src"; tar -xzf .gpu-cuda/bindings.tar.gz -C "$WORK/src"; }
        export LD_LIBRARY_PATH=$WORK/cuda-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        local missing
        missing=$(ldd "$WORK/cuda-lib/libggml-cuda.so" 2>&1 | grep "not found" || true)
        [ -z "$missing" ] || { echo "the prebuilt CUDA libraries do not load here: $missing (carry .gpu to build)"; exit 1; }
        export LLAMA_CPP_LIB_PATH=$WORK/cuda-lib
        echo "prebuilt CUDA libraries ($(cat "$WORK/cuda-lib/BUILT"))"
        return 0
    fi
    export LLAMA_CPP_LIB_PATH=$BUILD/bin
    [ -f "$BUILD/.done" ] || [ -n "${DG_BUILD:-}" ] && return 0
    patched_src "$WORK/src"
    # a failed configure leaves CMakeCache.txt behind but no build.ninja: test that, and start such a one afresh
    if [ ! -f "$BUILD/build.ninja" ]; then
        local cublas
        cublas=$(find /usr/local/cuda*/include /usr/local/cuda*/targets/*/include /usr/include \
                 -maxdepth 1 -name cublas_v2.h 2>/dev/null | head -1)
        [ -n "$cublas" ] || { echo "no cuBLAS headers (cublas_v2.h) on this image: ggml-cuda cannot build"; exit 1; }
        echo "cuBLAS: $cublas"
        rm -rf "$BUILD"
        # shellcheck disable=SC2046
        cmake -S "$src/vendor/llama.cpp" -B "$BUILD" -G Ninja $(cuda_flags) > "$WORK/cmake.log" 2>&1 \
            || { tail -30 "$WORK/cmake.log"; exit 1; }
    fi
    # the build runs in its own session so that it outlives this call if the budget runs out
    if ! { [ -f "$WORK/build.pid" ] && kill -0 "$(cat "$WORK/build.pid")" 2>/dev/null; }; then
        setsid bash -c "cmake --build '$BUILD' -j $(nproc) --target llama > '$WORK/build.log' 2>&1; echo \$? > '$WORK/build.rc'" &
        echo $! > "$WORK/build.pid"
    fi
    while kill -0 "$(cat "$WORK/build.pid")" 2>/dev/null; do
        [ "$(left)" -gt 20 ] || again "build running ($(grep -c '^\[' "$WORK/build.log" || true) steps done)"
        sleep 10
    done
    if [ "$(cat "$WORK/build.rc" 2>/dev/null)" != 0 ]; then
        tail -40 "$WORK/build.log"; rm -f "$WORK/build.pid"; exit 1
    fi
    touch "$BUILD/.done"
    echo "build done in $BUILD"
}

# the GPU against the CPU of the same build on a tiny f32 model (the CPU path is what CI checks against the
# reference): prefill, a plain and a self-conditioned denoise step, a commit, a denoise after it
parity() {
    NVIDIA_TF32_OVERRIDE=0 python3 - "$WORK/tiny-f32.gguf" <<'EOF' 2>&1 | tee "$OUT/parity.txt"
import sys
import numpy as np
import dglocal
from dglocal.convert.synth import synth

path = sys.argv[1]
synth("tiny", "f32", path, force=True)
def run(ngl):
    with dglocal.load(path, n_ctx=512, n_gpu_layers=ngl) as m:
        seq, rng = m.sequence(), np.random.default_rng(0)
        out = [seq.prefill(list(rng.integers(0, m.n_vocab, 40)), logits_last=True)]
        canvas = rng.integers(0, m.n_vocab, m.canvas_length)
        for sc in (False, True):
            out.append(seq.denoise(canvas, temperature=0.7, self_condition=sc, return_logits=True).logits)
        seq.commit(canvas)
        out.append(seq.denoise(canvas, temperature=0.7, self_condition=False, return_logits=True).logits)
        return out
cpu, gpu = run(0), run(-1)
worst = max(float(np.abs(a - b).max()) for a, b in zip(cpu, gpu))
print(f"GPU vs CPU, tiny f32: max abs logit difference {worst:.2e} ({'ok' if worst < 1e-3 else 'FAIL'})")
from dglocal.runtime.diagnostics import graph_nodes
with dglocal.load(path, n_ctx=512, n_gpu_layers=-1) as m:  # where the scheduler runs the denoise pass
    nodes = graph_nodes(m, "denoise", m.canvas_length)
    off = sorted({(n.op, n.name) for n in nodes if n.backend.startswith("CPU")})
    print(f"denoise graph: {len(nodes)} nodes, {len(off)} on the host {off[:8]}, "
          f"{sum(n.copied for n in nodes) / 2**20:.2f} MiB copied between backends per step")
EOF
}

device() {
    mkdir -p "$WORK" "$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    setup_python
    build
    [ -f "$OUT/parity.txt" ] || parity  # first: a wrong GPU result makes the bench moot
    local model=$WORK/synth-$PRESET-$TYPE.gguf
    if [ ! -f "$model" ]; then
        [ "$(left)" -gt 180 ] || again "synth needs ~3 minutes"
        python3 -c "
import time
from dglocal.convert.synth import synth
r = synth('$PRESET', '$TYPE', '$model', force=True)
print(f'synth: {r.size / 2**30:.2f} GiB, {r.n_tensors} tensors, {r.seconds:.0f} s, mix {r.quant_mix}')
" 2>&1 | tee "$OUT/synth.txt"
    fi
    [ "$(left)" -gt 150 ] || again "bench needs ~2.5 minutes"
    python3 - "$model" "$OUT" <<'EOF' 2>&1 | tee "$OUT/bench.txt"
import json, os, sys
from pathlib import Path
from rich.console import Console
from dglocal.cli.render import show_bench
from dglocal.tools.bench import bench

path, out = sys.argv[1], Path(sys.argv[2])
steps = tuple(int(s) for s in os.environ.get("BENCH_STEPS", "16").split(","))
r = bench(path, n_gpu_layers=-1, steps=steps, adaptive=os.environ.get("ADAPTIVE", "1") == "1",
          canvases=int(os.environ.get("CANVASES", "2")), prompt_tokens=64, ar_tokens=128,
          batch=int(os.environ.get("BATCH", "4")),  # batch 1, and 4 generations denoised together
          sampler=os.environ.get("SAMPLER", "fast"), active=(256, 128, 64, 32, 16))  # beside the reference one
(out / "bench.json").write_text(json.dumps(r, indent=2))
show_bench(r, Console(width=120))
fixed16 = next((x for x in r["runs"] if x["max_steps"] == 16), r["runs"][0])
print(f"{r['name']} {r['file_type']}: {fixed16['max_steps']} steps {fixed16['canvas_tok_s']:.0f} canvas tok/s, "
      f"{fixed16['ms_per_step']:.1f} ms/step, AR {r['autoregressive']['tok_s']:.0f} tok/s, "
      f"ratio {fixed16['vs_ar']:.2f}x (goal: >= 1300 tok/s and >= 5x)")
for x in r["runs"]:
    print(f"{x['mode']} {x['max_steps']} {x['sampler']}: {x['ms_per_step']:.1f} ms/step, {x['canvas_tok_s']:.0f} canvas tok/s")
for a in r["active"] or ():
    print(f"fast sampler, {a['active']} positions run: {a['ms_per_step']:.2f} ms/step, {a['vs_full_step']:.2f}x a whole step")
EOF
    cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
    echo GPU_BENCH_DONE
}

case "${1:-}" in
    prep) prep ;;
    prep-cuda) prep_cuda ;;
    device) device ;;
    *) echo "usage: $0 prep|prep-cuda|device" >&2; exit 2 ;;
esac
