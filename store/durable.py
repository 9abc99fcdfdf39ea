"""The store's write layer: durable publication, and an injectable fault for crash tests.

zarr's LocalStore writes every key atomically (a temporary file `<name>.<hex>.partial` renamed
over the key), so a reader sees a key's old bytes or its new bytes, never a mix. `DurableStore`
also remembers the files it wrote; `sync()` fsyncs them and their folders. `Store.mark_done`
syncs a unit's data before it writes the unit's done marker, and the marker before it returns,
so a published unit survives a crash of the process or of the machine.

A write that the file system refuses (a full disk, a read-only mount) raises StoreError, which
names the store and the reason; zarr has removed the write's temporary file by then, and no
done marker follows, so the unit stays unfinished.

No write and no delete goes through a symbolic link inside the store (`refuse_links`): a link
there would take it out of the store.

TRAKWOMP_FAULT injects a fault at the K-th write (counted from 1 over the process's life), so
that tests can replay one at a chosen point:
- K: SIGKILL just before the write; K:torn: SIGKILL halfway through it (half of its bytes in a
  temporary file);
- K:enospc: this and every later write fails with ENOSPC (a disk that fills up and stays full);
  K:erofs: this and every later write fails with EROFS (a file system that turns read-only).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from trakwomp.store.errors import StoreError, StoreWriteError
from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import LocalStore, WrapperStore

FAULT_VARIABLE = "TRAKWOMP_FAULT"
FAULT_MODES = ("kill", "torn", "enospc", "erofs")


class FaultPlan:
    """Which fault, if any, to inject at write `at` (see the module docstring)."""

    writes = 0

    def __init__(self, spec: str | None):
        self.at, self.mode = None, "kill"
        if spec:
            number, _, mode = spec.partition(":")
            if not number.isdigit() or int(number) < 1 or (mode or "kill") not in FAULT_MODES:
                raise StoreError(f"malformed {FAULT_VARIABLE}={spec!r}: expected K or K:MODE, MODE one of "
                                 f"{', '.join(FAULT_MODES[1:])}")
            self.at, self.mode = int(number), mode or "kill"

    def before_write(self, path: Path | None, value: Buffer) -> None:
        """`path`: the key's local file, or None on an object store (where a torn write is a kill)."""
        FaultPlan.writes += 1
        if self.at is None or FaultPlan.writes < self.at:
            return
        if self.mode in ("enospc", "erofs"):
            code = errno.ENOSPC if self.mode == "enospc" else errno.EROFS
            raise OSError(code, os.strerror(code), str(path))
        if FaultPlan.writes > self.at:
            return
        if self.mode == "torn" and path is not None:
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


class DurableStore(WrapperStore[Store]):
    """A LocalStore that records the files it writes, for `sync`, or an object store (whose
    writes are durable when they return); both obey TRAKWOMP_FAULT."""

    def __init__(self, store: Store):
        super().__init__(store)
        self.local_root = Path(store.root) if isinstance(store, LocalStore) else None
        self._written: set[Path] = set()
        self._fault = FaultPlan(os.environ.get(FAULT_VARIABLE))

    def _with_store(self, store: Store) -> "DurableStore":
        return type(self)(store)

    @property
    def inner(self) -> Store:
        return self._store

    async def set(self, key: str, value: Buffer) -> None:
        await self._write(key, value, self._store.set)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        await self._write(key, value, self._store.set_if_not_exists)

    async def delete(self, key: str) -> None:
        self.refuse_links(key)
        await self._store.delete(key)

    async def delete_dir(self, prefix: str) -> None:
        self.refuse_links(prefix)
        await self._store.delete_dir(prefix)

    def refuse_links(self, key: str) -> None:
        """Refuse a write or a delete at `key` if the key, or a folder between it and the store's
        root, is a symbolic link: it would land outside the store, or remove what is not its own."""
        if self.local_root is None:
            return
        path = self.local_root
        for part in key.strip("/").split("/"):
            path = path / part
            if path.is_symlink():
                raise StoreError(f"store {str(self.local_root)!r} holds a symbolic link at "
                                 f"{str(path.relative_to(self.local_root))!r}; a store's files must be its own "
                                 "(replace the link by a copy of what it points to), so nothing writes through it")

    async def _write(self, key: str, value: Buffer, write) -> None:
        path = self.local_root / key if self.local_root else None
        self.refuse_links(key)
        try:
            self._fault.before_write(path, value)
            await write(key, value)
        except OSError as e:
            raise StoreWriteError(f"cannot write to store {self._name()!r}: {e.strerror or e}; "
                                  "finished units are kept, run the command again once it is writable",
                                  e.errno) from None
        if path is not None:
            self._written.add(path)

    def _folders_above(self, path: Path) -> list[Path]:
        """The folders from `path`'s up to the store's root, both included."""
        folders = [path.parent]
        while folders[-1] != self.local_root and self.local_root in folders[-1].parents:
            folders.append(folders[-1].parent)
        return folders

    def _name(self) -> str:
        return str(self.local_root) if self.local_root else str(self._store)

    def sync(self) -> None:
        """fsync every local file written since the last sync, then every folder from theirs up to
        the store's root, deepest first: zarr creates the folders above a chunk as it writes it
        (mkdir with parents), and a folder's entry is durable only once the folder above it is."""
        written, self._written = self._written, set()
        folders = {folder for path in written for folder in self._folders_above(path)}
        try:
            for path in written:
                fsync_path(path)
            for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
                fsync_path(folder)
        except OSError as e:
            raise StoreWriteError(f"cannot write to store {self._name()!r}: {e.strerror or e}", e.errno) from None
