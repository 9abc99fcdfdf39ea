"""Datasets by spec string: `load_dataset` finds the dataset kind a spec names (a `DatasetKind`
in trakwomp.data.base's DATASET_KINDS)."""

from __future__ import annotations

from pathlib import Path

from trakwomp.data.base import DATASET_KINDS, Dataset, DatasetKind, LoadOptions
from trakwomp.data.files import load_indices
from trakwomp.errors import UserError
from trakwomp.imports import import_object


def spec_help() -> str:
    """Every dataset kind's spec, as help shows them."""
    return ", ".join(kind.usage for _, kind in DATASET_KINDS.items())


def dataset_kind(spec: str) -> DatasetKind:
    """The kind a spec names (by its prefix); an unknown one is refused."""
    name, _, rest = spec.partition(":")
    if name not in DATASET_KINDS or not rest:
        raise UserError(f"unknown dataset spec {spec!r}; expected {spec_help()}")
    return DATASET_KINDS.get(name)


def load_dataset(
    spec: str,
    indices: str | Path | None = None,
    transform: str | None = None,
    download: bool = False,
    tokenizer: str | None = None,
    max_length: int | None = None,
) -> Dataset:
    """The dataset named by `spec`, restricted to the .npy `indices` file if given, with the
    user `transform` (`package.module:callable`) applied to every example; text is tokenized
    with `tokenizer` (default bytes) and cut at `max_length` tokens if given."""
    kind = dataset_kind(spec)
    if kind.tokenized and transform is not None:
        raise UserError("`transform` applies to tensors of images or arrays, not to text")
    if not kind.tokenized and (tokenizer is not None or max_length is not None):
        raise UserError(f"`tokenizer` and `max_length` apply to text data, not to {spec!r}")
    ds = kind.load(spec, spec.partition(":")[2], LoadOptions(download, tokenizer, max_length))
    if len(ds) == 0:
        raise UserError(f"dataset {spec!r} has no examples")
    if indices is not None:
        ds = ds.select(load_indices(indices))
    if transform is not None:
        ds.transform = import_object(transform, what="transform")
        ds.transform_spec = transform
    return ds
