#!/usr/bin/env bash
# The main job: the whole trakwomp pipeline on the embedded cifar10-mini dataset (no download).
#
#   scripts/demo.sh [STORE]        (default STORE: demo-store; rerun to resume after an interruption)
#   SEED=1 scripts/demo.sh STORE   (another training and projection seed; default 0)
#
# One reference model (ResNet-9, width 0.25) and 24 LDS models, each trained on a random half of
# the 2,000 train images (the LDS models in two shard processes at once, one CPU thread each);
# TRAK (one block of 1,024 dims) and TRAK-WOMP (16 blocks of 1,024 dims, from the same single
# featurization); LDS of both on the 500 test images, and the train images that most support and
# oppose a few of them (and, drawn to STORE/show.png, test image 0); then what the store holds.
set -euo pipefail
store="${1:-demo-store}"
seed="${SEED:-0}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
trakwomp="${TRAKWOMP:-$repo/.venv/bin/trakwomp}"
[ -x "$trakwomp" ] || trakwomp=trakwomp

recipe=(--data cifar10-mini:train --model resnet9 --width 0.25 --epochs 8 --seed "$seed")
"$trakwomp" train "$store" "${recipe[@]}" --num-models 1
echo "training 24 LDS models in two shard processes..." >&2
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets cifar10-mini:test --shard 0/2 --quiet &
first=$!
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets cifar10-mini:test --shard 1/2 --quiet
wait "$first"
"$trakwomp" featurize "$store" --projector sjlt --projector-seed "$seed" --blocks 16 --block-dim 1024
"$trakwomp" finalize "$store" --dims 1024 --blocks 1
"$trakwomp" finalize "$store" --dims 16384 --blocks 16
"$trakwomp" score "$store" --targets cifar10-mini:test --dims 1024 --blocks 1
"$trakwomp" score "$store" --targets cifar10-mini:test --dims 16384 --blocks 16 \
    --top-k 3 --top-k-out "$store/top-k.csv" --out "$store/scores.npy"
"$trakwomp" lds "$store" --dims 1024 --blocks 1 --dims 16384 --blocks 16
"$trakwomp" show "$store" --target 0 --k 8 --out "$store/show.png"
"$trakwomp" status "$store"
