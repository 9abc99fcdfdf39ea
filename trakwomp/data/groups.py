"""Groups of train examples (data sources): one label per train example, from the `source` of
each text (`jsonl:` data, fortunes-mini) or from a file (an .npy of labels, or a CSV of
index,group), identified by a SHA-256 over their names and every example's group.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import scipy.stats

from trakwomp.data.base import Dataset
from trakwomp.data.files import read_npy, refuse_special_file
from trakwomp.errors import UserError

GROUPS_HELP = "an .npy of one label per train example, or a CSV of index,group rows"


@dataclass(frozen=True, eq=False)
class Groups:
    """`names` (sorted, distinct) and `codes[i]`, the position in `names` of train example i's group."""

    names: tuple[str, ...]
    codes: np.ndarray
    origin: str

    @classmethod
    def from_labels(cls, labels, origin: str) -> "Groups":
        """Groups from one label per train example (any values; compared as text)."""
        text = np.asarray([str(label) for label in labels])
        names, codes = np.unique(text, return_inverse=True)
        return cls(tuple(str(name) for name in names), codes.astype(np.int32), origin)

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256("\0".join(self.names).encode("utf-8") + b"\1")
        digest.update(self.codes.astype("<i4").tobytes())
        return digest.hexdigest()

    def record(self) -> dict:
        """What the store's manifest records; the names and codes are arrays beside it (a million
        groups would make the manifest, rewritten on every update, tens of megabytes)."""
        return {"num_groups": len(self.names), "num_examples": len(self.codes), "sha256": self.sha256,
                "origin": self.origin}

    def encoded_names(self) -> tuple[np.ndarray, np.ndarray]:
        """(the names' UTF-8 bytes one after another, where each name ends): names may hold any
        character, NUL included."""
        encoded = [name.encode("utf-8") for name in self.names]
        return (np.frombuffer(b"".join(encoded), dtype=np.uint8),
                np.cumsum([len(name) for name in encoded], dtype=np.int64))

    @staticmethod
    def decoded_names(joined: np.ndarray, ends: np.ndarray) -> tuple[str, ...]:
        data = joined.tobytes()
        return tuple(data[start:end].decode("utf-8") for start, end in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True))

    def sizes(self) -> np.ndarray:
        """The number of train examples in each group, in the order of `names`."""
        return np.bincount(self.codes, minlength=len(self.names))

    def positions(self, names: list[str]) -> np.ndarray:
        """The positions of the groups `names` in `names` (an unknown name is refused)."""
        return group_positions(self.names, names)

    def members(self, positions: np.ndarray) -> np.ndarray:
        """A boolean mask over the train set: the members of the groups at `positions`."""
        return np.isin(self.codes, positions)

    def membership(self) -> scipy.sparse.csr_matrix:
        """The (n_train, n_groups) 0/1 matrix with a 1 at (i, group of i)."""
        n = len(self.codes)
        return scipy.sparse.csr_matrix((np.ones(n, np.float64), (np.arange(n), self.codes)),
                                       shape=(n, len(self.names)))


def group_positions(all_names: tuple[str, ...] | list[str], names: list[str]) -> np.ndarray:
    """The positions of `names` in `all_names`; an unknown name is refused."""
    where = {name: g for g, name in enumerate(all_names)}
    unknown = [name for name in names if name not in where]
    if unknown:
        listed = ", ".join(all_names[:8]) + (", ..." if len(all_names) > 8 else "")
        raise UserError(f"unknown group {unknown[0]!r}: the {len(all_names)} groups are {listed}")
    return np.array([where[name] for name in names], dtype=np.int64)


def read_groups_file(path: str | Path, num_examples: int) -> Groups:
    """Groups from an .npy of one label per train example, or a CSV of index,group rows (a header
    row is allowed); a wrong length, a missing or repeated example, or an empty label is refused."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        labels = read_npy(path, "groups file")
        if labels.ndim != 1 or labels.dtype.kind not in "iuUSb":
            raise UserError(f"groups file {str(path)!r} must hold a 1-d array of integer or text labels, "
                            f"got {labels.dtype} {labels.shape}")
        if len(labels) != num_examples:
            raise UserError(f"groups file {str(path)!r} has {len(labels)} labels for the {num_examples} train examples")
        labels = [decoded(label, path, i) for i, label in enumerate(labels.tolist())]
        empty = [i for i, label in enumerate(labels) if str(label).strip() == ""]
    elif path.suffix.lower() == ".csv":
        labels, empty = read_groups_csv(path, num_examples)
    else:
        raise UserError(f"groups file {str(path)!r} must be {GROUPS_HELP} (.npy or .csv)")
    if empty:
        raise UserError(f"groups file {str(path)!r} has no group for {len(empty)} of the {num_examples} train "
                        f"examples (first: {empty[0]})")
    return Groups.from_labels(labels, str(path))


def is_whole_number(text: str) -> bool:
    """Digits 0-9 with an optional minus sign (not '²', which str.isdigit takes and int refuses)."""
    return re.fullmatch(r"-?[0-9]+", text.strip()) is not None


def decoded(label, path: Path, i: int):
    """A label of a groups .npy as text: byte strings must be UTF-8."""
    if not isinstance(label, bytes):
        return label
    try:
        return label.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"groups file {str(path)!r}: label {i} ({label[:20]!r}) is not UTF-8 text") from None


def read_groups_csv(path: Path, num_examples: int) -> tuple[list[str | None], list[int]]:
    """(label per train example, the examples without one) from a CSV of index,group rows."""
    labels: list[str | None] = [None] * num_examples
    refuse_special_file(path, "groups file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if line == 1 and row and not is_whole_number(row[0]):
                    continue  # a header
                if len(row) != 2 or not is_whole_number(row[0]):
                    raise UserError(f"groups file {str(path)!r} line {line}: expected index,group, got {','.join(row)!r}")
                index = int(row[0])
                if not 0 <= index < num_examples:
                    raise UserError(f"groups file {str(path)!r} line {line}: index {index} is outside the train set "
                                    f"(0 to {num_examples - 1})")
                if labels[index] is not None:
                    raise UserError(f"groups file {str(path)!r} line {line}: train example {index} is given twice")
                labels[index] = row[1].strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read groups file {str(path)!r}: {e}") from None
    return labels, [i for i, label in enumerate(labels) if not label]


def sources_of(data: Dataset) -> Groups:
    """Groups from the sources of a text dataset; refused if some text has none."""
    labels = [data.source(i) for i in range(len(data))]
    if all(label is None for label in labels):
        raise UserError(f"{data.spec} has no sources; pass `groups` FILE ({GROUPS_HELP})")
    missing = [i for i, label in enumerate(labels) if not label]
    if missing:
        raise UserError(f"{len(missing)} of the {len(data)} texts of {data.spec} have no source (first: {missing[0]}); "
                        f"pass `groups` FILE ({GROUPS_HELP})")
    return Groups.from_labels(labels, f"sources of {data.spec}")


def parse_group_names(values: list[str]) -> list[str]:
    """Group names from repeated options, each a name or a comma-separated list of names."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if len(set(names)) != len(names):
        raise UserError(f"a group is named twice in {', '.join(names)}")
    return names
