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
# f = log(p / (1 - p)) with p = exp(-L/T) the geometric-mean probability of a text's T predicted
# tokens; TRAK (one block of 1,024
# dims) and TRAK-WOMP (16 blocks of 1,024 dims, from the same single featurization); LDS of both
# on the 200 test texts, and the train texts that most support and oppose test text 0 (also
# written, escaped, to STORE-exports/show.html, beside the store); then what the store holds.
set -euo pipefail
store="${1:-demo-text-store}"
seed="${SEED:-0}"
recipe=(--task causal-lm --data fortunes-mini:train --model gpt --seed "$seed")
targets=fortunes-mini:test
top_k=()
exports="${store%/}-exports"
show=(--k 3 --out "$exports/show.html")
source "$(dirname "$0")/pipeline.sh"
