"""Arrays a user gives in files: .npy arrays (never unpickled) and index files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from trakwomp.errors import UserError


def read_npy(path: str | Path, what: str, mmap_mode: Literal["r", "r+", "c"] | None = None) -> np.ndarray:
    """The array in an .npy file (never unpickled); a missing or damaged file is a UserError."""
    refuse_special_file(path, what)
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise UserError(f"{what} {str(path)!r} is not an .npy file")
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, MemoryError) as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {e}") from None


def refuse_special_file(path: str | Path, what: str) -> None:
    """Refuse a path that exists but is not a regular file (a FIFO or a device would block or
    never end a read)."""
    if Path(path).exists() and not Path(path).is_file():
        raise UserError(f"{what} {str(path)!r} is not a regular file")


def load_indices(path: str | Path, what: str = "indices file") -> np.ndarray:
    """A 1-d integer (or, for masks, boolean) array from an .npy file."""
    values = read_npy(path, what)
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.dtype == bool):
        raise UserError(f"{what} {str(path)!r} must hold a 1-d integer array, got {values.dtype} {values.shape}")
    return values
