"""Files written out of a store (exports: .npy scores, .csv/.json tables, .html pages, .png
drawings), all by one rule:

- checked before any work: its folder exists, its suffix is one the command writes, it is not
  a folder, and it does not lie inside the store (a path into the store could overwrite the
  manifest or a chunk, and the store would no longer open);
- a path that is a symbolic link writes the file it points to (the link stays), and is checked
  where it points: a link into the store is refused like a path into it;
- written atomically: to a temporary file beside the real path, made durable, then renamed over
  it, so that a kill or a full disk leaves the old file as it was (and no temporary behind).

CSV cells that a spreadsheet would run as a formula (text starting with =, +, -, @, a tab or a
carriage return) are written with a leading apostrophe; numbers, JSON and .npy stay exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from trakwomp.errors import UserError
from trakwomp.store.durable import fsync_path

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def real_path(path: str | Path) -> Path:
    """Where a write to `path` lands: symbolic links followed, the file itself need not exist."""
    return Path(os.path.realpath(path))


def check_output(flag: str, path: str | Path | None, suffixes: tuple[str, ...], store: str | Path | None,
                 what: str = "") -> None:
    """Refuse, before any work, an output file that could not be written or would land in `store`
    (a local store's folder; an fsspec URL has no local files to protect); `what`: what the
    command writes there, for the message."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{what + ': ' if what else ''}give {flag} a {' or '.join(suffixes)} name, not {str(path)!r}")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {str(path)!r}: there is no folder {str(path.parent)!r}")
    real = real_path(path)
    if real.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder; give a file name")
    if store is not None and "://" not in str(store):
        root = real_path(store)
        if real == root or root in real.parents:
            raise UserError(f"{flag} {str(path)!r} lies inside the store {str(store)!r}; write exports elsewhere")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write` on a temporary file beside `path`'s real file, make it durable and rename it
    over that file; any failure (a full disk) leaves the old file and removes the temporary."""
    real = real_path(path)
    partial = real.with_name(f".{real.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, real)
        fsync_path(real.parent)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}; the file is as it was") from None
    finally:
        partial.unlink(missing_ok=True)


def csv_cell(value):
    """A table cell as a spreadsheet should see it: text that would start a formula gets a
    leading apostrophe; every other value as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
