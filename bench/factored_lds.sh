#!/usr/bin/env bash
# Are layers better blocks than random groups of dimensions? LDS at M = 1 of the factored
# projection (one block per layer) against `sjlt` at the same total d, on a main job's store.
#
#   scripts/demo.sh MAIN        && bench/factored_lds.sh MAIN WORK                 (cifar10-mini)
#   scripts/demo-text.sh MAIN   && bench/factored_lds.sh MAIN WORK --text          (fortunes-mini)
#   bench/factored_lds.sh MAIN WORK --images FOLDER   (a store trained on imagefolder:FOLDER/train
#                                                     with targets imagefolder:FOLDER/test)
#
# The main job's reference model 0 is featurized again, as a checkpoint, into three new stores in
# WORK: `factored` at 32 x 32 per layer (d = the sum of the layers' blocks: 7,920 for the width-0.25
# ResNet-9, whose first convolution and last layer have narrow sides, 11,264 for the gpt), and
# `sjlt` at the same d in 16 equal blocks and in as many equal blocks as there are layers. Every
# store scores the main job's targets (--out); `lds MAIN --scores ...` measures all of them
# against the main job's 24 LDS models, paired with the first (sjlt, 16 equal blocks), beside the
# baselines (gradcos of MAIN's own features, repsim, and bm25 on text). The
# factored features are scored four times: per layer, regrouped into 16 equal blocks, and their
# dims dealt into random groups (as many as layers, and 16; bench/regroup_scores.py). Every view
# has a ridge of 1e-3 (relative to each block's mean diagonal): a classifier's output layer, kept
# exactly on its 10-class side, has linearly dependent features (the margin's logit gradient
# sums to zero over the classes), so its Gram matrix is singular without one.
# Prints the LDS table and writes WORK/lds.json.
set -euo pipefail
main="$1"; work="$2"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trakwomp="${TRAKWOMP:-$repo/.venv/bin/trakwomp}"
python="$(dirname "$trakwomp")/python"
if [ "${3:-}" = "--text" ]; then
    data=(--data fortunes-mini:train --model gpt --task causal-lm); targets=fortunes-mini:test; outputs=257
    layers=11; d=11264; baselines=(--baseline gradcos --baseline repsim --baseline bm25)
elif [ "${3:-}" = "--images" ]; then
    data=(--data "imagefolder:$4/train" --model resnet9 --width 0.25); targets="imagefolder:$4/test"; outputs=10
    layers=9; d=7920; baselines=(--baseline gradcos --baseline repsim)
else
    data=(--data cifar10-mini:train --model resnet9 --width 0.25); targets=cifar10-mini:test; outputs=10
    layers=9; d=7920; baselines=(--baseline gradcos --baseline repsim)
fi
mkdir -p "$work"
"$python" - "$main" "$outputs" "$work/reference0.pt" <<'EOF'
import sys, torch
from trakwomp.stages.train import load_reference_model
torch.save(load_reference_model(sys.argv[1], 0, int(sys.argv[2])).state_dict(), sys.argv[3])
EOF
featurize() {  # STORE PROJECTOR-FLAGS...
    local store="$work/$1"; shift
    rm -rf "$store"
    "$trakwomp" featurize "$store" "${data[@]}" --checkpoint "$work/reference0.pt" "$@" --quiet
}
featurize factored --projector factored --block-dim 1024
featurize sjlt-16 --projector sjlt --blocks 16 --block-dim $((d / 16))
featurize sjlt-layers --projector sjlt --blocks "$layers" --block-dim $((d / layers))
score() {  # STORE OUT VIEW-FLAGS...
    local store="$work/$1" out="$work/$2"; shift 2
    "$trakwomp" finalize "$store" --ridge 1e-3 "$@" --quiet
    "$trakwomp" score "$store" --targets "$targets" --ridge 1e-3 "$@" --threshold 0 --out "$out" --quiet
}
score sjlt-16 sjlt-16.npy
score factored factored-layers.npy
score factored factored-16.npy --blocks 16
score sjlt-layers sjlt-layers.npy
for groups in "$layers" 16; do
    "$python" "$repo/bench/regroup_scores.py" "$work/factored" "$work/factored-random-$groups.npy" --groups "$groups"
done
"$trakwomp" status "$work/factored"
scores=()
for name in sjlt-16 factored-layers factored-16 "factored-random-$layers" factored-random-16 sjlt-layers; do
    scores+=(--scores "$work/$name.npy")
done
"$trakwomp" lds "$main" "${scores[@]}" "${baselines[@]}"
"$trakwomp" lds "$main" "${scores[@]}" "${baselines[@]}" --json > "$work/lds.json"
# layers against random groups of the same features, and against sjlt, at as many blocks as layers
"$trakwomp" lds "$main" --scores "$work/factored-layers.npy" --scores "$work/factored-random-$layers.npy" \
    --scores "$work/sjlt-layers.npy" --json > "$work/lds-layers.json"
