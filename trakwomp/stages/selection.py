"""Which models and which view of the stored features a command works on."""

from __future__ import annotations

import math
import re

from trakwomp.errors import UserError
from trakwomp.estimator.view import View, ViewSpec
from trakwomp.models.registry import check_made_from
from trakwomp.store import Store, layout


def parse_model_ids(text: str | None) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; None -> None (all models). Ids come back sorted: a set of
    models is the same set in any order."""
    if text is None:
        return None
    ids = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"malformed --models {text!r}: expected ids like 0,2,5-7")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        ids.extend(range(first, last + 1))
    if len(set(ids)) != len(ids) or not ids:
        raise UserError(f"--models {text!r} is empty or names a model twice")
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
        chunks = handle.done_units("featurize", layout.unit(model_id))
        check_made_from(handle, "featurize", [layout.unit(model_id, int(c)) for c in chunks], model_id)
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
