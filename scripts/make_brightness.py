"""Write a regression dataset from the embedded cifar10-mini: each image (float32 in [0, 1],
channels first) labelled with its mean brightness, as OUT-train.npz and OUT-test.npz for
`trakwomp train --task regression --data npz:OUT-train.npz` (docs/architecture.md).

    python scripts/make_brightness.py OUT
"""

import sys

import numpy as np

from trakwomp.data.specs import load_dataset


def main(out: str) -> None:
    for split in ("train", "test"):
        images = load_dataset(f"cifar10-mini:{split}")
        x = np.stack([images[i][0].numpy() for i in range(len(images))]).astype(np.float32)
        y = x.mean(axis=(1, 2, 3), dtype=np.float64).astype(np.float32)
        np.savez(f"{out}-{split}.npz", x=x, y=y)
        print(f"wrote {out}-{split}.npz: {len(y)} images, brightness {y.min():.3f} to {y.max():.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "brightness")
