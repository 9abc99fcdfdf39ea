#!/usr/bin/env python3
"""Fit the `--ridge auto` rule, ridge = c w^a n^g / B^b, to `bench/ridge_study.py` results.

    python bench/fit_ridge_rule.py images.npz:5000 text.npz:2000 [--half 0]

For each view (d, B) of each study (its train set of n examples given after the colon) the LDS on
LDS models of half `--half` is known on a grid of ridges; between grid points it is taken
linear in log ridge (ridge 0 as 1e-5). Over a grid of (c, a, g, b), the rule chosen loses the
least, at its worst view, against the best grid ridge of each view. Prints the ten best rules.
The default rule (estimator.AUTO_RIDGE_SCALE) came from this on the even LDS models of the
image and text studies of docs/results.md ("One training run").
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np


def curves(path: str, n: int, half: int) -> list[tuple[int, int, int, np.ndarray, np.ndarray]]:
    """(n, d, B, log10 ridges, mean LDS) per view, without the ridges `finalize` refuses."""
    study = np.load(path)
    grid = study["ridges"]
    out = []
    for v, (dims, blocks) in enumerate(study["views"]):
        means = np.array([np.nanmean(study["lds"][v, r, half]) if not np.isnan(study["lds"][v, r, half]).all()
                          else np.nan for r in range(len(grid))])
        kept = ~np.isnan(means)
        out.append((n, int(dims), int(blocks), np.log10(np.maximum(grid[kept], 1e-5)), means[kept]))
    return out


def worst_loss(views, c: float, a: float, g: float, b: float) -> tuple[float, float]:
    """The largest and the mean LDS lost against each view's best grid ridge."""
    losses = []
    for n, dims, blocks, log_ridges, means in views:
        ridge = c * (dims // blocks) ** a * n ** g / blocks ** b
        losses.append(means.max() - np.interp(np.log10(max(ridge, 1e-5)), log_ridges, means))
    return max(losses), float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", help="STUDY.npz:N, N the study's train examples")
    parser.add_argument("--half", type=int, default=0)
    args = parser.parse_args()
    views = [view for spec in args.studies for view in curves(spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1]),
                                                               args.half)]
    fits = []
    for c, a, g, b in itertools.product(np.logspace(-4, 3, 57), (0, 0.25, 0.5, 0.75, 1), (-1, -0.5, 0, 0.5, 1, 1.5),
                                        (0, 0.5, 0.75, 1, 1.25)):
        fits.append((*worst_loss(views, c, a, g, b), c, a, g, b))
    for worst, mean, c, a, g, b in sorted(fits)[:10]:
        print(f"worst {worst:.4f}  mean {mean:.4f}  c = {c:.3g}  a = {a:g}  g = {g:g}  b = {b:g}")


if __name__ == "__main__":
    main()
