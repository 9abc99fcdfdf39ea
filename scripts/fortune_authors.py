#!/usr/bin/env python3
"""Who said it: the shared fortunes that end in an attribution line, as prompt/completion pairs.

    python scripts/fortune_authors.py OUT [--authors N] [--archive PATH]

Reads ../shared/data/fortunes.tar.gz (or --archive). Many fortunes end in a line "-- Author";
the author is that line up to its first comma, parenthesis or " in ", without quotes. Authors
with at least 6 distinct quotes of at most 280 bytes are kept (at most 20 quotes each, drawn
with a fixed seed; `--authors N`: the N with the most quotes only). Each quote becomes the row
{"prompt": "<quote>\\n-- ", "completion": "<author>\\n", "source": "<author>"}; 2 quotes of
each author go to OUT/targets.jsonl, the rest to OUT/train.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

import numpy as np

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fortunes.tar.gz"
MAX_QUOTE_BYTES, MIN_QUOTES, MAX_QUOTES, HELD_OUT = 280, 6, 20, 2


def author_of(line: str) -> str | None:
    match = re.match(r"^\s*--\s*(.+?)\s*$", line)
    if not match:
        return None
    name = re.split(r",|\(| in ", match.group(1))[0].strip().strip('"').strip()
    return " ".join(name.split()) or None


def quotes(archive: Path) -> list[tuple[str, str, str]]:
    """(author, quote, fortune file) of every attributed fortune."""
    found = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile() or member.name.endswith(".dat"):
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            for entry in text.split("\n%\n"):
                lines = entry.strip("\n").split("\n")
                author = author_of(lines[-1]) if len(lines) > 1 else None
                quote = "\n".join(lines[:-1]).strip()
                if author and quote and len(quote.encode("utf-8")) <= MAX_QUOTE_BYTES:
                    found.append((author, quote, Path(member.name).name))
    return found


def make_data(archive: Path, work: Path, authors: int | None) -> None:
    """train.jsonl and targets.jsonl: prompt/completion pairs, split by quote within each author."""
    rng = np.random.default_rng(0)
    by_author: dict[str, list] = {}
    for author, quote, source in quotes(archive):
        if quote not in {q for q, _ in by_author.get(author, [])}:
            by_author.setdefault(author, []).append((quote, source))
    kept = sorted(a for a, q in by_author.items() if len(q) >= MIN_QUOTES)
    if authors:
        kept = sorted(kept, key=lambda a: -len(by_author[a]))[:authors]
    train, targets = [], []
    for author in kept:
        chosen = [by_author[author][i] for i in rng.permutation(len(by_author[author]))[:MAX_QUOTES]]
        rows = [{"prompt": f"{quote}\n-- ", "completion": f"{author}\n", "source": author} for quote, _ in chosen]
        targets += rows[:HELD_OUT]
        train += rows[HELD_OUT:]
    for name, rows in (("train", train), ("targets", targets)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(kept)} authors, {len(train)} train quotes, {len(targets)} targets", flush=True)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--authors", type=int, default=None)
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    args = parser.parse_args()
    if not args.archive.is_file():
        raise SystemExit(f"error: no fortunes archive at {args.archive}; pass --archive PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    make_data(args.archive, args.out, args.authors)


if __name__ == "__main__":
    main()
