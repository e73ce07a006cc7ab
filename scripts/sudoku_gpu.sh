#!/usr/bin/env bash
# The Sudoku model's training on a lent GPU, in one device call: minutes there instead of hours on two CPU cores.
#
#   1. here:        bash scripts/sudoku_gpu.sh prep
#      -> .sudoku-gpu/ (git-ignored through .git/info/exclude, ~20 MiB): wheels of this machine's transformers (the
#         reference version; the device's is older), gguf (absent there) and regex (transformers checks its
#         version), and pool.txt, the training puzzles: $POOL (default scripts/sudoku/run4/pool.txt, run 4's pool)
#         and .sudoku-gpu/hard_*.txt (more puzzles of 17-24 givens, `scripts/sudoku_data.py --min-givens 17
#         --max-givens 24`, seeds 25 and up), as they are (a pool may repeat lines to weight them).
#   2. on the device (nothing else needs building there):
#         run(command="bash scripts/sudoku_gpu.sh device", carry=[".sudoku-gpu"], timeout_s=540)
#      It trains the shipped checkpoint on for $MINUTES (default 7) at batch $BATCH (512): a warm restart to $LR,
#      then a cosine to 1e-5 over the wall time (the device's speed is not known beforehand), on its own guesses
#      half the time (--draft-prob 0.5), as run 2 did. $OUT gets the checkpoint (saved every minute, so a call cut
#      short still returns one), train.log and gpu.txt.
#   3. here:        bash scripts/sudoku_gpu.sh finish FILES_AT/checkpoint
#      converts it (.sudoku-gpu/candidate.gguf) and evaluates it beside the shipped model through the runtime, the
#      figures docs/sudoku.md reports: the model alone on both held-out sets, guided on the hard set in 5 s, and
#      each famous puzzle (scripts/sudoku/famous.txt) 10 times at the defaults (about 10 minutes here).
#      Shipping is then `scripts/sudoku_ship.sh DIR` and a commit.
#
# Locally the device stage can be dry-run on the CPU: DEVICE=cpu MINUTES=0.3 BATCH=8 OUT=/tmp/sg INSTALL=0 \
#     bash scripts/sudoku_gpu.sh device
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.sudoku-gpu
CHECKPOINT=scripts/sudoku/checkpoint

prep() {
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" "$DIR/whl"
    grep -qx "/$DIR/" "$exclude" 2>/dev/null || echo "/$DIR/" >> "$exclude"
    rm -f "$DIR"/whl/*.whl
    local transformers gguf regex
    transformers=$(pip_version transformers)
    gguf=$(pip_version gguf)
    regex=$(pip_version regex)
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR/whl" "transformers==$transformers" "gguf==$gguf"
    # the device's Python is 3.12; regex is compiled
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/whl" "regex==$regex"
    local pool=${POOL:-scripts/sudoku/run4/pool.txt}
    [[ -f $pool ]] || { echo "error: $pool: no training pool (docs/sudoku.md, 'The training runs', makes one)" >&2; exit 1; }
    local more
    more=$(shopt -s nullglob; echo "$DIR"/hard_*.txt)
    # shellcheck disable=SC2086
    cat "$pool" $more > "$DIR/pool.tmp"  # as they are: a pool may repeat lines to weight them
    mv "$DIR/pool.tmp" "$DIR/pool.txt"
    echo "$DIR: $(ls "$DIR/whl" | tr '\n' ' ')"
    echo "$DIR/pool.txt: $(wc -l < "$DIR/pool.txt") puzzles; $(du -sh "$DIR" | cut -f1) in all"
}

pip_version() {
    python3 -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}' | grep . || { echo "error: $1 is not installed here" >&2; exit 1; }
}

device() {
    local out=${OUT:?OUT: the folder that comes back}
    if [[ ${INSTALL:-1} == 1 ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$DIR"/whl/*.whl
        export PYTHONPATH=/tmp/site:$PWD
    fi
    export PYTHONUNBUFFERED=1
    local dev=${DEVICE:-cuda}
    { nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python3 -c "import torch, transformers
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"; } \
        | tee "$out/gpu.txt"
    local seen
    seen=$(python3 -c "import json; print(json.load(open('$CHECKPOINT/training_progress.json'))['examples'])")
    local minutes=${MINUTES:-7}
    python3 scripts/sudoku_train.py --device "$dev" --minutes "$minutes" --batch "${BATCH:-512}" \
        --init-from "$CHECKPOINT" --warmup-from "$seen" --warmup-examples "${WARMUP:-100000}" \
        --lr "${LR:-1e-3}" --lr-min 1e-5 --decay-minutes "$minutes" --draft-prob 0.5 --pool "$DIR/pool.txt" \
        --run-dir /tmp/sudoku-run --checkpoint-dir "$out/checkpoint" --save-minutes 1 --eval-minutes 1000 \
        --eval-n 256 --log-every 100 --fresh 2>&1 | tee "$out/train.log"
}

finish() {
    local checkpoint=${1:?usage: sudoku_gpu.sh finish CHECKPOINT_DIR}
    local candidate=$DIR/candidate.gguf tries=$DIR/tries.txt
    bash scripts/sudoku_ship.sh "$checkpoint" "$candidate"
    local model set i
    for model in dglocal/data/sudoku.gguf "$candidate"; do
        echo "== $model"
        for set in heldout heldout_alt; do
            echo "-- $set, the model alone"
            evaluate "$model" "scripts/sudoku/$set.txt" --no-guide
        done
        echo "-- hard, guided, --time-limit 5 --batch 1 --workers 2"
        evaluate "$model" scripts/sudoku/hard.txt --time-limit 5 --batch 1 --workers 2
        for i in 1 2 3; do  # each famous puzzle 10 times, each try its own seed, as `dglocal run` would
            grep -v '^#' scripts/sudoku/famous.txt | sed -n "${i}p" | awk '{for (k = 0; k < 10; k++) print}' > "$tries"
            echo "-- famous puzzle $i of scripts/sudoku/famous.txt, 10 tries, 5 s and two workers each"
            evaluate "$model" "$tries" --time-limit 5 --batch 1 --workers 2
        done
    done
}

evaluate() {
    local model=$1 puzzles=$2
    shift 2
    python3 -m dglocal.cli sudoku -m "$model" --eval "$puzzles" --seed 0 "$@" | grep "puzzles: solved"
}

case ${1:-} in
    prep) prep ;;
    device) device ;;
    finish) shift; finish "$@" ;;
    *) echo "usage: $0 prep | device | finish CHECKPOINT_DIR" >&2; exit 2 ;;
esac
