"""Make a class-balanced CIFAR-10 ImageFolder subset from the shared JPEG archive.

Usage:
    python bench/make_cifar_subset.py ARCHIVE OUT --train 5000 --test 500 [--seed 0]

Writes OUT/train/<class>/*.jpg and OUT/test/<class>/*.jpg (file bytes copied as they are in
the archive, so that ImageFolder decodes the same pixels as a tree extracted by hand).
"""

import argparse
import tarfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive")
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    with tarfile.open(args.archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        by_folder: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for m in members:
            split, cls = Path(m.name.lstrip("./")).parts[:2]
            by_folder.setdefault((split, cls), []).append(m)
        for (split, cls), files in sorted(by_folder.items()):
            count = {"train": args.train, "test": args.test}[split] // 10
            files = sorted(files, key=lambda m: m.name)
            target = args.out / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for i in sorted(rng.choice(len(files), size=count, replace=False)):
                (target / Path(files[i].name).name).write_bytes(tar.extractfile(files[i]).read())


if __name__ == "__main__":
    main()
