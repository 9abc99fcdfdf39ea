"""Datasets by spec string: `load_dataset` finds the dataset kind a spec names.
"""

from __future__ import annotations

from pathlib import Path

from trakwomp.data.base import Dataset
from trakwomp.data.files import load_indices
from trakwomp.data.images import _cifar10, _cifar10_mini, _imagefolder, _npz
from trakwomp.errors import UserError
from trakwomp.imports import import_object

SPEC_HELP = ("cifar10-mini:train|test, cifar10:ROOT:train|test, imagefolder:PATH, npz:PATH, "
             "fortunes-mini:train|test or jsonl:PATH")


TEXT_KINDS = ("fortunes-mini", "jsonl")


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
    kind, _, rest = spec.partition(":")
    if kind in TEXT_KINDS:
        from trakwomp.data.text import (
            load_text_dataset,  # text.py builds on this module
        )

        if transform is not None:
            raise UserError("--transform applies to tensors of images or arrays, not to text")
        ds = load_text_dataset(spec, tokenizer or "bytes", max_length)
    elif tokenizer is not None or max_length is not None:
        raise UserError(f"--tokenizer and --max-length apply to text data, not to {spec!r}")
    elif kind == "cifar10-mini":
        ds = _cifar10_mini(spec, rest)
    elif kind == "cifar10":
        root, _, split = rest.rpartition(":")
        if not root:
            raise UserError(f"dataset spec {spec!r}: expected cifar10:ROOT:train or cifar10:ROOT:test")
        ds = _cifar10(spec, root, split, download)
    elif kind == "imagefolder" and rest:
        ds = _imagefolder(spec, rest)
    elif kind == "npz" and rest:
        ds = _npz(spec, rest)
    else:
        raise UserError(f"unknown dataset spec {spec!r}; expected {SPEC_HELP}")
    if len(ds) == 0:
        raise UserError(f"dataset {spec!r} has no examples")
    if indices is not None:
        ds = ds.select(load_indices(indices))
    if transform is not None and kind not in TEXT_KINDS:
        ds.transform = import_object(transform, what="transform")
        ds.transform_spec = transform
    return ds
