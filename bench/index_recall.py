#!/usr/bin/env python3
"""Can a nearest-neighbour index find the top k of TRAK-WOMP scores? Recall of each target's
exact top 10 (most supporting, and most opposing) among what two index families return,
against the exact scan, on a store with dense scores of one model (M = 1).

With the view's block inverses folded into the query and q into the rows,

    tau_i(z) = <w(z), x_i>,   w(z) = phi(z)[:D] K^-1,   x_i = q_bar_i Phi[i, :D],

a maximum-inner-product search over the rows x_i; here computed in numpy from the stored
features and inverses, and checked against the stored scores `tau` (the largest difference is
printed). Opposing examples are searched with -w(z).

- random projection (Johnson-Lindenstrauss): x_i and w(z) times a seeded Gaussian D x k matrix
  / sqrt(k); the C rows of largest projected inner product are the candidates, to be rescored
  exactly; recall of the exact top 10 among them, for k in --jl-dims and C in --candidates, and
  the projection's error in units of each target's RMS score.
- IVF (faiss IndexIVFFlat, inner product, the exact float32 rows in its lists): sqrt(n) lists
  trained by k-means on up to 40 rows per list; the top 10 among the rows of the nprobe lists
  whose centroids have the largest inner product with the query, for nprobe a fraction of the
  lists (--probes); milliseconds per query on this machine, the lists in memory.

It also prints the separation of the top: the mean of each target's 10 largest scores in units
of its RMS score. Holds the rows in memory as float32 (n x D x 4 bytes).

    python bench/index_recall.py STORE --scores KEY [--targets 100] [--jl-dims 256 1024]
        [--candidates 10 100 1000] [--probes 0.01 0.05 0.25] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import faiss
import numpy as np
from trakwomp.store import Store, paths

from trakwomp.estimator.view import ViewSpec
from trakwomp.stages.selection import store_view


def folded(handle: Store, key: str, targets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w: targets x D, x: n x D, the stored tau of those targets), float32, for scores `key`."""
    entry = handle.manifest.scores[key]
    if len(entry.models) != 1 or entry.top_k is not None:
        raise SystemExit(f"scores {key}: give dense scores of one model")
    dims, blocks, ridge = entry.view[:3]  # ridge: relative, or "auto"
    view = store_view(handle, ViewSpec(dims, blocks, ridge))
    model = entry.models[0]
    target_phi = handle.array(f"{paths.features(model, paths.targets_prefix(entry.targets))}/phi")[:targets, :dims]
    inverse = handle.array(paths.inverse(view.key, model))
    w = np.empty((len(target_phi), dims), np.float32)
    for b in range(view.blocks):
        columns, width = view.columns(b), view.widths[b]
        w[:, columns] = target_phi[:, columns].astype(np.float64) @ inverse[b, :width, :width]
    phi, q = handle.array(f"{paths.features(model)}/phi"), handle.array(f"{paths.features(model)}/q")[...]
    x = np.empty((phi.shape[0], dims), np.float32)
    step = phi.chunks[0]
    for start in range(0, len(x), step):
        x[start:start + step] = phi[start:start + step, :dims].astype(np.float32) * q[start:start + step, None]
    return w, x, handle.array(paths.scores(key))[:targets]


def difference_in_roundings(w: np.ndarray, x: np.ndarray, tau: np.ndarray, stored: np.ndarray) -> float:
    """The largest |tau - stored| in units of u sum_j |w_j x_ij| (u = 2^-24): float32 scores of
    D-dim dot products differ by at most about 2D + 7 of them, whatever the summation order."""
    magnitude = np.concatenate([np.abs(w) @ np.abs(x[s:s + 8192]).T for s in range(0, len(x), 8192)], axis=1)
    difference = np.abs(tau - stored)
    return float(np.divide(difference, 2.0 ** -24 * magnitude, out=np.zeros_like(difference),
                           where=magnitude > 0).max())


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """The mean over targets of the share of the exact top (rows of `exact`) among `found`."""
    return float(np.mean([len(set(e) & set(f)) / len(e) for e, f in zip(exact, found, strict=True)]))


def projection_recall(w: np.ndarray, x: np.ndarray, tau: np.ndarray, exact: dict, dims: list[int],
                      candidates: list[int]) -> list[dict]:
    """Per k: the projection's error (RMS over rows, in units of each target's RMS score, averaged
    over targets), and per C the recall of the exact top 10 among the C best projected scores."""
    rows, rng, rms = [], np.random.default_rng(0), np.sqrt((tau.astype(np.float64) ** 2).mean(axis=1))
    for k in dims:
        projection = rng.standard_normal((x.shape[1], k), dtype=np.float32) / np.float32(math.sqrt(k))
        approximate = (w @ projection) @ (x @ projection).T
        error = float(np.mean(np.sqrt(((approximate - tau).astype(np.float64) ** 2).mean(axis=1)) / rms))
        for c in candidates:
            supports = np.argsort(-approximate, axis=1, kind="stable")[:, :c]
            opposes = np.argsort(approximate, axis=1, kind="stable")[:, :c]
            rows.append({"k": k, "candidates": c, "error_in_rms": error, "supports": recall(supports, exact["supports"]),
                         "opposes": recall(opposes, exact["opposes"])})
    return rows


def ivf_recall(w: np.ndarray, x: np.ndarray, exact: dict, probes: list[float]) -> list[dict]:
    lists = max(1, int(math.sqrt(len(x))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(len(x), min(len(x), 40 * lists), replace=False)
    start = time.perf_counter()
    index.train(x[np.sort(sample)])
    index.add(x)
    built, rows = time.perf_counter() - start, []
    for fraction in probes:
        index.nprobe = max(1, round(fraction * lists))
        start = time.perf_counter()
        _, supports = index.search(w, 10)
        _, opposes = index.search(-w, 10)
        seconds = (time.perf_counter() - start) / (2 * len(w))
        rows.append({"lists": lists, "nprobe": index.nprobe, "build_s": built, "ms_per_query": 1000 * seconds,
                     "supports": recall(supports, exact["supports"]), "opposes": recall(opposes, exact["opposes"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--scores", required=True, help="a dense scores key of one model")
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--jl-dims", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--candidates", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--probes", type=float, nargs="+", default=[0.01, 0.05, 0.25])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    w, x, stored = folded(Store.open(args.store), args.scores, args.targets)
    tau = w @ x.T
    exact = {"supports": np.argsort(-tau, axis=1, kind="stable")[:, :10],
             "opposes": np.argsort(tau, axis=1, kind="stable")[:, :10]}
    rms = np.sqrt((tau.astype(np.float64) ** 2).mean(axis=1))
    result = {"rows": len(x), "dims": x.shape[1], "targets": len(w),
              "largest_difference_from_stored": float(np.abs(tau - stored).max() / np.abs(stored).max()),
              "largest_difference_in_roundings": difference_in_roundings(w, x, tau, stored),
              "top_10_in_rms": float(np.mean(np.take_along_axis(tau, exact["supports"], 1).mean(1) / rms)),
              "projection": projection_recall(w, x, tau, exact, args.jl_dims, args.candidates),
              "ivf": ivf_recall(w, x, exact, args.probes)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
