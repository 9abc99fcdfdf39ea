#!/usr/bin/env python3
"""How long one `explain` takes on the fortunes-mini store, after start-up.

    python bench/explain_time.py WORK      # a store of fortunes-mini (1 reference model), then the timings

The store: the built-in gpt trained on fortunes-mini:train with the causal-lm recipe, featurized
with the default projector (d = 16,384 in 16 blocks) and finalized at the default view. Then, in
one process (imports and the first torch call done before timing): `explain` of five prompts,
each a test fortune's first half with the model generating up to 32 bytes (greedy), and the same
with `per_token=True`, each query new to the store. Start-up (python, torch and trakwomp
imports) is timed apart, as the seconds `python -c "import trakwomp"` takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAKWOMP = [sys.executable, "-m", "trakwomp.cli.main"]


def prepare(work: Path) -> Path:
    store = work / "store"
    for args in (["train", str(store), "--task", "causal-lm", "--data", "fortunes-mini:train", "-q"],
                 ["featurize", str(store), "-q"], ["finalize", str(store), "-q"]):
        subprocess.run([*TRAKWOMP, *args], check=True)
    return store


def timed(store: Path, prompts: list[str], per_token: bool) -> list[dict]:
    from trakwomp import Generation, explain

    out = []
    for prompt in prompts:
        began = time.perf_counter()
        explained = explain(store, prompt, generation=Generation(max_new_tokens=32), per_token=per_token)
        out.append({"prompt": prompt, "answer": explained.answer, "seconds": time.perf_counter() - began,
                    "scoring_seconds": explained.seconds, "token_seconds": explained.token_seconds,
                    "tokens": len(explained.tokens)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = prepare(args.work)
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import trakwomp"], check=True)
    startup = time.perf_counter() - began
    from trakwomp import load_dataset

    tests = load_dataset("fortunes-mini:test")
    prompts = [tests.text(i)[: len(tests.text(i)) // 2] for i in range(10)]
    whole, tokens = timed(store, prompts[:5], False), timed(store, prompts[5:], True)
    result = {"startup_seconds": startup, "whole_answer": whole, "per_token": tokens,
              "median_seconds": statistics.median(r["seconds"] for r in whole),
              "median_seconds_per_token_query": statistics.median(r["seconds"] for r in tokens)}
    (args.work / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
