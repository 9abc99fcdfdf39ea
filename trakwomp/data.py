"""Datasets named by spec strings, as (float32 tensor, int label) examples with a content fingerprint.

Specs:
    cifar10-mini:train | cifar10-mini:test   the embedded class-balanced CIFAR-10 subset
    cifar10:ROOT:train | cifar10:ROOT:test   torchvision's CIFAR-10 under ROOT (downloads only if asked)
    imagefolder:PATH                         torchvision's ImageFolder, in its sorted order
    npz:PATH                                 arrays `x` (N, ...) and `y` (N,) in an .npz file

Images reach a model as ToTensor output (float32 in [0, 1], channels first); a user transform,
if given, is applied after that, everywhere a model sees the data.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trakwomp.errors import UserError
from trakwomp.imports import import_object
from trakwomp.tasks import Batch

SPEC_HELP = ("cifar10-mini:train|test, cifar10:ROOT:train|test, imagefolder:PATH, npz:PATH, "
             "fortunes-mini:train|test or jsonl:PATH")
TEXT_KINDS = ("fortunes-mini", "jsonl")


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a dataset's content: later stages record it and refuse other data."""

    num_examples: int
    classes: tuple[str, ...]
    sha256: str

    def as_dict(self) -> dict:
        return {"num_examples": self.num_examples, "classes": list(self.classes), "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        return cls(int(d["num_examples"]), tuple(d["classes"]), str(d["sha256"]))


class Examples(torch.utils.data.Dataset):
    """What every dataset has: the examples `indices` of a source, whose labels index `classes`."""

    indices: np.ndarray
    classes: tuple[str, ...]
    _labels: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.indices]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Dataset(Examples):
    """An ordered dataset: example i is `(x_i, y_i)`, with class names and, where known, file paths.

    `read_raw(j)` returns the stored example j of the source as a numpy array (uint8 HWC pixels
    for images), `to_tensor` turns that into the model input before the user transform.
    """

    def __init__(
        self,
        spec: str,
        labels: np.ndarray,
        classes: Sequence[str],
        read_raw: Callable[[int], np.ndarray],
        to_tensor: Callable[[np.ndarray], torch.Tensor],
        paths: Sequence[str] | None = None,
        indices: np.ndarray | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        transform_spec: str | None = None,
    ):
        self.spec = spec
        self._labels = np.asarray(labels, dtype=np.int64)
        self.classes = tuple(classes)
        self._read_raw = read_raw
        self._to_tensor = to_tensor
        self._paths = paths
        self.has_explicit_indices = indices is not None
        self.indices = np.arange(len(self._labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.transform_spec = transform_spec

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        x = self._to_tensor(self._read_raw(j))
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self._labels[j])

    def path(self, i: int) -> str | None:
        return None if self._paths is None else str(self._paths[int(self.indices[i])])

    lengths = None  # images have no length to batch by

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> Batch:
        return Batch((torch.stack([x for x, _ in items]),), torch.tensor([y for _, y in items], dtype=torch.long))

    def source_record(self) -> dict:
        return {}

    def select(self, indices: np.ndarray) -> "Dataset":
        """The examples `indices` of this dataset, in that order."""
        indices = check_indices(self.spec, np.asarray(indices), len(self))
        return Dataset(self.spec, self._labels, self.classes, self._read_raw, self._to_tensor,
                       self._paths, self.indices[indices], self.transform, self.transform_spec)

    def fingerprint(self) -> Fingerprint:
        """Number of examples, class names and a SHA-256 over every example's shape, raw values and label."""
        digest = hashlib.sha256()
        digest.update(self._labels[self.indices].astype("<i8").tobytes())
        for j in self.indices:
            raw = np.ascontiguousarray(self._read_raw(int(j)))
            digest.update(f"{raw.dtype.str}{raw.shape}".encode())
            digest.update(raw.tobytes())
        return Fingerprint(len(self), self.classes, digest.hexdigest())


def check_indices(spec: str, indices: np.ndarray, size: int) -> np.ndarray:
    """`indices` if they are a non-empty 1-d integer array within [0, size)."""
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise UserError(f"indices for {spec} must be a 1-d array of integers, got {indices.dtype} {indices.shape}")
    if not len(indices):
        raise UserError(f"indices for {spec} select no examples")
    if indices.min() < 0 or indices.max() >= size:
        raise UserError(f"indices for {spec} must lie in [0, {size}), got values from {indices.min()} to {indices.max()}")
    return indices


def image_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) pixels to float32 (C, H, W) in [0, 1], as torchvision's ToTensor."""
    return torch.tensor(pixels).permute(2, 0, 1).float().div_(255.0)


def array_to_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _split(spec: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise UserError(f"dataset spec {spec!r}: the split must be 'train' or 'test', got {split!r}")
    return split == "train"


def _from_uint8_images(spec: str, images: np.ndarray, labels: np.ndarray, classes, paths=None) -> Dataset:
    return Dataset(spec, labels, classes, images.__getitem__, image_to_tensor, paths)


def _cifar10_mini(spec: str, split: str) -> Dataset:
    _split(spec, split)
    with resources.files("trakwomp").joinpath("assets/cifar10_mini.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as z:
            images, labels = z[f"x_{split}"], z[f"y_{split}"]
            classes, files = [str(c) for c in z["classes"]], [str(p) for p in z[f"files_{split}"]]
    return _from_uint8_images(spec, images, labels, classes, files)


def _cifar10(spec: str, root: str, split: str, download: bool) -> Dataset:
    train = _split(spec, split)
    from torchvision.datasets import CIFAR10

    if not download and not Path(root).is_dir():
        raise UserError(f"dataset spec {spec!r}: no folder {root!r} (pass --download to fetch CIFAR-10 there)")
    try:
        ds = CIFAR10(root, train=train, download=download)
    except RuntimeError as e:
        raise UserError(f"dataset spec {spec!r}: {e} (pass --download to fetch it)") from None
    return _from_uint8_images(spec, np.asarray(ds.data), np.asarray(ds.targets), ds.classes)


def _imagefolder(spec: str, root: str) -> Dataset:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise UserError(f"dataset spec {spec!r}: no folder {root!r}")
    try:
        ds = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"dataset spec {spec!r}: {e}") from None
    paths = [p for p, _ in ds.samples]

    def read(j: int) -> np.ndarray:
        try:
            with Image.open(paths[j]) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as e:
            raise UserError(f"cannot read image {paths[j]}: {e}") from None

    return Dataset(spec, np.asarray(ds.targets), ds.classes, read, image_to_tensor, paths)


def _npz(spec: str, path: str) -> Dataset:
    if not Path(path).is_file():
        raise UserError(f"dataset spec {spec!r}: no file {path!r}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"dataset spec {spec!r}: {path!r} is not an .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise UserError(f"dataset spec {spec!r}: the .npz must hold arrays 'x' and 'y', it holds {sorted(z.keys())}")
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]] if "classes" in z else None
    except (ValueError, OSError) as e:
        raise UserError(f"dataset spec {spec!r}: cannot read {path!r} as .npz: {e}") from None
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"dataset spec {spec!r}: need x (N, ...) and integer y (N,), got x {x.shape} and y {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise UserError(f"dataset spec {spec!r}: labels must be >= 0")
    if classes is None:
        classes = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
    return Dataset(spec, y, classes, x.__getitem__, array_to_tensor)


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
        from trakwomp.text import load_text_dataset  # text.py builds on this module

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


def read_npy(path: str | Path, what: str, mmap_mode: str | None = None) -> np.ndarray:
    """The array in an .npy file (never unpickled); a missing or damaged file is a UserError."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise UserError(f"{what} {str(path)!r} is not an .npy file")
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {e}") from None


def load_indices(path: str | Path, what: str = "indices file") -> np.ndarray:
    """A 1-d integer (or, for masks, boolean) array from an .npy file."""
    values = read_npy(path, what)
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise UserError(f"{what} {str(path)!r} must hold a 1-d integer array, got {values.dtype} {values.shape}")
    return values


def load_batch(dataset: Dataset, positions) -> Batch:
    return dataset.collate([dataset[int(i)] for i in positions])


def length_sorted(dataset: Dataset, positions: np.ndarray) -> np.ndarray:
    """`positions` ordered by token count (stable), so that batches cut from them pad little;
    unchanged for data without lengths."""
    positions = np.asarray(positions)
    if dataset.lengths is None:
        return positions
    return positions[np.argsort(dataset.lengths[positions], kind="stable")]
