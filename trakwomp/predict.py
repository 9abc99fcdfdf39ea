"""`predict`: the datamodel prediction of a train subset, from stored scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trakwomp.data import Dataset
from trakwomp.errors import UserError
from trakwomp.estimator import DEFAULT_THRESHOLD, ViewSpec
from trakwomp.store import Store
from trakwomp.stored_scores import find_view_scores, iterate_scores


def predict(
    store: str | Path,
    subset: np.ndarray,
    targets: Dataset | None = None,
    view: ViewSpec = ViewSpec(),
    models: list[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[str, np.ndarray]:
    """The datamodel prediction sum_{i in S} tau_i(z) for every scored target z, for a train
    subset S (a boolean mask over the train set, or train indices), from the stored scores of the
    view and models (and `targets`, needed if several target sets are scored). Only differences
    between subsets are meaningful: the datamodel's intercept is not estimated."""
    handle = Store.open(store)
    key = find_view_scores(handle, targets, view, models)
    n = handle.manifest["dataset"]["num_examples"]
    if subset.dtype != bool:
        if not np.issubdtype(subset.dtype, np.integer) or subset.ndim != 1:
            raise UserError("--subset must be a boolean mask over the train set or a 1-d array of train indices")
        if len(subset) and (subset.min() < 0 or subset.max() >= n):
            raise UserError(f"--subset indices must lie in [0, {n})")
        mask = np.zeros(n, dtype=bool)
        mask[subset] = True
        subset = mask
    if subset.shape != (n,):
        raise UserError(f"--subset mask has shape {subset.shape}, expected ({n},) for the store's train set")
    parts = [block @ subset.astype(np.float32) for _, block in iterate_scores(handle, key, threshold)]
    return key, np.concatenate(parts)
