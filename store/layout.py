"""Where things live in a store and how units of work are named: the one place that knows the
paths (docs/store.md draws the same tree).

A unit of work is named by its parts joined with `/`, numbers as six digits (model 3, row chunk
1: `000003/000001`), so that names sort as numbers do.
"""

from __future__ import annotations


def unit(*parts: int | str) -> str:
    """`unit(3, 1)` -> "000003/000001"; string parts (a view key, a role) are kept as they are."""
    return "/".join(part if isinstance(part, str) else f"{part:06d}" for part in parts)


def features(model_id: int, prefix: str = "") -> str:
    """The folder of a model's phi, q and margins (the task's output f); `prefix` is that of a
    target set (`targets_prefix`), empty for the train set."""
    return f"{prefix}features/{unit(model_id)}"


def targets_prefix(targets_id: str) -> str:
    return f"targets/{targets_id}/"


def inverse(view_key: str, model_id: int) -> str:
    """A model's block Gram inverses at a view, (blocks, width, width) float64."""
    return f"finalize/{view_key}/{unit(model_id)}/inverse"


def trained_model(role: str, index: int) -> str:
    """The folder of model `index` of `role`: its mask, and its weights or its target outputs."""
    return f"models/{role}/{unit(index)}"


def checkpoint(role: str, index: int, epoch: int) -> str:
    """The folder of a checkpoint kept along model `index`'s run, after epoch `epoch` (the last
    epoch's is the model itself, `trained_model`)."""
    return f"{trained_model(role, index)}/checkpoints/{unit(epoch)}"
