"""Finding finished scores in a store, by view, models and targets, and reading them back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trakwomp.data.base import Dataset
from trakwomp.errors import UserError
from trakwomp.estimator.threshold import (
    DEFAULT_THRESHOLD,
    check_threshold,
    relative_soft_threshold,
)
from trakwomp.estimator.view import View, ViewSpec
from trakwomp.settings import option
from trakwomp.stages.selection import featurized_models, store_view
from trakwomp.store import Store, layout


def compact_ids(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2.5': a name for a set of model ids (sorted), made of characters
    that store paths allow."""
    ids, parts, start = sorted(ids), [], None
    for i, value in enumerate(ids):
        if start is None:
            start = value
        if i + 1 == len(ids) or ids[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ".".join(parts)


def scores_key(view: View, model_ids: list[int], targets_sha: str) -> str:
    return f"{view.key}_m{compact_ids(model_ids)}_t{layout.short_id(targets_sha)}"


def view_record(view: View) -> list:
    """How a score entry records its view: [dims, blocks, ridge], and "layers" for per-layer blocks."""
    return [view.dims, view.blocks, view.ridge] + (["layers"] if view.layer_widths else [])


def find_scores(handle: Store, view: View, model_ids: list[int], targets_sha: str | None) -> str:
    """The key of finished scores for the view and models (and targets, if given)."""
    scored = handle.manifest.scores
    candidates = [k for k, v in scored.items() if list(v.view) == view_record(view) and list(v.models) == model_ids
                  and (targets_sha is None or v.targets == layout.short_id(targets_sha))]
    if len(candidates) > 1:
        raise UserError(f"several target sets are scored at view {view.key}; pass --targets to choose one")
    if not candidates:
        answers = "explain's answers are kept apart from scores and read by explain only; " \
            if not scored and handle.manifest.answers.next else ""
        raise UserError(f"no scores at view {view.key} for models {compact_ids(model_ids)}"
                        f"{' and these targets' if targets_sha else ''}; {answers}run `trakwomp score` first")
    return find_scores_by_key(handle, candidates[0])


@dataclass(frozen=True)
class Selection:
    """Which stored scores a command reads: those of `view` and `models` (default: all featurized)
    for `targets` (needed only if several target sets are scored), soft-thresholded at `threshold`
    (in units of each target's RMS score; 0 for the raw scores)."""

    view: ViewSpec = option(ViewSpec(), "The view: its dims, blocks and ridge.")
    models: list[int] | None = option(None, "Model ids to use, e.g. 0,2,5-7 (default: all featurized).")
    targets: Dataset | None = option(None, "Which scored targets (needed if several are scored).")
    threshold: float = option(DEFAULT_THRESHOLD, "Soft threshold of the scores, in units of each target's RMS score "
                                                 "(0 for the raw scores; docs/method.md).")

    def __post_init__(self):
        check_threshold(self.threshold)

    def key(self, handle: Store) -> str:
        """The key of the finished scores selected."""
        return find_view_scores(handle, self.targets, self.view, self.models)

    def read(self, handle: Store, key: str):
        """(rows, soft-thresholded scores) for successive target chunks of the scores `key`."""
        return iterate_scores(handle, key, self.threshold)


def find_view_scores(handle: Store, targets: Dataset | None, view: ViewSpec, models: list[int] | None) -> str:
    """The key of finished scores of the view and models, for `targets` (needed only if several
    target sets are scored)."""
    return find_scores(handle, store_view(handle, view), featurized_models(handle, models),
                       targets.fingerprint().sha256 if targets is not None else None)


def find_scores_by_key(handle: Store, key: str) -> str:
    """`key`, checked to name finished scores."""
    if key not in handle.manifest.scores:
        raise UserError(f"store {handle.location!r} has no scores {key!r}")
    tau = handle.array(layout.scores(key))
    n_targets, chunk_rows = tau.shape[0], tau.chunks[0]
    missing = [c for c in range(math.ceil(n_targets / chunk_rows)) if handle.done_info("score", layout.unit(key, c)) is None]
    if missing:
        raise UserError(f"scores {key} are unfinished ({len(missing)} target chunks left); run `trakwomp score` again")
    return key


def iterate_scores(handle: Store, key: str, threshold: float = 0.0):
    """(rows, soft-thresholded scores) for successive target chunks of stored scores."""
    tau = handle.array(layout.scores(key))
    step = tau.chunks[0]
    for start in range(0, tau.shape[0], step):
        block = torch.from_numpy(tau[start:start + step])
        yield range(start, start + len(block)), relative_soft_threshold(block, threshold).numpy()
