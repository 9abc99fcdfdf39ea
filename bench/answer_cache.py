#!/usr/bin/env python3
"""explain's answers in the store: does a query's time depend on how many answers are kept?

    python bench/answer_cache.py WORK [--answers 20000]    # about 6 minutes on 2 cores

The store: the built-in gpt trained on fortunes-mini:train with the causal-lm recipe (1
reference model), featurized at d = 4,096 in 4 blocks and finalized. In one process (imports
and the first torch call done before timing), each query a given completion of a test
fortune's first half:
1. five new queries into an empty store, then the same five again (read back);
2. the store filled to ANSWERS answers: each added as explain adds one (`answers.reserve`, its
   scores written, its marker published), with random scores in place of a computed row, which
   only makes filling faster; the kept answers' count, the manifest's size and the store's
   files are recorded;
3. the five read back again, five new queries, and five new queries with --max-answers at the
   count kept (each removes the oldest answer).
Times are medians over the five queries, of `explain` as a Python call (what the CLI calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAKWOMP = [sys.executable, "-m", "trakwomp.cli.main"]


def prepare(work: Path) -> Path:
    store = work / "store"
    for args in (["train", str(store), "--task", "causal-lm", "--data", "fortunes-mini:train", "-q"],
                 ["featurize", str(store), "--blocks", "4", "-q"], ["finalize", str(store), "-q"]):
        subprocess.run([*TRAKWOMP, *args], check=True)
    return store


def median_seconds(store: Path, queries: list[tuple[str, str]], max_answers: int) -> tuple[float, list[bool]]:
    from trakwomp import explain

    seconds, cached = [], []
    for prompt, completion in queries:
        began = time.perf_counter()
        cached.append(explain(store, prompt, completion, max_answers=max_answers).cached)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), cached


def fill(store: Path, count: int, max_answers: int) -> float:
    """Add answers until `count` are kept, each as explain adds one (random scores); seconds taken."""
    from trakwomp.stages.answers import STAGE, reserve
    from trakwomp.store import Store, paths

    handle = Store.open(store)
    n, rng = handle.manifest.num_examples, np.random.default_rng(0)
    weights = {str(e.id): e.sha256 for e in handle.manifest.models}
    began = time.perf_counter()
    for i in range(handle.manifest.answers.kept, count):
        key = f"filler{i:08d}"
        seq = reserve(handle, key, max_answers)
        handle.write_array(paths.answer(key) + "tau", rng.standard_normal((1, n)).astype(np.float32))
        handle.mark_done(STAGE, key, {"seq": seq, "weights": weights, "tokens": False})
    return time.perf_counter() - began


def store_facts(store: Path) -> dict:
    from trakwomp.store import Store

    manifest = Store.open(store).manifest
    return {"answers_kept": manifest.answers.kept, "manifest_bytes": len(json.dumps(manifest.json)),
            "files": sum(1 for p in store.rglob("*") if p.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--answers", type=int, default=20000)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = prepare(args.work)
    from trakwomp import load_dataset

    tests = load_dataset("fortunes-mini:test")
    halves = [(tests.text(i)[: len(tests.text(i)) // 2], tests.text(i)[len(tests.text(i)) // 2:]) for i in range(15)]
    roomy = args.answers + 100
    results = {"answers": args.answers}
    results["new_empty"], _ = median_seconds(store, halves[:5], roomy)
    results["cached_empty"], cached = median_seconds(store, halves[:5], roomy)
    assert all(cached)
    results["fill_seconds"] = fill(store, args.answers, roomy)
    results["filled"] = store_facts(store)
    results["cached_full"], cached = median_seconds(store, halves[:5], roomy)
    assert all(cached)
    results["new_full"], _ = median_seconds(store, halves[5:10], roomy)
    at_capacity = results["filled"]["answers_kept"] + 5
    results["new_full_evicting"], _ = median_seconds(store, halves[10:15], at_capacity)
    results["after"] = store_facts(store)
    results["cached_ratio"] = results["cached_full"] / results["cached_empty"]
    results["new_ratio"] = results["new_full"] / results["new_empty"]
    print(json.dumps(results, indent=1))
    (args.work / "answer_cache.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
