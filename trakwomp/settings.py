"""Settings objects: dataclasses whose fields carry their command-line help, so that an option
is declared once. The CLI builds its options from these fields (`trakwomp.cli.common.setting`)
and passes the same objects to the library that a Python user passes."""

from __future__ import annotations

from dataclasses import field

from trakwomp.errors import UserError

SEED_LIMIT = 1 << 63  # seeds are seeds of torch's and numpy's generators, which take 0 .. 2^63 - 1
MAX_THREADS = 1024


def option(default, help: str):
    """A settings field with its default and its command-line help."""
    return field(default=default, metadata={"help": help})


def check_seed(flag: str, seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{flag} must lie between 0 and 2^63 - 1, got {seed}")


def check_threads(threads: int) -> None:
    """A thread count OpenMP can start (it aborts the process on a huge one); not bound by this
    machine's CPUs, since a store's recipe records the count it was made with elsewhere."""
    if not 1 <= threads <= MAX_THREADS:
        raise UserError(f"`threads` must lie between 1 and {MAX_THREADS}, got {threads}")
