#!/usr/bin/env bash
# The text main job: the whole trakwomp pipeline on a language model and the embedded
# fortunes-mini texts (no download).
#
#   scripts/demo-text.sh [STORE]        (default STORE: demo-text-store; rerun to resume after an interruption)
#   SEED=1 scripts/demo-text.sh STORE   (another training and projection seed; default 0)
#
# One reference model (the built-in gpt: width 64, 2 layers, 4 heads, byte tokens) and 24 LDS
# models, each trained for next-token prediction on a random half of the 2,000 train texts (the
# LDS models in two shard processes at once, one CPU thread each); the causal-lm output
# f = log(p / (1 - p)) with p = exp(-L) the probability of a whole text; TRAK (one block of 1,024
# dims) and TRAK-WOMP (16 blocks of 1,024 dims, from the same single featurization); LDS of both
# on the 200 test texts, and the train texts that most support and oppose test text 0 (also
# written, escaped, to STORE/show.html); then what the store holds.
set -euo pipefail
store="${1:-demo-text-store}"
seed="${SEED:-0}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
trakwomp="${TRAKWOMP:-$repo/.venv/bin/trakwomp}"
[ -x "$trakwomp" ] || trakwomp=trakwomp

recipe=(--task causal-lm --data fortunes-mini:train --model gpt --seed "$seed")
"$trakwomp" train "$store" "${recipe[@]}" --num-models 1
echo "training 24 LDS models in two shard processes..." >&2
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets fortunes-mini:test --shard 0/2 --quiet &
first=$!
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets fortunes-mini:test --shard 1/2 --quiet
wait "$first"
"$trakwomp" featurize "$store" --projector sjlt --projector-seed "$seed" --blocks 16 --block-dim 1024
"$trakwomp" finalize "$store" --dims 1024 --blocks 1
"$trakwomp" finalize "$store" --dims 16384 --blocks 16
"$trakwomp" score "$store" --targets fortunes-mini:test --dims 1024 --blocks 1
"$trakwomp" score "$store" --targets fortunes-mini:test --dims 16384 --blocks 16 --out "$store/scores.npy"
"$trakwomp" lds "$store" --dims 1024 --blocks 1 --dims 16384 --blocks 16
"$trakwomp" show "$store" --target 0 --k 3 --out "$store/show.html"
"$trakwomp" status "$store"
