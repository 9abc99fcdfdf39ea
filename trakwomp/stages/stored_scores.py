"""Finding finished scores in a store, by view, models and targets, and reading them back."""

from __future__ import annotations

import math

import numpy as np
import torch

from trakwomp.errors import UserError
from trakwomp.estimator.threshold import relative_soft_threshold
from trakwomp.estimator.view import View
from trakwomp.store import Store, paths


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
    return f"{view.key}_m{compact_ids(model_ids)}_t{paths.short_id(targets_sha)}"


def view_record(view: View) -> list:
    """How a score entry records its view: [dims, blocks, ridge], and "layers" for per-layer blocks."""
    return [view.dims, view.blocks, view.ridge] + (["layers"] if view.layer_widths else [])


def find_scores(handle: Store, view: View, model_ids: list[int], targets_sha: str | None,
                top_k: int | None = None) -> str:
    """The key of finished scores for the view and models (and targets, if given): dense scores,
    or, for a reader of the `top_k` strongest examples only, where none are dense, top-k-only
    scores that kept at least `top_k`."""
    scored = handle.manifest.scores
    matching = [k for k, v in scored.items() if list(v.view) == view_record(view) and list(v.models) == model_ids
                and (targets_sha is None or v.targets == paths.short_id(targets_sha))]
    candidates = [k for k in matching if scored[k].top_k is None] or \
        [k for k in matching if top_k is not None and (scored[k].top_k or 0) >= top_k]
    if len({scored[k].targets for k in candidates}) > 1:
        raise UserError(f"several target sets are scored at view {view.key}; pass `targets` to choose one")
    if not candidates and matching:
        kept = max(scored[k].top_k or 0 for k in matching)
        wanted = f"the top {top_k}" if top_k is not None else "every train example's score"
        raise UserError(f"the scores at view {view.key} for models {compact_ids(model_ids)} keep only each target's "
                        f"top {kept} (`top_k_only`), and this reads {wanted}; run `trakwomp score` without "
                        f"`top_k_only`{' or with a larger `top_k`' if top_k is not None else ''}")
    if not candidates:
        answers = "explain's answers are kept apart from scores and read by explain only; " \
            if not scored and handle.manifest.answers.next else ""
        raise UserError(f"no scores at view {view.key} for models {compact_ids(model_ids)}"
                        f"{' and these targets' if targets_sha else ''}; {answers}run `trakwomp score` first")
    return find_scores_by_key(handle, candidates[0])


def scores_array(handle: Store, key: str) -> str:
    """The path of the array whose rows are the targets of scores `key`: `tau`, or for top-k-only
    scores their candidates' values."""
    return paths.scores(key) if handle.manifest.scores[key].top_k is None else paths.top_k(key, "values")


def find_scores_by_key(handle: Store, key: str) -> str:
    """`key`, checked to name finished scores (dense or top-k only)."""
    if key not in handle.manifest.scores:
        raise UserError(f"store {handle.location!r} has no scores {key!r}")
    rows = handle.array(scores_array(handle, key))
    n_targets, chunk_rows = rows.shape[0], rows.chunks[0]
    missing = [c for c in range(math.ceil(n_targets / chunk_rows)) if handle.done_info("score", paths.unit(key, c)) is None]
    if missing:
        raise UserError(f"scores {key} are unfinished ({len(missing)} target chunks left); run `trakwomp score` again")
    return key


def iterate_scores(handle: Store, key: str, threshold: float = 0.0, targets: range | None = None):
    """(rows, soft-thresholded scores) for successive target chunks of stored scores (of the
    `targets` only, if given)."""
    tau = handle.array(paths.scores(key))
    for rows in target_steps(tau.shape[0], tau.chunks[0], targets):
        block = torch.from_numpy(tau[rows.start:rows.stop])
        yield rows, relative_soft_threshold(block, threshold).numpy()


def target_steps(num_targets: int, step: int, targets: range | None) -> list[range]:
    """`targets` (default: all) in pieces that stay within the stored chunks of `step` rows."""
    targets = targets if targets is not None else range(num_targets)
    steps, start = [], targets.start
    while start < targets.stop:
        stop = min(targets.stop, (start // step + 1) * step)
        steps.append(range(start, stop))
        start = stop
    return steps


def iterate_top_k(handle: Store, key: str, threshold: float = 0.0, targets: range | None = None):
    """(target, train indices, their soft-thresholded scores) for each target of the top-k-only
    scores `key` (of the `targets` only, if given): its candidates (each train index once,
    ascending), thresholded at `threshold` times the target's RMS score over every train example,
    as the dense scores would be."""
    values, index = handle.array(paths.top_k(key, "values")), handle.array(paths.top_k(key, "index"))
    sum_squares, num_train = handle.array(paths.top_k(key, "sum_squares")), handle.manifest.num_examples
    for rows in target_steps(values.shape[0], values.chunks[0], targets):
        scale = (torch.from_numpy(sum_squares[rows.start:rows.stop]) / num_train).sqrt()[:, None]
        block = relative_soft_threshold(torch.from_numpy(values[rows.start:rows.stop]), threshold, scale).numpy()
        for local, indices in enumerate(np.asarray(index[rows.start:rows.stop])):
            unique, first = np.unique(indices, return_index=True)
            yield rows.start + local, unique, block[local, first]


def iterate_targets(handle: Store, key: str, threshold: float = 0.0, targets: range | None = None):
    """(target, train indices or None for all, their soft-thresholded scores) for each target of
    the finished scores `key`, dense or top-k only (of the `targets` only, if given)."""
    if handle.manifest.scores[key].top_k is not None:
        yield from iterate_top_k(handle, key, threshold, targets)
        return
    for rows, block in iterate_scores(handle, key, threshold, targets):
        for local, target in enumerate(rows):
            yield target, None, block[local]
