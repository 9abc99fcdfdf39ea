"""A ridge chosen from each block's own data, against the `--ridge auto` rule: does it beat it?

For model m and block b with train features X (n x w), Gram G = X^T X = V diag(s) V^T, and the
model's own outputs y_i = f(x_i) as the response, the ridge regression of y on X with ridge
r = rho mean(diag G) has, with P = X V,

    fitted values   y_hat(r) = P diag(1 / (s + r)) P^T y
    leverages       h_ii(r)  = sum_j P_ij^2 / (s_j + r)
    leave-one-out   LOO(r)   = (1/n) sum_i ((y_i - y_hat_i) / (1 - h_ii))^2     (exact for ridge)
    generalized CV  GCV(r)   = n ||y - y_hat||^2 / (n - sum_j s_j / (s_j + r))^2

and rho is chosen on a log grid 1e-7 .. 10 (49 points) to minimize each, per model and block,
with no LDS models. Each block's inverse (G + r I)^-1 then enters eq. 3 as `finalize` computes
it. The LDS of the scores (soft-threshold 0.25, as the defaults) is compared with that of the
auto rule's on the store's LDS models, paired over targets with 95% bootstrap intervals.

    python bench/ridge_loo.py STORE [--view 1024,1 --view 16384,16 ...] [--models 0-3]

Reads the stored features, q and outputs of the models and the store's LDS targets' features;
writes nothing.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from trakwomp.analysis.ground_truth import GroundTruth
from trakwomp.analysis.lds import ScoreSource, lds_of_source, paired_difference
from trakwomp.estimator.view import AUTO_RIDGE_SCALE
from trakwomp.stages.selection import parse_model_ids
from trakwomp.store import Store, paths

GRID = np.logspace(-7, 1, 49)


def criteria(s: np.ndarray, P: np.ndarray, y: np.ndarray, rhos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LOO(r) and GCV(r) at each relative ridge of `rhos`, from the block's eigenvalues s and P = X V."""
    mean_diagonal, n, c = s.sum() / len(s), len(P), P.T @ y
    loo, gcv = [], []
    for rho in rhos:
        r = rho * mean_diagonal
        fitted = P @ (c / (s + r))
        leverage = (P ** 2) @ (1 / (s + r))
        loo.append(np.mean(((y - fitted) / (1 - leverage)) ** 2))
        gcv.append(n * np.sum((y - fitted) ** 2) / (n - np.sum(s / (s + r))) ** 2)
    return np.array(loo), np.array(gcv)


def chosen_ridges(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """The block's eigenvalues s and eigenvectors V, P = X V, and the relative ridges LOO and GCV choose."""
    s, V = np.linalg.eigh(X.T @ X)
    s = np.clip(s, 0, None)
    P = X @ V
    loo, gcv = criteria(s, P, y, GRID)
    return s, V, P, {"loo": float(GRID[int(np.argmin(loo))]), "gcv": float(GRID[int(np.argmin(gcv))])}


def view_scores(handle: Store, models: list[int], targets_id: str, dims: int, blocks: int) -> tuple[dict, dict]:
    """Eq. 3 with each block's ridge by the auto rule, by LOO and by GCV; and the ridges chosen."""
    width, n = dims // blocks, handle.manifest.num_examples
    auto = AUTO_RIDGE_SCALE * np.sqrt(width * n) / blocks ** 0.75
    sums = {"auto": 0.0, "loo": 0.0, "gcv": 0.0}
    chosen: dict[str, list[float]] = {"loo": [], "gcv": []}
    q = sum(handle.read_array(f"{paths.features(m)}/q").astype(np.float64) for m in models) / len(models) ** 2
    for m in models:
        phi = handle.array(f"{paths.features(m)}/phi")
        target_phi = handle.array(f"{paths.features(m, paths.targets_prefix(targets_id))}/phi")
        y = handle.read_array(paths.outputs(paths.features(m))).astype(np.float64)
        for b in range(blocks):
            columns = slice(b * width, (b + 1) * width)
            X = np.asarray(phi[:, columns], np.float64)
            s, V, P, ridges = chosen_ridges(X, y)
            mean_diagonal = s.sum() / width
            Z = np.asarray(target_phi[:, columns], np.float64) @ V
            for name, rho in (("auto", auto), *ridges.items()):
                sums[name] = sums[name] + (Z / (s + rho * mean_diagonal)) @ P.T
            for name, rho in ridges.items():
                chosen[name].append(rho)
    return {name: total * q[None, :] for name, total in sums.items()}, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--view", action="append", default=None, help="D,B (repeatable; default 1024,1 and 16384,16)")
    parser.add_argument("--models", default=None, help="model ids, e.g. 0-3 (default: all)")
    args = parser.parse_args()
    handle = Store.open(args.store)
    truth = GroundTruth.from_store(handle)
    targets_id = paths.short_id(truth.targets_sha)
    models = parse_model_ids(args.models) or [entry.id for entry in handle.manifest.models]
    for view in args.view or ["1024,1", "16384,16"]:
        dims, blocks = (int(v) for v in view.split(","))
        scores, chosen = view_scores(handle, models, targets_id, dims, blocks)
        results = {name: lds_of_source(ScoreSource(name, lambda t=tau: iter([(range(len(t)), t.astype(np.float32))]),
                                                   *tau.shape), truth, threshold=0.25)
                   for name, tau in scores.items()}
        row = {"store": args.store, "models": len(models), "view": [dims, blocks],
               **{name: round(r.mean, 4) for name, r in results.items()},
               **{f"{name}_minus_auto": [round(d.mean, 4), round(d.low, 4), round(d.high, 4)]
                  for name in ("loo", "gcv") for d in [paired_difference(results[name], results["auto"])]},
               **{f"{name}_median_ridge": float(np.median(values)) for name, values in chosen.items()}}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
