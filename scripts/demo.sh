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
# oppose a few of them (and, drawn to STORE-exports/show.png, test image 0); then what the store
# holds. Exports (scores.npy, top-k.csv, show.png) go to STORE-exports/, beside the store: a
# command refuses to write an export inside a store.
set -euo pipefail
store="${1:-demo-store}"
seed="${SEED:-0}"
recipe=(--data cifar10-mini:train --model resnet9 --width 0.25 --epochs 8 --seed "$seed")
targets=cifar10-mini:test
exports="${store%/}-exports"
top_k=(--top-k 3 --top-k-out "$exports/top-k.csv")
show=(--k 8 --out "$exports/show.png")
source "$(dirname "$0")/pipeline.sh"
