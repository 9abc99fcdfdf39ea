"""Which models, which view of the stored features and which stored scores a command works on."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from trakwomp.data.base import Dataset
from trakwomp.errors import UserError
from trakwomp.estimator.threshold import DEFAULT_THRESHOLD, check_threshold
from trakwomp.estimator.view import View, ViewSpec
from trakwomp.models.registry import check_made_from
from trakwomp.stages.bindings import recorded_data
from trakwomp.settings import option
from trakwomp.stages.stored_scores import find_scores, iterate_scores
from trakwomp.store import Store, paths


def parse_model_ids(text: str | None) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> None (all models). Ids come back sorted: a set of
    models is the same set in any order."""
    if text is None:
        return None
    ids = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"malformed `models` {text!r}: expected ids like 0,2,5-7")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        ids.extend(range(first, last + 1))
    if len(set(ids)) != len(ids) or not ids:
        raise UserError(f"`models` {text!r} is empty or names a model twice")
    return sorted(ids)


def featurized_models(handle: Store, requested: list[int] | None) -> list[int]:
    """Ids of the requested (default: all) registered models whose train features are complete,
    sorted (the order a set of models is given in does not matter)."""
    manifest = handle.manifest
    if manifest.featurize is None:
        raise UserError(f"store {handle.location!r} has no features yet; run `trakwomp featurize` first")
    registered = [entry.id for entry in manifest.models]
    num_chunks = math.ceil(manifest.num_examples / manifest.featurize_record().chunk_rows)
    ids = sorted(set(registered if requested is None else requested))
    for model_id in ids:
        if model_id not in registered:
            raise UserError(f"model {model_id} is not in store {handle.location!r} (models: {registered})")
        chunks = handle.done_units("featurize", paths.unit(model_id))
        check_made_from(handle, "featurize", [paths.unit(model_id, int(c)) for c in chunks], model_id)
        done = len(chunks)
        if done < num_chunks:
            raise UserError(f"model {model_id} is featurized in {done} of {num_chunks} row chunks; "
                            "finish `trakwomp featurize` first")
    return ids


def store_view(handle: Store, spec: ViewSpec) -> View:
    """The view `spec` asks for, checked against the store's features."""
    recorded = handle.manifest.featurize
    if recorded is None:
        raise UserError(f"store {handle.location!r} has no features yet; run `trakwomp featurize` first")
    num_train = handle.manifest.num_examples
    if recorded.layers:
        return View.resolve_layers([layer.width for layer in recorded.layers], spec.dims, spec.blocks, spec.ridge,
                                   num_train)
    projector = recorded.projector
    return View.resolve(projector.blocks * projector.block_dim, projector.block_dim, spec.dims, spec.blocks,
                        spec.ridge, num_train)


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

    def key(self, handle: Store, top_k: int | None = None) -> str:
        """The key of the finished scores selected (for a reader of the `top_k` strongest examples
        only, top-k-only scores where no dense ones are: `find_scores`)."""
        return find_view_scores(handle, self.targets, self.view, self.models, top_k)

    def read(self, handle: Store, key: str):
        """(rows, soft-thresholded scores) for successive target chunks of the scores `key`."""
        return iterate_scores(handle, key, self.threshold)

    def scored_targets(self, handle: Store, key: str) -> Dataset:
        """The targets of the scores `key`: `targets` if given, else read again from the spec
        `score` recorded, checked by fingerprint."""
        if self.targets is not None:
            return self.targets
        recorded = handle.manifest.targets[handle.manifest.scores[key].targets]
        return recorded_data(handle, recorded.spec, recorded.sha256, "scored targets",
                             "pass `targets` (and `target_indices`) as given to `trakwomp score`")


def find_view_scores(handle: Store, targets: Dataset | None, view: ViewSpec, models: list[int] | None,
                     top_k: int | None = None) -> str:
    """The key of finished scores of the view and models, for `targets` (needed only if several
    target sets are scored); `top_k`: see `find_scores`."""
    return find_scores(handle, store_view(handle, view), featurized_models(handle, models),
                       targets.fingerprint().sha256 if targets is not None else None, top_k)
