#!/usr/bin/env python3
"""Scores of a store's features with the dims dealt into random groups: eq. 3 with blocks that
are random sets of dimensions instead of contiguous ones (or layers).

    python bench/regroup_scores.py STORE OUT.npy --groups G [--seed 0] [--ridge 1e-3]

The columns of model 0's train and target features (the store must have scored one target
set) are permuted by a seeded generator and dealt into G groups of equal size (the remainder to
the first groups); tau = q_bar * sum_g phi_g(z) (Phi_g^T Phi_g + r_g I)^-1 Phi_g^T with
r_g = ridge * mean(diag(Phi_g^T Phi_g)), in float64 with numpy, and written as an
(n_targets, n_train) .npy for `trakwomp lds STORE --scores OUT.npy`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from trakwomp.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--groups", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ridge", type=float, default=1e-3)
    args = parser.parse_args()
    handle = Store.open(args.store)
    (targets,) = handle.manifest.targets
    phi = handle.array("features/000000/phi")[...].astype(np.float64)
    target_phi = handle.array(f"targets/{targets}/features/000000/phi")[...].astype(np.float64)
    q = handle.array("features/000000/q")[...].astype(np.float64)
    order = np.random.default_rng(args.seed).permutation(phi.shape[1])
    scores = np.zeros((len(target_phi), len(phi)))
    for group in np.array_split(order, args.groups):
        block = phi[:, group]
        gram = block.T @ block
        gram += args.ridge * np.diag(gram).mean() * np.eye(len(gram))
        scores += np.linalg.solve(gram, target_phi[:, group].T).T @ block.T
    np.save(args.out, (scores * q).astype(np.float32))
    print(f"wrote {scores.shape[0]} x {scores.shape[1]} scores in {args.groups} random groups to {args.out}")


if __name__ == "__main__":
    main()
