"""Write-ahead order, as a database tests it: an instrumented file system records every write and
every fsync, and the order they come in is checked."""

from __future__ import annotations

import numpy as np
from trakwomp.store import Store, durable


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
