"""Build the embedded `cifar10-mini` dataset from the shared CIFAR-10 JPEG archive.

Usage:
    python scripts/build_cifar10_mini.py ../shared/data/cifar10-jpeg.tar.gz trakwomp/assets/cifar10_mini.npz

Picks, with a fixed seed, a class-balanced subset (200 train and 50 test images per
class) of the archive's `train/<class>/NNNN.jpg` and `test/<class>/NNNN.jpg` files,
decodes them once with Pillow and stores the uint8 pixels (N, 32, 32, 3), the labels,
the class names and the source file names in one compressed .npz. Storing pixels,
not JPEG bytes, makes the dataset's fingerprint independent of the JPEG decoder.
"""

import io
import sys
import tarfile

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 200, "test": 50}
SEED = 20261128


def build(archive: str, out: str) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")}
        arrays = {}
        rng = np.random.default_rng(SEED)
        for split, per_class in PER_CLASS.items():
            pixels, labels, files = [], [], []
            for label, name in enumerate(CLASSES):
                names = sorted(k for k in members if k.startswith(f"{split}/{name}/"))
                chosen = sorted(rng.choice(len(names), size=per_class, replace=False))
                for i in chosen:
                    data = tar.extractfile(members[names[i]]).read()
                    pixels.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8))
                    labels.append(label)
                    files.append(names[i])
            arrays[f"x_{split}"] = np.stack(pixels)
            arrays[f"y_{split}"] = np.asarray(labels, dtype=np.uint8)
            arrays[f"files_{split}"] = np.asarray(files)
    np.savez_compressed(out, classes=np.asarray(CLASSES), **arrays)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    build(sys.argv[1], sys.argv[2])
