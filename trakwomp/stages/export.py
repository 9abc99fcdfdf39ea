"""Stored scores out of the store: an .npy matrix, and tables of each target's strongest train examples."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from trakwomp.data.base import Dataset
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD
from trakwomp.outputs import check_output, csv_cell, write_atomically
from trakwomp.stages.bindings import stored_dataset
from trakwomp.stages.stored_scores import find_scores_by_key, iterate_scores, iterate_targets
from trakwomp.store import Store, paths


def export_scores(store: str | Path, key: str, out: str | Path, threshold: float = DEFAULT_THRESHOLD) -> tuple[int, int]:
    """Write the (n_targets, n_train) scores `key`, soft-thresholded, to an .npy file, streaming
    block by block; the file appears whole or not at all (`write_atomically`)."""
    check_output("`out`", out, (".npy",), store)
    handle = Store.open(store)
    find_scores_by_key(handle, key)
    tau = handle.array(paths.scores(key))

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": tau.shape})
        for _, block in iterate_scores(handle, key, threshold):
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())

    write_atomically(out, write)
    rows, columns = tau.shape
    return rows, columns


def top_k_rows(store: str | Path, key: str, targets: Dataset, k: int, threshold: float = DEFAULT_THRESHOLD,
               train: Dataset | None = None) -> list[dict]:
    """For each target, its k most positive and k most negative train examples of scores `key`
    (dense, or top-k only with k at most theirs); `train`: the store's train set, if the caller
    has loaded it already (else it is loaded and checked here)."""
    handle = Store.open(store)
    find_scores_by_key(handle, key)
    train = train if train is not None else stored_dataset(handle)
    rows = []
    for target, index, scores in iterate_targets(handle, key, threshold):
        rows.extend(strongest_rows(targets, target, train, scores, k, index))
    return rows


def strongest_rows(targets: Dataset, target: int, train: Dataset, scores: np.ndarray, k: int,
                   index: np.ndarray | None = None) -> list[dict]:
    """Rows of the k train examples with the largest and the k with the smallest `scores` (one
    target's row of tau; or, with `index`, the scores of train examples `index`, ascending), each
    describing the target, the train example and its score."""
    head, rows = {"target": target, **describe(targets, target, "target")}, []
    for direction, rank, i in strongest(scores, k):
        train_index = int(index[i]) if index is not None else i
        rows.append({**head, "direction": direction, "rank": rank, "train_index": train_index,
                     **describe(train, train_index, "train"), "score": float(scores[i])})
    return rows


def describe(data: Dataset, i: int, prefix: str) -> dict:
    """What a row says of example i: its label (None if the data has no classes), and its path,
    or its text and source."""
    return {f"{prefix}_{key}": value for key, value in data.describe(i).items()}


def strongest(scores: np.ndarray, k: int) -> list[tuple[str, int, int]]:
    """(direction, rank, train index) of the k largest positive scores ("supports", largest
    first) and the k most negative ("opposes", smallest first); a score of zero (all but a few
    once soft-thresholded) neither supports nor opposes, so a list may hold fewer than k; ties
    keep the lower index first."""
    order = np.argsort(scores, kind="stable")[:k]
    supports = np.argsort(-scores, kind="stable")[:k]
    return ([("supports", rank, int(i)) for rank, i in enumerate(supports[scores[supports] > 0], 1)]
            + [("opposes", rank, int(i)) for rank, i in enumerate(order[scores[order] < 0], 1)])


TABLE_SUFFIXES = (".csv", ".json")


def write_table(rows: list[dict], out: str | Path) -> None:
    """Rows as CSV (cells that would start a spreadsheet formula neutralized: `csv_cell`), or as
    JSON, exact, if `out` ends in .json; written atomically."""
    def write(f) -> None:
        if Path(out).suffix.lower() == ".json":
            f.write(json.dumps(rows, indent=1).encode("utf-8"))
            return
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ["target"])
        writer.writeheader()
        writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in rows)
        text.flush()
        text.detach()

    write_atomically(out, write)
