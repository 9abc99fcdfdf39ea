"""`predict`: the datamodel prediction of a train subset, from stored scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trakwomp.errors import UserError
from trakwomp.stages.selection import Selection
from trakwomp.store import Store


def predict(
    store: str | Path,
    subset: np.ndarray,
    selection: Selection = Selection(),
) -> tuple[str, np.ndarray]:
    """The datamodel prediction sum_{i in S} tau_i(z) for every scored target z, for a train
    subset S (a boolean mask over the train set, or train indices), from the selected stored
    scores. Only differences between subsets are meaningful: the datamodel's intercept is not
    estimated."""
    handle = Store.open(store)
    key = selection.key(handle)
    n = handle.manifest.num_examples
    if subset.dtype != bool:
        if not np.issubdtype(subset.dtype, np.integer) or subset.ndim != 1:
            raise UserError("`subset` must be a boolean mask over the train set or a 1-d array of train indices")
        if len(subset) and (subset.min() < 0 or subset.max() >= n):
            raise UserError(f"`subset` indices must lie in [0, {n})")
        mask = np.zeros(n, dtype=bool)
        mask[subset] = True
        subset = mask
    if subset.shape != (n,):
        raise UserError(f"`subset` mask has shape {subset.shape}, expected ({n},) for the store's train set")
    parts = [block @ subset.astype(np.float32) for _, block in selection.read(handle, key)]
    return key, np.concatenate(parts)
