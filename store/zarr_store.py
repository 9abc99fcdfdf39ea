"""A trakwomp store is one Zarr v3 group (see docs/store.md).

- The manifest lives in the root group's attributes under "trakwomp": the format version and
  what the store is bound to (dataset fingerprint, model spec, training recipes, ...). A
  section is written once; a later command with other values is refused, never mixed in.
- Data are Zarr arrays, readable by any Zarr v3 reader.
- A unit of work is published by a done marker: the group `done/<stage>/<unit>`, whose
  metadata (one `zarr.json` holding the unit's summary as attributes) is written last, in a
  single write. A marker that is absent or unreadable (a torn write) means "not done": the
  unit's arrays may be partial and the next run rewrites them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import zarr
import zarr.codecs
from zarr.errors import BaseZarrError, ContainsArrayError, ContainsGroupError
from trakwomp.store import paths
from trakwomp.store.durable import DurableStore
from trakwomp.store.errors import StoreError, StoreWriteError
from trakwomp.store.lease import ObjectStoreLease
from trakwomp.store.records import Manifest, ManifestError, read_manifest, record_asked
from zarr.core.sync import collect_aiterator, sync
from zarr.storage import FsspecStore, LocalStore

# 2: every chunk carries a CRC-32C checksum. Version 1 stores still open; their chunks written
# before have none, so damage that still decodes goes unseen there (docs/store.md).
FORMAT_VERSION = 2
MANIFEST_KEY = "trakwomp"
Node = TypeVar("Node", zarr.Array, zarr.Group)
T = TypeVar("T")
# Projected gradients are random-like floats: bit-shuffled lz4 saves about as much space as zstd
# (12% of float32) and encodes 6x and decodes 2.5x faster (bench/throughput, docs/performance.md).
COMPRESSOR = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
# The last codec on write, the first on read: a chunk whose bytes changed fails its checksum
# before it is decompressed, so damage is never read as data.
CHECKSUM = zarr.codecs.Crc32cCodec()
CODECS = (COMPRESSOR, CHECKSUM)


# Every path inside the store is made of these names: none can be "..", absolute, or empty.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Reading or decoding a damaged chunk or metadata document raises one of these inside zarr.
_DAMAGE = (ValueError, RuntimeError, TypeError, KeyError, OSError)


_UNSET = object()


def _describe_difference(name: str, stored: Any, given: Any) -> str:
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in sorted(set(stored) | set(given)):
            if stored.get(key, _UNSET) != given.get(key, _UNSET):
                return _describe_difference(f"{name}.{key}", stored.get(key, _UNSET), given.get(key, _UNSET))
    return f"{name} is {_short(stored)} in the store but {_short(given)} here"


def _short(value: Any) -> str:
    if value is _UNSET:
        return "not set"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Store:
    """A trakwomp store at a local path."""

    def __init__(self, group: zarr.Group, location: str, durable: DurableStore):
        self._group = group
        self.location = location
        self._durable = durable
        self._manifest: Manifest | None = None

    @classmethod
    def open(cls, location: str | Path, create: bool = False) -> "Store":
        """Open the store at `location`, a local path or an fsspec URL (s3://bucket/path, ...;
        credentials and endpoints from the usual environment, e.g. AWS_ENDPOINT_URL); with
        `create`, make it if it does not exist yet."""
        location = str(location)
        durable, exists, empty = _backend(location)
        if not exists:
            if not create:
                raise StoreError(f"no trakwomp store at {location!r}")
            if not empty:
                raise StoreError(f"{location!r} is a non-empty folder that is not a trakwomp store; choose a new path")
        try:
            # A new store's group and manifest are one write: a kill leaves a store or no store.
            group = zarr.open_group(store=durable, mode="a" if create else "r+", zarr_format=3,
                                    attributes={MANIFEST_KEY: {"format_version": FORMAT_VERSION}})
        except (OSError, ValueError, BaseZarrError) as e:
            raise StoreError(f"cannot open store {location!r}: {e}") from None
        except RecursionError:
            raise StoreError(f"cannot open store {location!r}: its metadata is JSON nested too deep to read") from None
        store = cls(group, location, durable)
        store.check_manifest(exists)
        return store

    def check_manifest(self, exists: bool = True) -> None:
        """Read the manifest as records (store/records.py); refuse one that is not a trakwomp
        store's, is newer than this version reads, or does not fit its records, in one line
        naming the field."""
        manifest = json.loads(json.dumps(self._group.attrs.get(MANIFEST_KEY, {})))
        if exists and not manifest:
            raise StoreError(f"{self.location!r} is a Zarr group but not a trakwomp store")
        self._manifest = self._read(manifest)
        if self._manifest.format_version > FORMAT_VERSION:
            raise StoreError(
                f"store {self.location!r} has format version {self._manifest.format_version}, newer than this "
                f"trakwomp reads ({FORMAT_VERSION}); upgrade trakwomp"
            )

    def _read(self, manifest: Any) -> Manifest:
        try:
            return read_manifest(manifest, FORMAT_VERSION)
        except ManifestError as e:
            raise self.damaged(str(e)) from None

    @classmethod
    def open_existing(cls, location: str | Path) -> "Store | None":
        """The store at `location`, or None if there is none yet (nothing there, or an empty folder)."""
        _, exists, empty = _backend(str(location))
        if not exists and not empty:
            raise StoreError(f"{str(location)!r} is a non-empty folder that is not a trakwomp store")
        return cls.open(location) if exists else None

    @property
    def manifest(self) -> Manifest:
        """The manifest as this handle last read it (at open, and after each of its updates)."""
        assert self._manifest is not None
        return self._manifest

    @contextlib.contextmanager
    def _manifest_lock(self):
        """An exclusive lock on the manifest, across processes; yields a `check()` to call just
        before writing. On a local store an flock on the store's folder, whose inode, unlike that
        of zarr.json (replaced on every write), stays the same, held until the process lets go or
        dies; on an object store a lease (store/lease.py) whose check refuses a holder that lost it."""
        if self._durable.local_root is None:
            inner = self._durable.inner
            assert isinstance(inner, FsspecStore)  # a store that is not local is an object store
            with ObjectStoreLease(inner.fs, inner.path, self.location) as lease:
                yield lease.check
            return
        folder = os.open(self._durable.local_root, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield lambda: None
        finally:
            os.close(folder)

    def update(self, change: Callable[[dict], T]) -> T:
        """Apply `change` to the manifest as it is on disk now, under the manifest lock, and write
        it back if it changed; returns what `change` returns. Concurrent processes each see the
        others' updates: none is lost."""
        with self._manifest_lock() as still_held:
            self._group = zarr.open_group(store=self._durable, mode="r+", zarr_format=3)
            self.check_manifest()
            before = self.manifest.json
            manifest = json.loads(json.dumps(before))
            result = change(manifest)
            if manifest != before:
                manifest = json.loads(json.dumps(manifest))
                records = self._read(manifest)  # a change that would not read back is never written
                still_held()
                self._durable.sync()  # data written before are durable before the manifest names them
                self._group.attrs[MANIFEST_KEY] = manifest
                self._durable.sync()
                self._manifest = records
            return result

    def bind(self, section: str, value: Any, hint: str = "") -> None:
        """Record `value` as the store's `section`, or check it equals what is recorded.

        The value must be JSON data; `hint` says what to do about a mismatch."""
        value = json.loads(json.dumps(value))

        def check_or_record(manifest: dict) -> None:
            self._check_bound(manifest, section, value, hint)
            manifest.setdefault(section, value)

        self.update(check_or_record)

    def check_bound(self, section: str, value: Any, hint: str = "") -> None:
        """Refuse `value` if the store records another `section` (what `bind` would refuse); writes nothing."""
        self._check_bound(self.manifest.json, section, json.loads(json.dumps(value)), hint)

    def _check_bound(self, manifest: dict, section: str, value: Any, hint: str) -> None:
        if section in manifest and manifest[section] != value:
            message = f"store {self.location!r} does not match: " + _describe_difference(section, manifest[section], value)
            raise StoreError(message + (f"; {hint}" if hint else ""))

    def set_section(self, section: str, value: Any) -> None:
        """Replace the manifest section `section` (for a record of the latest inputs, such as a path)."""
        value = json.loads(json.dumps(value))
        self.update(lambda manifest: manifest.__setitem__(section, value))

    def set_entry(self, section: str, key: str, value: Any) -> None:
        """Set `key` of the dict section `section` (created if absent) to `value`."""
        value = json.loads(json.dumps(value))
        self.update(lambda manifest: manifest.setdefault(section, {}).__setitem__(key, value))

    def ask(self, work: str, amount: int | list[int]) -> None:
        """Record in the manifest section "asked" that `work` was asked for: a number of units
        (the largest asked is kept) or a list of ids (their union is kept). `status` compares it
        with what is done."""
        self.update(record_asked(work, amount))

    def mark_done(self, stage: str, unit: str, info: dict | None = None) -> None:
        """Publish `unit` of `stage` as finished: call only after all its data are written.
        The data are made durable first, then the marker."""
        self._durable.sync()
        self.write_record(paths.done(stage, unit), {"unit": unit, **(info or {})})

    def write_record(self, path: str, attributes: dict) -> None:
        """Write `attributes` (JSON data) as the group `path`'s metadata, in a single write, and
        make it durable."""
        attributes = json.loads(json.dumps(attributes))
        path = self._checked(path)
        self._durable.refuse_links(path)  # before zarr starts the record's and its parents' writes at once
        # Parents first, one by one: zarr writes a new group's parents and the group at once, so a kill
        # among those writes could leave a record (a done marker) published without its parent group.
        parents = path.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            with contextlib.suppress(ContainsGroupError):  # made meanwhile by another process
                self._group.require_group("/".join(parents[:depth]))
        try:
            self._group.create_group(path, attributes=attributes, overwrite=True)
        except (FileNotFoundError, StoreWriteError) as e:  # ENOENT: another process replaced the same
            # record meanwhile, and its removal of the folder reached this write
            if e.errno != errno.ENOENT:
                raise
            if self.read_record(path) != attributes:
                self._group.create_group(path, attributes=attributes, overwrite=True)
        self._durable.sync()

    def read_record(self, path: str) -> dict | None:
        """The attributes of the group `path`, or None if there is none or it does not read."""
        try:
            return self._group[self._checked(path)].attrs.asdict()
        except (KeyError, ValueError, RecursionError, BaseZarrError):
            return None

    def done_info(self, stage: str, unit: str) -> dict | None:
        """The info a finished unit was published with, or None if the unit is not finished."""
        attributes = self.read_record(paths.done(stage, unit))
        return attributes if attributes is not None and attributes.get("unit") == unit else None

    def write_array(self, path: str, values: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
        """Write `values` as the array at `path`, over whatever an unfinished run left there.

        The array is created only if absent, so processes writing the same values at once (two
        runs of one shard) never delete each other's chunks."""
        values = np.asarray(values)
        array = self._require(path, values.shape, values.dtype, chunks or (values.shape or "auto"),
                              CODECS if values.ndim else (CHECKSUM,))
        array[...] = values

    def require_array(self, path: str, shape: tuple[int, ...], dtype: str, chunks: tuple[int, ...]) -> "StoredArray":
        """The array at `path`, created if absent; several processes may call this at once."""
        return self._require(path, tuple(shape), np.dtype(dtype), tuple(chunks), CODECS)

    def _require(self, path: str, shape: tuple[int, ...], dtype: np.dtype, chunks, compressors) -> "StoredArray":
        path = self._checked(path)
        # A link is refused before zarr starts the writes of the array's metadata and its parents'
        # at once: refused inside one of them, the others would go on after the error is reported.
        self._durable.refuse_links(path)
        try:
            array = self._group.create_array(path, shape=shape, dtype=dtype, chunks=chunks,
                                             compressors=compressors, overwrite=False)
        except ContainsArrayError:
            array = self._node(path, zarr.Array)
            # zarr writes an array's metadata and its parents' at once: a run killed then may
            # have left the array without a parent group, which hides it from readers that walk.
            parents = path.split("/")[:-1]
            for depth in range(1, len(parents) + 1):
                with contextlib.suppress(ContainsGroupError):  # made meanwhile, by the process that made the array
                    self._group.require_group("/".join(parents[:depth]))
        if array.shape != shape or array.dtype != dtype or (chunks != "auto" and array.chunks != chunks):
            raise StoreError(
                f"store {self.location!r}: array {path!r} is {array.dtype} {array.shape} in chunks {array.chunks}, "
                f"expected {dtype} {shape}" + (f" in chunks {chunks}" if chunks != "auto" else "")
            )
        return StoredArray(array, path, self)

    def done_units(self, stage: str, prefix: str = "") -> list[str]:
        """Names of the finished units under `done/<stage>/<prefix>`, sorted."""
        names = self.children(paths.done(stage, prefix))
        return [n for n in names if self.done_info(stage, f"{prefix}/{n}" if prefix else n) is not None]

    def children(self, path: str) -> list[str]:
        """Names of the nodes under `path`, sorted. Listed from the store, not from the group's
        metadata: a kill can leave a parent group without its zarr.json while nodes below it
        are whole."""
        names = collect_aiterator(self._durable.list_dir(self._checked(path)))
        return sorted(n for n in names if _NAME.fullmatch(n) and n != "zarr.json")

    def array(self, path: str) -> "StoredArray":
        """The array at `path`, for reading slices of it."""
        path = self._checked(path)
        return StoredArray(self._node(path, zarr.Array), path, self)

    def read_array(self, path: str) -> np.ndarray:
        return np.asarray(self.array(path)[...])

    def write_arrays(self, path: str, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            self.write_array(f"{path}/{name}", values)

    def read_arrays(self, path: str) -> dict[str, np.ndarray]:
        path = self._checked(path)
        group = self._node(path, zarr.Group)
        return {name: np.asarray(StoredArray(array, f"{path}/{name}", self)[...]) for name, array in group.arrays()}

    def _checked(self, path: str) -> str:
        """`path`, refused unless every part of it is a plain name: no path leaves the store."""
        if not all(_NAME.fullmatch(part) for part in path.split("/")):
            raise StoreError(f"store {self.location!r}: refusing the path {path!r}, which is not made of plain names")
        return path

    def _node(self, path: str, kind: type[Node]) -> Node:
        """The node at `path`, refused unless it is a `kind` (zarr.Array or zarr.Group)."""
        name, a_name = ("array", "an array") if kind is zarr.Array else ("group", "a group")
        try:
            node = self._group[path]
        except KeyError:
            raise StoreError(f"store {self.location!r} has no {name} {path!r}") from None
        except (*_DAMAGE, BaseZarrError) as e:
            raise self.damaged(f"the metadata of {path!r} does not read ({e})") from None
        if not isinstance(node, kind):
            raise StoreError(f"store {self.location!r}: {path!r} is not {a_name}")
        return node

    def size_bytes(self) -> int:
        """The bytes of every key in the store."""
        async def total() -> int:
            return sum([await self._durable.getsize(key) async for key in self._durable.list()])

        return sync(total())

    def chunks_of(self, path: str) -> tuple[int, ...] | None:
        """The chunk shape of the array at `path`, or None if there is none yet."""
        try:
            return self._node(self._checked(path), zarr.Array).chunks
        except StoreError:
            return None

    def temporaries(self) -> list[str]:
        """Paths of the temporary files (`*.partial`) in the store: writes in flight, or left by
        writes that a kill interrupted. Object stores write whole objects and have none."""
        root = self._durable.local_root
        if root is None or not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial"))

    def remove_stale_temporaries(self, folders: list[str]) -> int:
        """Remove the temporary files that no write has touched for STALE_TEMPORARY_SECONDS from
        `folders` and from the folders above them (not their other subfolders), where the
        metadata of parent groups and of the manifest are written; returns how many.

        A write in flight keeps its temporary file fresh until it renames it, so only leftovers
        of killed writes are this old; removing them never breaks another process's write."""
        root = self._durable.local_root
        if root is None:
            return 0
        found = set(root.glob("*.partial"))
        for folder in (f.rstrip("/") for f in folders):
            parts = self._checked(folder).split("/")
            for depth in range(1, len(parts)):
                found.update((root / "/".join(parts[:depth])).glob("*.partial"))
            found.update((root / folder).rglob("*.partial"))
        removed = 0
        for path in found:
            self._durable.refuse_links(str(path.relative_to(root)))
            try:
                if time.time() - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # renamed or removed by its writer or another cleaner meanwhile
                continue
            except OSError as e:
                raise StoreError(f"cannot write to store {self.location!r}: {e.strerror or e}") from None
        return removed

    def remove(self, path: str) -> None:
        """Delete the folder `path` and everything under it (nothing through a link: `refuse_links`)."""
        try:
            sync(self._durable.delete_dir(self._checked(path)))
        except OSError as e:
            raise StoreError(f"cannot write to store {self.location!r}: {e.strerror or e}") from None

    def has_key(self, key: str) -> bool:
        return sync(self._durable.exists(key))

    def damaged(self, what: str) -> StoreError:
        return StoreError(f"store {self.location!r} is damaged: {what}; restore it from a copy, or make a new store")


class StoredArray:
    """An array of a store, sliced like a zarr array.

    A read that touches a missing chunk, or one that does not decode, raises StoreError naming
    the array. Every chunk is written, even one equal to the fill value, so a chunk missing
    from what a reader asks for (readers ask only for published units) means the store was
    damaged, and zeros are never read in its place."""

    def __init__(self, array: zarr.Array, path: str, store: Store):
        self._array = array.with_config({"write_empty_chunks": True})
        self.path, self._store = path, store

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._array.chunks

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    def __getitem__(self, selection):
        for coords in itertools.product(*_chunk_ranges(selection, self.shape, self.chunks)):
            key = f"{self.path}/{self._array.metadata.encode_chunk_key(coords)}"
            if not self._store.has_key(key):
                raise self._store.damaged(f"chunk {key!r} is missing")
        try:
            return self._array[selection]
        except _DAMAGE as e:
            if "checksum" in str(e):
                raise self._store.damaged(f"a chunk of {self.path!r} fails its CRC-32C checksum") from None
            raise self._store.damaged(f"a chunk of {self.path!r} does not decode ({e})") from None

    def __setitem__(self, selection, values) -> None:
        self._array[selection] = values


def _chunk_ranges(selection, shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[range]:
    """Per dimension, the chunk indices a basic selection (ints, slices, ...) touches."""
    parts = list(selection) if isinstance(selection, tuple) else [selection]
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        parts[at:at + 1] = [slice(None)] * (len(shape) - len(parts) + 1)
    parts += [slice(None)] * (len(shape) - len(parts))
    ranges = []
    for part, size, chunk in zip(parts, shape, chunks, strict=True):
        if isinstance(part, slice):
            positions = range(*part.indices(size))
            ranges.append(range(min(positions) // chunk, max(positions) // chunk + 1) if positions else range(0))
        else:
            index = int(part) % size
            ranges.append(range(index // chunk, index // chunk + 1))
    return ranges


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
STALE_TEMPORARY_SECONDS = 60.0


def _backend(location: str) -> tuple[DurableStore, bool, bool]:
    """(the zarr store at `location`, whether it holds a store, whether it is empty), checked
    before anything is created: a local folder is made only by the first write."""
    if URL.match(location) and not location.startswith("file://"):
        try:
            inner = FsspecStore.from_url(location)
            exists = sync(inner.exists("zarr.json"))
            empty = exists is False and not collect_aiterator(inner.list_dir(""))
        except (ImportError, ValueError, OSError) as e:
            raise StoreError(f"cannot open store {location!r}: {e}") from None
        return DurableStore(inner), exists, empty
    path = Path(location.removeprefix("file://"))
    if path.exists() and not path.is_dir():
        raise StoreError(f"{location!r} is a file, not a store folder")
    exists = (path / "zarr.json").is_file()
    # (temporary files of a write that a kill interrupted do not count)
    empty = not path.is_dir() or all(p.name.endswith(".partial") for p in path.iterdir())
    return DurableStore(LocalStore(path.absolute())), exists, empty
