"""Quality parity of the fast projector and of float16 storage, at M = 1, over several projector seeds.

    python bench/projector_parity.py WORK [--seeds 0,1,2]

WORK is a `bench/reproduce` work folder whose train and LDS stages are done (it needs
WORK/store with its LDS models and WORK/traker/model0.pt, reference model 0). For each seed,
reference model 0 is featurized at d = 16 x 1,024 three ways: dense Gaussian, SJLT, and SJLT
stored as float16 (each in WORK/parity/<kind>-<dtype>-s<seed>, resumable); each store is
finalized and scored at the views below, and every score matrix is evaluated against all the
LDS models of WORK/store (no setting is chosen here, so no held-out half is needed).

Reported per view: LDS of each configuration per seed, and the paired difference SJLT minus
Gaussian (and float16 minus float32): per target, the mean over seeds of the difference at the
same seed, with a 95% bootstrap interval over targets. Writes WORK/parity/results.json and
prints Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from trakwomp.store import Store

from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.analysis.lds import bootstrap_interval, lds_per_target
from trakwomp.data.specs import load_dataset
from trakwomp.estimator.view import View, ViewSpec
from trakwomp.features.projectors import ProjectorSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.stages.featurize import featurize
from trakwomp.stages.finalize import finalize
from trakwomp.stages.score import score
from trakwomp.stages.stored_scores import find_scores, iterate_scores

CONFIGS = (("gaussian", "float32"), ("sjlt", "float32"), ("sjlt", "float16"))
COMPARISONS = ((("sjlt", "float32"), ("gaussian", "float32")), (("sjlt", "float16"), ("sjlt", "float32")))
VIEWS = ((16384, 16), (4096, 4), (2048, 1))
BLOCKS, BLOCK_DIM = 16, 1024


def label(config: tuple[str, str]) -> str:
    return f"{config[0]} {config[1]}"


def per_target_lds(work: Path, config: tuple[str, str], seed: int, truth: GroundTruth, train, targets) -> dict:
    """{view: LDS per target} of reference model 0 featurized with `config` and `seed`."""
    kind, dtype = config
    store = work / "parity" / f"{kind}-{dtype}-s{seed}"
    featurize(store, train, ModelSpec.parse("resnet9", 0.25), [str(work / "traker" / "model0.pt")],
              projector=ProjectorSpec(kind, seed, BLOCKS, BLOCK_DIM), dtype=dtype)
    out = {}
    for dims, blocks in VIEWS:
        finalize(store, ViewSpec(dims, blocks, 0.0))  # no ridge, as documented
        score(store, targets, ViewSpec(dims, blocks, 0.0))
        handle = Store.open(store)
        key = find_scores(handle, View(dims, blocks, 0.0), [0], truth.targets_sha)
        out[(dims, blocks)] = lds_per_target(iterate_scores(handle, key), truth)
        print(f"{label(config)} seed {seed} d={dims} B={blocks}: LDS {out[(dims, blocks)].mean():.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    truth = GroundTruth.from_store(Store.open(args.work / "store"))
    train = load_dataset(f"imagefolder:{args.work / 'cifar' / 'train'}")
    targets = load_dataset(f"imagefolder:{args.work / 'cifar' / 'test'}")

    # SJLT first: it is fast, and its numbers arrive while the dense Gaussian runs.
    order = sorted(CONFIGS, key=lambda c: c[0] == "gaussian")
    lds = {(c, s): per_target_lds(args.work, c, s, truth, train, targets) for c in order for s in seeds}

    results = {"seeds": seeds, "lds_models": int(len(truth.masks)), "views": []}
    lines = [f"M = 1 (reference model 0), d = {BLOCKS} x {BLOCK_DIM} featurized, {len(truth.masks)} LDS models, "
             f"seeds {args.seeds}.", "",
             "| view | " + " | ".join(label(c) for c in CONFIGS) + " | "
             + " | ".join(f"{label(a)} - {label(b)} [95%]" for a, b in COMPARISONS) + " |",
             "| --- |" + " ---: |" * (len(CONFIGS) + len(COMPARISONS))]
    for view in VIEWS:
        entry = {"dims": view[0], "blocks": view[1], "lds": {}, "differences": {}}
        cells = []
        for c in CONFIGS:
            means = [float(lds[(c, s)][view].mean()) for s in seeds]
            entry["lds"][label(c)] = {"per_seed": means, "mean": float(np.mean(means))}
            cells.append(f"{np.mean(means):.4f} ({min(means):.4f}-{max(means):.4f})")
        for a, b in COMPARISONS:
            diff = np.mean([lds[(a, s)][view] - lds[(b, s)][view] for s in seeds], axis=0)
            low, high = bootstrap_interval(diff)
            entry["differences"][f"{label(a)} - {label(b)}"] = {"mean": float(diff.mean()), "ci95": [low, high]}
            cells.append(f"{diff.mean():+.4f} [{low:+.4f}, {high:+.4f}]")
        results["views"].append(entry)
        lines.append(f"| d={view[0]} B={view[1]} | " + " | ".join(cells) + " |")
    (args.work / "parity" / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
