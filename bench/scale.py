#!/usr/bin/env python3
"""What each stage costs as the train set grows: wall seconds, peak RSS and the bytes it adds to
the store, for train, featurize, finalize and score (with --top-k, then with --top-k-only) at N
train rows, and their growth with N.

    python bench/scale.py WORK --rows 10000 --rows 100000 [--blocks 16 --block-dim 1024]
        [--dtype float16] [--targets 100] [--threads 2]        (resumable: measured stages are kept)

The train set is made on the fly so that the store, not the gradients, is the cost: N random
3 x 8 x 8 inputs in 10 classes (an .npz, seed 0) and a model of 13,002 weights (flatten, 192 -> 64,
tanh, 64 -> 10; WORK/scalenets, a `package.module:factory`), one reference model trained one
epoch at lr 0.01 (a model whose units died would make features of zeros, which compress). Each
stage is the CLI in its own process (bench/gpt2_small.py's `run`); the store's bytes are counted
before and after it. The growth of a cost c with N is the exponent a of c ~ N^a between
successive N (log-log slope). Writes WORK/scale.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_small import run  # noqa: E402

MODEL = """import torch


def build(num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, num_classes))
"""


def write_rows(path: Path, rows: int, seed: int) -> Path:
    """An .npz of `rows` random 3 x 8 x 8 inputs in [0, 1) and labels 0..9 (8 x 8: the recipe's
    augmentation pads by 4)."""
    if not path.exists():
        rng = np.random.default_rng(seed)
        np.savez(path, x=rng.random((rows, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, rows))
    return path


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under `folder` (0 if it does not exist yet)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stages(work: Path, rows: int, args: argparse.Namespace) -> dict[str, list[str]]:
    """The commands measured at `rows` train rows, in order."""
    store, data = work / f"store-{rows}", write_rows(work / f"train-{rows}.npz", rows, 0)
    targets = write_rows(work / "targets.npz", args.targets, 1)
    model = ["--model", "scalenets.net:build"]
    return {"train": ["train", str(store), "--data", f"npz:{data}", *model, "--epochs", "1", "--lr", "0.01"],
            "featurize": ["featurize", str(store), *model, "--projector", "sjlt", "--blocks", str(args.blocks),
                          "--block-dim", str(args.block_dim), "--dtype", args.dtype],
            "finalize": ["finalize", str(store)],
            "score --top-k 10": ["score", str(store), *model, "--targets", f"npz:{targets}", "--top-k", "10",
                                 "--top-k-out", str(work / f"top-k-{rows}.csv")],
            "score --top-k 10 --top-k-only": ["score", str(store), *model, "--targets", f"npz:{targets}", "--top-k",
                                              "10", "--top-k-only", "--top-k-out", str(work / f"top-k-only-{rows}.csv")]}


def growth(results: dict, stage: str, key: str) -> list[float | None]:
    """log(c2 / c1) / log(N2 / N1) between successive row counts measured for `stage`."""
    points = sorted((int(n), r[stage][key]) for n, r in results["rows"].items() if stage in r)
    return [math.log(c2 / c1) / math.log(n2 / n1) if c1 > 0 and c2 > 0 else None
            for (n1, c1), (n2, c2) in itertools.pairwise(points)]


def table(results: dict) -> str:
    lines = ["| rows | stage | wall s | peak RSS (GiB) | store added (GiB) | exit |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for n, measured in sorted(results["rows"].items(), key=lambda item: int(item[0])):
        for stage, r in measured.items():
            lines.append(f"| {int(n):,} | {stage} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2 ** 30:.2f} | "
                         f"{r['added_bytes'] / 2 ** 30:.2f} | {r['exit_code']} |")
    stage_names = dict.fromkeys(s for measured in results["rows"].values() for s in measured)
    lines += ["", "| stage | growth of wall s with N | of peak RSS | of bytes added |", "| --- | --- | --- | --- |"]
    for stage in stage_names:
        cells = [", ".join("-" if g is None else f"{g:.2f}" for g in growth(results, stage, key)) or "-"
                 for key in ("seconds", "peak_rss_bytes", "added_bytes")]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--rows", type=int, action="append", required=True, help="train rows N; repeatable")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--block-dim", type=int, default=1024)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "scalenets").mkdir(exist_ok=True)
    (args.work / "scalenets" / "__init__.py").touch()
    (args.work / "scalenets" / "net.py").write_text(MODEL)
    out = args.work / "scale.json"
    settings = {"blocks": args.blocks, "block_dim": args.block_dim, "dtype": args.dtype, "targets": args.targets}
    results = json.loads(out.read_text()) if out.exists() else {"date": time.strftime("%Y-%m-%d"), "settings": settings,
                                                                 "rows": {}}
    if results["settings"] != settings:
        raise SystemExit(f"{out} was measured with {results['settings']}: use another WORK for {settings}")
    for rows in args.rows:
        measured = results["rows"].setdefault(str(rows), {})
        for name, command in stages(args.work, rows, args).items():
            if name in measured and measured[name]["exit_code"] == 0:
                continue
            store, before = args.work / f"store-{rows}", folder_bytes(args.work / f"store-{rows}")
            measured[name] = run(command, args.threads, cwd=args.work)
            measured[name]["added_bytes"] = folder_bytes(store) - before
            print(f"{rows} {name}: {measured[name]}", file=sys.stderr, flush=True)
            out.write_text(json.dumps(results, indent=1))
            if measured[name]["exit_code"] != 0:
                raise SystemExit(f"{name} at {rows} rows failed: {measured[name]['last_line']}")
    print(table(results))


if __name__ == "__main__":
    main()
