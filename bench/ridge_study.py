#!/usr/bin/env python3
"""LDS against the ridge, for many views and ridges at once, from one spectral decomposition per block.

    python bench/ridge_study.py STORE OUT.npz --models 0 --view 16384x16 --view 4096x1 [--truth STORE2]

For a member m and a block b of w dims with Gram G = Phi_b^T Phi_b (eigenvalues s, vectors V),
the LDS needs only each LDS model's predicted output, sum_{i in D_j} tau_i(z):

    masks (J x n) . diag(q) . Phi_b (G + r I)^-1 phi_b(z)^T  =  P diag(1 / (s + r)) A^T

with P = (masks . diag(q) . Phi_b) V (J x k) and A = phi_b(z) V (targets x k): one eigendecomposition
per block serves every ridge r (relative: r = ridge * mean(diag G), as `finalize` adds it). Where
a block is wider than the n train examples, the decomposition is of Phi_b Phi_b^T instead (its
nonzero spectrum is G's). q is (1/M^2) sum_m q_m over the members, as in `score`.

Writes, for every view and ridge (and, last, the ridge `--ridge auto` gives the view), the LDS of
each target on each half of the LDS models (even and odd positions, `lds --half 0/1`) to
OUT.npz; prints the half means. Reads the members' train features and the LDS targets' features
(made by any `score` of those members on those targets).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trakwomp.store import Store, paths  # noqa: E402

from trakwomp.analysis.ground_truth import GroundTruth  # noqa: E402
from trakwomp.analysis.lds import spearman_columns  # noqa: E402
from trakwomp.estimator.view import View  # noqa: E402
from trakwomp.stages.selection import parse_model_ids  # noqa: E402

RIDGES = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def spectral_pieces(train: torch.Tensor, targets: torch.Tensor, weighted_masks: torch.Tensor):
    """(s, P, A, mean diagonal) of one block: see the module docstring. float64 throughout."""
    n, w = train.shape
    mean_diagonal = float(train.pow(2).sum() / w)
    if w <= n:
        s, vectors = torch.linalg.eigh(train.T @ train)
        return s, (weighted_masks @ train) @ vectors, targets @ vectors, mean_diagonal
    s, vectors = torch.linalg.eigh(train @ train.T)  # Phi (G + r)^-1 phi^T = U diag(1/(s + r)) U^T Phi phi^T
    return s, weighted_masks @ vectors, (targets @ train.T) @ vectors, mean_diagonal


def study(store: Store, truth: GroundTruth, members: list[int], views: list[tuple[int, int]],
          ridges: tuple[float, ...], automatic: list[float]) -> np.ndarray:
    """LDS per (view, ridge, half, target); a last ridge, per view, is `automatic[view]`
    (`--ridge auto`'s)."""
    sha = truth.targets_sha[:16]
    q = sum(torch.from_numpy(store.read_array(f"{paths.features(m)}/q")).double() for m in members)
    weighted_masks = torch.from_numpy(truth.masks.astype(np.float64)) * q
    n = truth.masks.shape[1]
    out = np.empty((len(views), len(ridges) + 1, 2, truth.outputs.shape[1]))
    predicted = torch.zeros(len(views), len(ridges) + 1, len(truth.masks), truth.outputs.shape[1], dtype=torch.float64)
    for m in members:
        train_phi = torch.from_numpy(store.read_array(f"{paths.features(m)}/phi")).double()
        target_phi = torch.from_numpy(store.read_array(f"{paths.features(m, paths.targets_prefix(sha))}/phi")).double()
        pieces = {}  # by (first, last) column: views are prefixes, so many share blocks
        for v, (dims, blocks) in enumerate(views):
            width = dims // blocks
            for b in range(blocks):
                columns = slice(b * width, (b + 1) * width)
                if (columns.start, columns.stop) not in pieces:
                    pieces[columns.start, columns.stop] = spectral_pieces(train_phi[:, columns], target_phi[:, columns],
                                                                          weighted_masks)
                s, P, A, mean_diagonal = pieces[columns.start, columns.stop]
                for r, ridge in enumerate((*ridges, automatic[v])):
                    inverse = 1 / (s + ridge * mean_diagonal)
                    if ridge == 0:
                        inverse = torch.where(s > s.max() * 1e-12, inverse, torch.zeros_like(inverse))
                    predicted[v, r] += (P * inverse) @ A.T
    for half in (0, 1):
        margins = truth.outputs[half::2]
        for v, (dims, blocks) in enumerate(views):
            for r, ridge in enumerate((*ridges, automatic[v])):
                singular = ridge == 0 and dims // blocks > n  # `finalize` refuses these
                out[v, r, half] = np.nan if singular else spearman_columns(margins, predicted[v, r, half::2].numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("out")
    parser.add_argument("--models", required=True, help="member ids, e.g. 0 or 0-3")
    parser.add_argument("--view", action="append", required=True, help="DIMSxBLOCKS, repeatable")
    parser.add_argument("--truth", help="the store whose LDS models to use [default: STORE]")
    parser.add_argument("--ridges", default=",".join(f"{r:g}" for r in RIDGES))
    args = parser.parse_args()
    store = Store.open(args.store)
    truth = GroundTruth.from_store(Store.open(args.truth or args.store))
    views = [tuple(int(x) for x in v.split("x")) for v in args.view]
    ridges = tuple(float(r) for r in args.ridges.split(","))
    members = parse_model_ids(args.models)
    automatic = [View(dims, blocks).block_ridge(0, truth.masks.shape[1]) for dims, blocks in views]
    with torch.no_grad():
        lds = study(store, truth, members, views, ridges, automatic)
    np.savez(args.out, lds=lds, views=np.array(views), ridges=np.array(ridges), members=np.array(members),
             automatic=np.array(automatic))
    print("view \\ ridge  " + "  ".join(f"{r:>12g}" for r in ridges) + "          auto")
    for v, (dims, blocks) in enumerate(views):
        cells = "  ".join(f"{lds[v, r, 0].mean():.3f}/{lds[v, r, 1].mean():.3f}" for r in range(len(ridges) + 1))
        print(f"{dims}x{blocks:<8} {cells}")


if __name__ == "__main__":
    main()
