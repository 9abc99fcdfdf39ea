"""Group LDS of a store's scored views, against predicting by the number of examples kept.

Group LDS models train on random halves of the groups, so their train sets differ in size, and
a model trained on more data has larger outputs on most targets: predicting each model's output
by its number of train examples (every score 1) already reaches a high group LDS. This prints,
for each scored view on the LDS targets, the group LDS (as `trakwomp lds --by-group`), and the
partial Spearman correlation of actual and predicted outputs given the size (the correlation of
their ranks after removing, by least squares, what the size's ranks explain), per target and
averaged, with 95% bootstrap intervals over targets and paired differences against the first view;
with --baseline, the same for a baseline's scores (`lds --baseline`, never thresholded).

    python bench/group_lds.py STORE [--view 1024,1 --view 16384,16] [--baseline gradcos ...]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import rankdata
import torch
from trakwomp.store import Store

from trakwomp.analysis.baselines import BASELINES, BaselineInputs
from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.analysis.lds import bootstrap_interval, lds, view_name
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD
from trakwomp.estimator.view import ViewSpec
from trakwomp.stages.selection import featurized_models, store_view
from trakwomp.stages.stored_scores import find_scores, iterate_scores


def partial_spearman_given_size(truth: GroundTruth, tau: np.ndarray) -> np.ndarray:
    """Per target, the Spearman correlation of actual and predicted outputs over the LDS models,
    each rank vector first made orthogonal to the ranks of the models' train set sizes."""
    size = rankdata(truth.masks.sum(axis=1))
    size -= size.mean()

    def residual(values: np.ndarray) -> np.ndarray:
        ranks = rankdata(values, axis=0)
        ranks -= ranks.mean(axis=0)
        return ranks - np.outer(size, size @ ranks) / (size @ size)

    actual, predicted = residual(truth.outputs), residual(truth.masks.astype(np.float64) @ tau.T)
    return (actual * predicted).sum(axis=0) / np.sqrt((actual ** 2).sum(axis=0) * (predicted ** 2).sum(axis=0))


def baseline_scores(handle: Store, truth: GroundTruth, name: str) -> np.ndarray:
    """(targets, train) scores of the baseline `name` on the LDS targets, as `lds --baseline` reads them."""
    inputs = BaselineInputs(handle, featurized_models(handle, None), truth.targets_sha, truth.outputs.shape[1],
                            truth.masks.shape[1], torch.device("cpu"))
    return np.concatenate([block for _, block in BASELINES.get(name).chunks(inputs)()]).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--view", action="append", default=[], help="DIMS,BLOCKS[,RIDGE] of a scored view (ridge default auto; docs/results.md used 0); repeatable")
    parser.add_argument("--baseline", action="append", default=[], help="a baseline's rows too (as lds); repeatable")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="soft threshold (as lds; docs/results.md used 0)")
    args = parser.parse_args()
    views = [ViewSpec(*map(int, v.split(","))) for v in args.view] or [ViewSpec()]
    handle = Store.open(args.store)
    truth = GroundTruth.from_store(handle, by_group=True)
    report = lds(args.store, views, by_group=True, threshold=args.threshold, baselines=args.baseline)
    partial = {}
    for spec in views:
        view = store_view(handle, spec)
        key = find_scores(handle, view, featurized_models(handle, None), truth.targets_sha)
        tau = np.concatenate([block for _, block in iterate_scores(handle, key, args.threshold)]).astype(np.float64)
        partial[view_name(view, 1)] = partial_spearman_given_size(truth, tau)
    for name in args.baseline:
        partial[f"{name} (baseline)"] = partial_spearman_given_size(truth, baseline_scores(handle, truth, name))
    first = next(iter(partial.values()))
    out = {"group_lds": report.as_dict(), "partial_spearman_given_size": {
        name: {"mean": float(values.mean()), "ci95": bootstrap_interval(values),
               "minus_first": float((values - first).mean()), "minus_first_ci95": bootstrap_interval(values - first)}
        for name, values in partial.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
