"""Write-ahead order, as a database tests it: an instrumented file system records every write and
every fsync, and the order they come in is checked."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from trakwomp.store import Store, StoreError, durable
from trakwomp.store.errors import StoreWriteError


def record_io(monkeypatch):
    """Every write to the store (its key) and every fsync (its path), in order."""
    events = []
    write = durable.DurableStore._write

    async def recorded_write(self, key, value, inner):
        events.append(("write", key))
        await write(self, key, value, inner)

    def recorded_fsync(path):
        events.append(("fsync", str(path)))

    monkeypatch.setattr(durable.DurableStore, "_write", recorded_write)
    monkeypatch.setattr(durable, "fsync_path", recorded_fsync)
    return events


def test_every_folder_created_above_a_chunk_is_made_durable_up_to_the_root(tmp_path, monkeypatch):
    handle = Store.open(tmp_path / "store", create=True)
    events = record_io(monkeypatch)
    handle.write_array("a/b/c/values", np.arange(6.0))
    handle.mark_done("stage", "000001")
    synced = [path for kind, path in events if kind == "fsync"]
    root = tmp_path / "store"
    for folder in (root / "a" / "b" / "c" / "values", root / "a" / "b" / "c", root / "a" / "b", root / "a", root):
        assert str(folder) in synced, folder
    chunk = next(path for kind, path in events if kind == "fsync" and "/values/c/" in path)
    assert synced.index(chunk) < synced.index(str(root / "a"))  # a file before the folders above it


def test_data_written_before_a_manifest_update_are_durable_before_the_manifest_is_written(tmp_path, monkeypatch):
    handle = Store.open(tmp_path / "store", create=True)
    events = record_io(monkeypatch)
    handle.write_array("data/values", np.arange(4.0))
    handle.set_section("entry", {"names": "data/values"})
    manifest_write = max(i for i, event in enumerate(events) if event == ("write", "zarr.json"))  # the update's
    data_synced = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and "/data/values/c/" in path]
    assert data_synced and data_synced[0] < manifest_write


def racing_marker_writes(monkeypatch, fail_at: str, error: int):
    """Make the first write of a key starting with `fail_at` fail with `error`, as the store reports it."""
    write = durable.DurableStore._write
    failed = []

    async def failing_write(self, key, value, inner):
        if key.startswith(fail_at) and not failed:
            failed.append(key)
            raise StoreWriteError(f"cannot write to store: {os.strerror(error)}", error)
        await write(self, key, value, inner)

    monkeypatch.setattr(durable.DurableStore, "_write", failing_write)
    return failed


def test_a_marker_published_by_another_process_meanwhile_is_not_an_error(tmp_path, monkeypatch):
    """Two processes that did the same unit publish its marker at once: one's overwrite removes the
    folder the other is writing into (ENOENT, which the store reports as a StoreWriteError). Seen in
    CI with two score processes of one shard; the marker is there, so publishing succeeded."""
    ours, theirs = Store.open(tmp_path / "store", create=True), Store.open(tmp_path / "store")
    theirs.mark_done("stage", "000001", {"rows": [0, 4]})  # theirs lands while ours is being written
    raced = racing_marker_writes(monkeypatch, "done/stage/000001", errno.ENOENT)
    ours.mark_done("stage", "000001", {"rows": [0, 4]})
    assert raced and ours.done_info("stage", "000001") == {"unit": "000001", "rows": [0, 4]}


def test_a_full_disk_after_the_marker_is_written_is_still_an_error(tmp_path, monkeypatch):
    """The disk fills up at a write that follows the marker's own (its parent groups): mark_done
    reports it, though the marker is there; only ENOENT is the race above (seen in CI: finalize
    exited 0 on a full disk)."""
    store = Store.open(tmp_path / "store", create=True)
    failed = racing_marker_writes(monkeypatch, "done/zarr.json", errno.ENOSPC)
    with pytest.raises(StoreError, match="No space left on device"):
        store.mark_done("stage", "000001", {"rows": [0, 4]})
    assert failed
