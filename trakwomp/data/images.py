"""Images and arrays, as (float32 tensor, label) examples with a content fingerprint.

Specs:
    cifar10-mini:train | cifar10-mini:test   the embedded class-balanced CIFAR-10 subset
    cifar10:ROOT:train | cifar10:ROOT:test   torchvision's CIFAR-10 under ROOT (downloads only if asked)
    imagefolder:PATH                         torchvision's ImageFolder, in its sorted order
    npz:PATH                                 arrays `x` (N, ...) and `y` (N,) in an .npz file: integer
                                             class labels, or float values to predict (regression)

Images reach a model as ToTensor output (float32 in [0, 1], channels first); a user transform,
if given, is applied after that, everywhere a model sees the data.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trakwomp.data.base import (
    Batch,
    Dataset,
    DatasetKind,
    Fingerprint,
    LoadOptions,
    check_indices,
)
from trakwomp.errors import UserError


class ImageDataset(Dataset):
    """Images or arrays: example i is `(x_i, y_i)`, with class names (or real-valued labels, to
    predict by regression) and, where known, file paths.

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
        labels = np.asarray(labels)
        self._labels = labels.astype(np.float64 if labels.dtype.kind == "f" else np.int64)
        self.classes = tuple(classes)
        self._read_raw = read_raw
        self._to_tensor = to_tensor
        self._paths = paths
        self.has_explicit_indices = indices is not None
        self.indices = np.arange(len(self._labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.transform_spec = transform_spec

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | float]:
        j = int(self.indices[i])
        x = self._to_tensor(self._read_raw(j))
        if self.transform is not None:
            x = self.transform(x)
        return x, self._labels[j].item()

    def path(self, i: int) -> str | None:
        return None if self._paths is None else str(self._paths[int(self.indices[i])])

    def describe(self, i: int) -> dict:
        return {"label": self.label_name(i), "path": self.path(i)}

    def augmented(self, batch: Batch, generator: torch.Generator) -> Batch:
        """Images (examples of C x H x W) with random flips and crops (`augment`); arrays as they are."""
        if batch.inputs[0].ndim != 4:
            return batch
        return Batch((augment(batch.inputs[0], generator),), batch.labels)

    def collate(self, items: list[tuple[torch.Tensor, int | float]]) -> Batch:
        """Images stacked, and labels as int64 classes or float32 values."""
        labels = torch.tensor([y for _, y in items], dtype=torch.float32 if self.real_valued else torch.long)
        shapes = sorted({tuple(x.shape) for x, _ in items})
        if len(shapes) > 1:
            raise UserError(f"{self.spec} holds examples of different shapes ({', '.join(map(str, shapes[:3]))}); "
                            "a model takes one size: resize the images (or give `transform`)")
        return Batch((torch.stack([x for x, _ in items]),), labels)

    def source_record(self) -> dict:
        return {}

    def select(self, indices: np.ndarray) -> "ImageDataset":
        indices = check_indices(self.spec, np.asarray(indices), len(self))
        return ImageDataset(self.spec, self._labels, self.classes, self._read_raw, self._to_tensor,
                       self._paths, self.indices[indices], self.transform, self.transform_spec)

    def fingerprint(self) -> Fingerprint:
        """Number of examples, class names and a SHA-256 over the labels (int64, or float64 values)
        and every example's shape and raw values."""
        digest = hashlib.sha256()
        digest.update(self._labels[self.indices].astype("<f8" if self.real_valued else "<i8").tobytes())
        for j in self.indices:
            raw = np.ascontiguousarray(self._read_raw(int(j)))
            digest.update(f"{raw.dtype.str}{raw.shape}".encode())
            digest.update(raw.tobytes())
        return Fingerprint(len(self), self.classes, digest.hexdigest())


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flips and random crops of the reflect-padded images, per example; images
    of `pad` pixels a side or fewer (which reflect padding cannot pad) refused."""
    n, c, h, w = x.shape
    if min(h, w) <= pad:
        raise UserError(f"images of {h} x {w} pixels are too small for the recipe's augmentation (crops of the image "
                        f"reflect-padded by {pad} pixels): give images of more than {pad} pixels a side")
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    x = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, c, h, w)
    return x.gather(3, cols)


def image_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) pixels to float32 (C, H, W) in [0, 1], as torchvision's ToTensor."""
    return torch.tensor(pixels).permute(2, 0, 1).float().div_(255.0)


def array_to_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _split(spec: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise UserError(f"dataset spec {spec!r}: the split must be 'train' or 'test', got {split!r}")
    return split == "train"


def _from_uint8_images(spec: str, images: np.ndarray, labels: np.ndarray, classes, paths=None) -> ImageDataset:
    return ImageDataset(spec, labels, classes, images.__getitem__, image_to_tensor, paths)


def _cifar10_mini(spec: str, split: str) -> ImageDataset:
    _split(spec, split)
    with resources.files("trakwomp").joinpath("assets/cifar10_mini.npz").open("rb") as f, \
            np.load(f, allow_pickle=False) as z:
        images, labels = z[f"x_{split}"], z[f"y_{split}"]
        classes, files = [str(c) for c in z["classes"]], [str(p) for p in z[f"files_{split}"]]
    return _from_uint8_images(spec, images, labels, classes, files)


def _cifar10(spec: str, root: str, split: str, download: bool) -> ImageDataset:
    train = _split(spec, split)
    from torchvision.datasets import CIFAR10

    if not download and not Path(root).is_dir():
        raise UserError(f"dataset spec {spec!r}: no folder {root!r} (pass `download` to fetch CIFAR-10 there)")
    try:
        ds = CIFAR10(root, train=train, download=download)
    except RuntimeError as e:
        raise UserError(f"dataset spec {spec!r}: {e} (pass `download` to fetch it)") from None
    return _from_uint8_images(spec, np.asarray(ds.data), np.asarray(ds.targets), ds.classes)


def _imagefolder(spec: str, root: str) -> ImageDataset:
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise UserError(f"dataset spec {spec!r}: no folder {root!r}")
    try:
        ds = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"dataset spec {spec!r}: {e}") from None
    paths = [p for p, _ in ds.samples]

    return ImageDataset(spec, np.asarray(ds.targets), ds.classes, lambda j: read_image(paths[j]), image_to_tensor, paths)


IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def read_image(path: str) -> np.ndarray:
    """The RGB pixels of an image file in one of IMAGE_FORMATS, whatever its name says (a
    PostScript file named .png is refused, never handed to Ghostscript), within Pillow's limit on
    pixels (a larger image is refused before it is decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path}: {e} (trakwomp reads {', '.join(IMAGE_FORMATS)} files of at most "
                        f"{Image.MAX_IMAGE_PIXELS:,} pixels)") from None


def _npz(spec: str, path: str) -> ImageDataset:
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
    except (ValueError, OSError, MemoryError) as e:
        raise UserError(f"dataset spec {spec!r}: cannot read {path!r} as .npz: {type(e).__name__} {e}") from None
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or y.dtype.kind not in "iuf":
        raise UserError(f"dataset spec {spec!r}: need x (N, ...) and integer or float y (N,), got x {x.shape} and "
                        f"y {y.dtype} {y.shape}")
    if y.dtype.kind == "f":  # values to predict (--task regression): no classes
        if not np.isfinite(y).all():
            raise UserError(f"dataset spec {spec!r}: y holds NaN or infinite values")
        return ImageDataset(spec, y, (), x.__getitem__, array_to_tensor)
    if len(y) and y.min() < 0:
        raise UserError(f"dataset spec {spec!r}: labels must be >= 0")
    if classes is None:
        classes = [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)]
    return ImageDataset(spec, y, classes, x.__getitem__, array_to_tensor)


class Cifar10Mini(DatasetKind):
    name, usage = "cifar10-mini", "cifar10-mini:train|test"

    def load(self, spec: str, rest: str, options: LoadOptions) -> ImageDataset:
        return _cifar10_mini(spec, rest)


class Cifar10(DatasetKind):
    name, usage = "cifar10", "cifar10:ROOT:train|test"

    def load(self, spec: str, rest: str, options: LoadOptions) -> ImageDataset:
        root, _, split = rest.rpartition(":")
        if not root:
            raise UserError(f"dataset spec {spec!r}: expected cifar10:ROOT:train or cifar10:ROOT:test")
        return _cifar10(spec, root, split, options.download)


class ImageFolderKind(DatasetKind):
    name, usage = "imagefolder", "imagefolder:PATH"

    def load(self, spec: str, rest: str, options: LoadOptions) -> ImageDataset:
        return _imagefolder(spec, rest)


class Npz(DatasetKind):
    name, usage = "npz", "npz:PATH"

    def load(self, spec: str, rest: str, options: LoadOptions) -> ImageDataset:
        return _npz(spec, rest)
