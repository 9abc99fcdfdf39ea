"""Build the embedded `fortunes-mini` text dataset from the shared fortunes archive.

Usage:
    python scripts/build_fortunes_mini.py ../shared/data/fortunes.tar.gz trakwomp/assets/fortunes_mini.jsonl.gz

Reads every text of the archive's `fortunes/<source>` files (texts separated by a line holding
only `%`), keeps those of MIN_BYTES to MAX_BYTES bytes of UTF-8 (trailing white space removed,
exact duplicates dropped), and draws with a fixed seed 2,000 train and 200 test texts without
overlap. Writes one JSON object per line, {"split", "source", "text"}, gzip-compressed with a
fixed timestamp so that the file is byte-for-byte reproducible.
"""

import gzip
import json
import sys
import tarfile

import numpy as np

SIZES = {"train": 2000, "test": 200}
MIN_BYTES, MAX_BYTES = 16, 200
SEED = 20261202


def read_texts(archive: str) -> list[tuple[str, str]]:
    """(source, text) for every text of the archive, in sorted source order."""
    texts, seen = [], set()
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith("fortunes/")
                          and m.name != "fortunes/COPYRIGHT"), key=lambda m: m.name)
        for member in members:
            source = member.name.split("/", 1)[1]
            content = tar.extractfile(member).read().decode("utf-8")
            for text in content.split("\n%\n"):
                text = text.strip("%").rstrip()
                if MIN_BYTES <= len(text.encode("utf-8")) <= MAX_BYTES and text not in seen:
                    seen.add(text)
                    texts.append((source, text))
    return texts


def build(archive: str, out: str) -> None:
    texts = read_texts(archive)
    order = np.random.default_rng(SEED).permutation(len(texts))
    lines, start = [], 0
    for split, size in SIZES.items():
        for i in order[start:start + size]:
            source, text = texts[int(i)]
            lines.append(json.dumps({"split": split, "source": source, "text": text}, ensure_ascii=False))
        start += size
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    print(f"{len(texts)} candidate texts; wrote {sum(SIZES.values())} to {out}")


if __name__ == "__main__":
    build(*sys.argv[1:3])
