#!/usr/bin/env bash
# TRAK-WOMP at M = 1 against traker on a 5,000-image CIFAR-10 subset (the estimator issue's check).
#
#   bench/estimator_check.sh WORKDIR        (resumable: rerun after an interruption)
#
# Makes WORKDIR/cifar5k (5,000 train / 500 test images, class-balanced) from the shared archive,
# trains one reference model and 52 LDS models (ResNet-9 width 0.25, 8 epochs, random halves),
# scores the 500 test images with TRAK-WOMP in its default view (16 blocks of 1,024 dims, sjlt
# projection) and with traker at its default proj_dim 2048 on the same checkpoint, and prints
# both LDS with the paired difference (TRAK-WOMP minus traker).
set -euo pipefail
work="$1"
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
trakwomp="$(dirname "$python")/trakwomp"
store="$work/store"
[ -d "$work/cifar5k" ] || "$python" "$repo/bench/make_cifar_subset.py" "$repo/../shared/data/cifar10-jpeg.tar.gz" "$work/cifar5k"
train=(--data "imagefolder:$work/cifar5k/train" --model resnet9 --width 0.25 --epochs 8)
targets="imagefolder:$work/cifar5k/test"
"$trakwomp" train "$store" "${train[@]}" --num-models 1 --quiet
"$trakwomp" train "$store" "${train[@]}" --role lds --num-models 52 --targets "$targets" --quiet
"$trakwomp" featurize "$store" --projector sjlt --quiet
"$trakwomp" finalize "$store" --quiet
"$trakwomp" score "$store" --targets "$targets" --quiet --threshold 0 --out "$work/trakwomp.npy"  # raw, as traker's
"$python" -c "import sys, torch; from trakwomp import load_reference_model; \
torch.save(load_reference_model(sys.argv[1], 0, 10).state_dict(), sys.argv[2])" "$store" "$work/reference.pt"
[ -f "$work/traker.npy" ] || "$python" "$repo/bench/traker_scores.py" "imagefolder:$work/cifar5k/train" "$targets" \
    "$work/traker.npy" "$work/reference.pt"
"$trakwomp" lds "$store" --scores "$work/traker.npy" --scores "$work/trakwomp.npy"
