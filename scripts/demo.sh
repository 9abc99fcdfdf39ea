#!/usr/bin/env bash
# The main job: the whole trakwomp pipeline on the embedded cifar10-mini dataset (no download).
#
#   scripts/demo.sh [STORE]        (default STORE: demo-store; rerun to resume after an interruption)
#
# One reference model (ResNet-9, width 0.25) and 24 LDS models, each trained on a random half of
# the 2,000 train images; TRAK (one block of 1,024 dims) and TRAK-WOMP (16 blocks of 1,024 dims,
# from the same single featurization); LDS of both on the 500 test images, and the train images
# that most support and oppose a few of them (and, drawn to STORE/show.png, test image 0); then what
# the store holds.
set -euo pipefail
store="${1:-demo-store}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
trakwomp="${TRAKWOMP:-$repo/.venv/bin/trakwomp}"
[ -x "$trakwomp" ] || trakwomp=trakwomp

recipe=(--data cifar10-mini:train --model resnet9 --width 0.25 --epochs 8)
"$trakwomp" train "$store" "${recipe[@]}" --num-models 1
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets cifar10-mini:test
"$trakwomp" featurize "$store" --projector sjlt --blocks 16 --block-dim 1024
"$trakwomp" finalize "$store" --dims 1024 --blocks 1
"$trakwomp" finalize "$store" --dims 16384 --blocks 16
"$trakwomp" score "$store" --targets cifar10-mini:test --dims 1024 --blocks 1
"$trakwomp" score "$store" --targets cifar10-mini:test --dims 16384 --blocks 16 \
    --top-k 3 --top-k-out "$store/top-k.csv" --out "$store/scores.npy"
"$trakwomp" lds "$store" --dims 1024 --blocks 1 --dims 16384 --blocks 16
"$trakwomp" show "$store" --target 0 --k 8 --out "$store/show.png"
"$trakwomp" status "$store"
