# The ten commands both main jobs run (sourced by scripts/demo.sh and scripts/demo-text.sh, which
# set: store, exports (the folder for files written out of the store), seed, recipe (the train
# flags), targets (the test spec), top_k (extra score flags) and show (the show file's name and --k)).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
trakwomp="${TRAKWOMP:-$repo/.venv/bin/trakwomp}"
[ -x "$trakwomp" ] || trakwomp=trakwomp

mkdir -p "$exports"
"$trakwomp" train "$store" "${recipe[@]}" --num-models 1
echo "training 24 LDS models in two shard processes..." >&2
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets "$targets" --shard 0/2 --quiet &
first=$!
"$trakwomp" train "$store" "${recipe[@]}" --role lds --num-models 24 --targets "$targets" --shard 1/2 --quiet
wait "$first"
"$trakwomp" featurize "$store" --projector sjlt --projector-seed "$seed" --blocks 16 --block-dim 1024
"$trakwomp" finalize "$store" --dims 1024 --blocks 1
"$trakwomp" finalize "$store" --dims 16384 --blocks 16
"$trakwomp" score "$store" --targets "$targets" --dims 1024 --blocks 1
"$trakwomp" score "$store" --targets "$targets" --dims 16384 --blocks 16 "${top_k[@]}" --out "$exports/scores.npy"
"$trakwomp" lds "$store" --dims 1024 --blocks 1 --dims 16384 --blocks 16
"$trakwomp" show "$store" --target 0 "${show[@]}"
"$trakwomp" status "$store"
