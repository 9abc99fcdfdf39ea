"""The store's write layer: durable publication, and an injectable fault for crash tests.

zarr's LocalStore writes every key atomically (a temporary file `<name>.<hex>.partial` renamed
over the key), so a reader sees a key's old bytes or its new bytes, never a mix. `DurableStore`
also remembers the files it wrote; `sync()` fsyncs them and their folders. `Store.mark_done`
syncs a unit's data before it writes the unit's done marker, and the marker before it returns,
so a published unit survives a crash of the process or of the machine.

TRAKWOMP_FAULT=K makes the process SIGKILL itself just before its K-th write (counted from 1
over the process's life); TRAKWOMP_FAULT=K:torn kills it in the middle of that write, after
half of the bytes went to the temporary file. Tests use it to replay a crash at a chosen point.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from zarr.core.buffer import Buffer
from zarr.storage import LocalStore, WrapperStore

FAULT_VARIABLE = "TRAKWOMP_FAULT"


class FaultPlan:
    """Where, if anywhere, to kill this process: at write `at`, torn or not."""

    writes = 0

    def __init__(self, spec: str | None):
        self.at, self.torn = None, False
        if spec:
            number, _, mode = spec.partition(":")
            self.at, self.torn = int(number), mode == "torn"

    def before_write(self, path: Path, value: Buffer) -> None:
        FaultPlan.writes += 1
        if FaultPlan.writes != self.at:
            return
        if self.torn:
            data = value.to_bytes()
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".fault.partial"), "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # replaced or removed by another process meanwhile
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableStore(WrapperStore[LocalStore]):
    """A LocalStore that records the files it writes, for `sync`, and obeys TRAKWOMP_FAULT."""

    def __init__(self, store: LocalStore):
        super().__init__(store)
        self._written: set[Path] = set()
        self._fault = FaultPlan(os.environ.get(FAULT_VARIABLE))

    def _with_store(self, store: LocalStore) -> "DurableStore":
        return type(self)(store)

    async def set(self, key: str, value: Buffer) -> None:
        await self._write(key, value, self._store.set)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await self._write(key, value, self._store.set_if_not_exists)

    async def _write(self, key: str, value: Buffer, write) -> None:
        path = Path(self._store.root) / key
        self._fault.before_write(path, value)
        await write(key, value)
        self._written.add(path)

    def sync(self) -> None:
        """fsync every file written since the last sync, then the folders that hold them."""
        written, self._written = self._written, set()
        for path in written:
            fsync_path(path)
        for folder in {p.parent for p in written}:
            fsync_path(folder)
