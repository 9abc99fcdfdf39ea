"""Counterfactual check of group predictions: retrain without the groups predicted to matter most.

On a scored store (a reference model's scores of the LDS targets at the views given), for a
target set: the `--top` groups of largest |score| over the set are predicted to change the
targets' mean output by minus their score if removed. This trains `--seeds` models on the whole
train set (alpha 1) and, for each of those groups, `--seeds` models on the train set without it
(`train --alpha 1 --exclude-groups G`), with the reference recipe otherwise. Model j of every
variant has the same initialisation (the seed of (recipe seed, role, j)), so the actual change
is measured seed by seed: mean over the set of f_without(z) - f_all(z), with a 95% t-interval
over the seeds. Predictions are shown raw (minus the group's score) and calibrated by the
store's LDS models (see trakwomp.groups.Calibration). Resumable: each variant is a store under WORK, shared by the target sets of one
STORE; the table goes to WORK/counterfactual-<target set>.md (and .json).

    python bench/group_counterfactual.py STORE WORK [--groups FILE] [--target-set FILE] \\
        [--view 16384,16 --view 1024,1] [--seeds 4] [--top 3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import stats
from trakwomp.store import Store, paths

from trakwomp.analysis.groups import group_scores
from trakwomp.analysis.lds import view_name
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD
from trakwomp.estimator.view import ViewSpec
from trakwomp.models.spec import ModelSpec
from trakwomp.runtime import Shard
from trakwomp.stages.bindings import (
    load_store_data,
    resolve_groups,
    stored_dataset,
    stored_task,
)
from trakwomp.stages.recipe import Recipe
from trakwomp.stages.selection import store_view
from trakwomp.stages.selection import Selection
from trakwomp.stages.train import train


def variant_store(work: Path, group: str | None) -> Path:
    return work / ("all" if group is None else f"without-{group}")


def train_variant(store: str, work: str, group: str | None, seeds: int, shard: Shard) -> None:
    """Shard `shard` of `seeds` models on the train set (without `group`), outputs on the targets."""
    handle = Store.open(store)
    manifest = handle.manifest
    recipe = replace(Recipe(**manifest.train_reference.json), alpha=1.0,
                     exclude_groups=() if group is None else (group,))
    targets = load_store_data(store, manifest.lds_targets_source.spec)
    train(variant_store(Path(work), group), stored_dataset(handle), ModelSpec.of_store(manifest.model, store),
          task=stored_task(handle), role="lds", num_models=seeds, targets=targets, recipe=recipe, shard=shard,
          groups=resolve_groups(handle, None))


def outputs(store: Path, seeds: int) -> np.ndarray:
    """The (seeds, n_targets) outputs f of a variant's models."""
    handle = Store.open(store)
    return np.stack([handle.read_array(f"{paths.trained_model('lds', j)}/margins") for j in range(seeds)]).astype(np.float64)


def t_interval(values: np.ndarray) -> tuple[float, float]:
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="a store with a reference model, LDS targets and their scores")
    parser.add_argument("work", type=Path)
    parser.add_argument("--groups", help="a groups file, if the store records none and its data has no sources")
    parser.add_argument("--target-set", help="an .npy of target positions or a mask over the targets [default: all]")
    parser.add_argument("--view", action="append", default=[], help="DIMS,BLOCKS[,RIDGE] of scored views (ridge default auto; docs/results.md used 0); the first picks the groups")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="soft threshold (as groups; docs/results.md used 0)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    views = [ViewSpec(*map(int, v.split(","))) for v in args.view] or [ViewSpec()]
    handle = Store.open(args.store)
    names = [view_name(store_view(handle, v), 1) for v in views]
    predicted = [group_scores(args.store, args.groups, Selection(view=v, threshold=args.threshold), target_set=args.target_set) for v in views]
    chosen = predicted[0].strongest(args.top)
    groups = [None] + [predicted[0].names[g] for g in chosen]
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(args.store, str(args.work), group, args.seeds, Shard(k, args.jobs)) for group in groups for k in range(args.jobs)]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        pool.starmap(train_variant, jobs, chunksize=1)

    targets = predicted[0].targets
    base = outputs(variant_store(args.work, None), args.seeds)[:, targets].mean(axis=1)
    rows = []
    for g, group in zip(chosen, groups[1:], strict=True):
        change = outputs(variant_store(args.work, group), args.seeds)[:, targets].mean(axis=1) - base
        rows.append({"group": group, "examples": predicted[0].sizes[g], "actual_change": float(change.mean()),
                     "actual_ci95": t_interval(change), "actual_per_seed": change.tolist(),
                     "predicted_change": {name: float(-p.over_targets[g]) for name, p in zip(names, predicted, strict=True)},
                     "calibrated_change": {name: float(-p.over_targets[g] * p.calibration.slope)
                                           for name, p in zip(names, predicted, strict=True) if p.calibration and p.calibration.usable}})
    result = {"store": args.store, "target_set": args.target_set, "targets": len(targets), "seeds": args.seeds,
              "mean_output_all": float(base.mean()), "groups": rows,
              "calibration": {name: p.calibration.describe() + ("" if p.calibration.usable else ", not positive at p < 0.05: unused")
                              for name, p in zip(names, predicted, strict=True) if p.calibration}}
    name = f"counterfactual-{Path(args.target_set).stem if args.target_set else 'all'}"
    (args.work / f"{name}.json").write_text(json.dumps(result, indent=1))
    header = "| group | examples | " + " | ".join(f"predicted, {n} (calibrated)" for n in names) + " | actual [95% CI] |"
    lines = [header, "|" + " --- |" * (3 + len(names))]
    for r in rows:
        low, high = r["actual_ci95"]
        cells = [f"{r['predicted_change'][n]:+.3f}" + (f" ({r['calibrated_change'][n]:+.3f})" if n in r["calibrated_change"]
                                                        else "") for n in names]
        lines.append(f"| {r['group']} | {r['examples']} | " + " | ".join(cells)
                     + f" | {r['actual_change']:+.3f} [{low:+.3f}, {high:+.3f}] |")
    table = "\n".join(lines)
    (args.work / f"{name}.md").write_text(table + "\n")
    notes = "".join(f"\ncalibration, {name}: {text}" for name, text in result["calibration"].items())
    print(f"{len(targets)} targets, {args.seeds} seeds, mean output with every group {base.mean():+.3f}\n{table}{notes}")


if __name__ == "__main__":
    main()
