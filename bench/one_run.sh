#!/usr/bin/env bash
# One training run, better attribution: checkpoints along one run against independent runs, the
# ridge rule and the soft threshold (docs/results.md, "One training run"). Resumable: every stage
# is a trakwomp command that skips finished units.
#
#   bench/one_run.sh images WORK    the CIFAR-10 reproduction setting (bench/reproduce's data and recipe)
#   bench/one_run.sh text WORK      fortunes-mini (bench/text_lds.py's setting, token output)
#
# WORK/runs: 8 reference runs (models 0-7) and the LDS models (100 images, 50 texts);
# WORK/one-run: the first run again (same seed, so the same model), keeping 8 checkpoints
# (members 0-7, after epochs 1..8). Both featurized with SJLT at d = 16,384 as 256 blocks of 64.
# TRUTH=STORE takes the LDS models from STORE instead of training them in WORK/runs (a store with
# the same train set, recipe and targets; for text, bench/text_lds.py's WORK/sequence: the LDS
# models rank alike under either output). The ridge rule is fitted from WORK/ridge-m1.npz of
# both settings with bench/fit_ridge_rule.py (docs/results.md used the even LDS models). Writes WORK/ridge-m{1,4}.npz (bench/ridge_study.py) and
# WORK/checkpoints.json and WORK/threshold-runs-{0,0-3}.txt (`trakwomp lds --json`, on the odd LDS
# models; the tuned threshold chosen on the even ones).
set -euo pipefail
setting="$1"; work="$2"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trakwomp="${TRAKWOMP:-$repo/.venv/bin/trakwomp}"
python="$(dirname "$trakwomp")/python"
if [ "$setting" = images ]; then
    [ -d "$work/cifar" ] || "$python" "$repo/bench/make_cifar_subset.py" "$repo/../shared/data/cifar10-jpeg.tar.gz" \
        "$work/cifar" --train 5000 --test 500
    data=(--data "imagefolder:$work/cifar/train" --model resnet9 --width 0.25 --epochs 8)
    targets="imagefolder:$work/cifar/test"; lds_models=100
else
    data=(--task causal-lm --data fortunes-mini:train); targets=fortunes-mini:test; lds_models=50
fi
truth="${TRUTH:-$work/runs}"
two() { "$@" --shard 0/2 --quiet & "$@" --shard 1/2 --quiet; wait; }
two "$trakwomp" train "$work/runs" "${data[@]}" --num-models 8
"$trakwomp" train "$work/one-run" "${data[@]}" --num-models 1 --save-checkpoints 8 --quiet
[ -n "${TRUTH:-}" ] || two "$trakwomp" train "$work/runs" "${data[@]}" --role lds --num-models $lds_models \
    --targets "$targets"
for store in runs one-run; do
    two "$trakwomp" featurize "$work/$store" --projector sjlt --blocks 256 --block-dim 64
    "$trakwomp" finalize "$work/$store" --dims 256 --blocks 4 --quiet  # a small view, to featurize the targets
    "$trakwomp" score "$work/$store" --targets "$targets" --dims 256 --blocks 4 --quiet
done

views=(); for v in 16384x1 16384x2 16384x4 16384x8 16384x16 16384x32 16384x64 16384x128 16384x256 4096x1 4096x4 \
                   4096x16 4096x64 2048x1 1024x1 512x1 256x1; do views+=(--view "$v"); done
"$python" "$repo/bench/ridge_study.py" "$work/runs" "$work/ridge-m1.npz" --truth "$truth" --models 0 "${views[@]}" \
    --ridges 0,0.001,0.003,0.01,0.03,0.1,0.3,1,3,10
"$python" "$repo/bench/ridge_study.py" "$work/runs" "$work/ridge-m4.npz" --truth "$truth" --models 0-3 \
    --view 16384x4 --view 16384x16 --view 16384x32 --view 16384x64 --view 1024x1 --view 512x1 \
    --ridges 0,0.01,0.03,0.1,0.3,1,3,10

scored() {  # STORE MODELS OUT VIEW-FLAGS...: finalize and score, exported raw to WORK/OUT.npy
    local store="$work/$1" models="$2" out="$work/$3.npy"; shift 3
    "$trakwomp" finalize "$store" --models "$models" "$@" --quiet
    "$trakwomp" score "$store" --targets "$targets" --models "$models" "$@" --threshold 0 --out "$out" --quiet
    files+=(--scores "$out")
}
files=()
scored runs 0 before-m1 --dims 16384 --blocks 16 --ridge 0
for view in "16384 16" "4096 1"; do  # TRAK-WOMP at the default view, TRAK at d = 4,096; --ridge auto
    set -- $view; tag=$([ "$2" = 1 ] && echo trak- || true)
    for members in 0 0-1 0-3 0-7; do scored runs "$members" "${tag}runs-$members" --dims "$1" --blocks "$2"; done
    for members in 7 3,7 1,3,5,7 0-7; do
        scored one-run "$members" "${tag}one-run-${members//,/.}" --dims "$1" --blocks "$2"
    done
done
"$trakwomp" lds "$truth" --half 1 "${files[@]}" --json > "$work/checkpoints.json"
for members in 0 0-3; do  # the soft threshold at M = 1 and 4: fixed T on the odd half; T tuned on the even half
    out="$work/threshold-runs-$members.txt"; : > "$out"
    for t in 0 0.25 0.5 1 1.5 2 3; do
        echo "T=$t $("$trakwomp" lds "$truth" --half 1 --scores "$work/runs-$members.npy" --threshold $t --json)" >> "$out"
    done
    echo "tuned $("$trakwomp" lds "$truth" --tune-threshold --scores "$work/runs-$members.npy" --json)" >> "$out"
done
