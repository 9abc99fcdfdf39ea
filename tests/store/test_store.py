"""Store-level guarantees: manifest updates from concurrent processes are never lost, the object
store lease is held by one process at a time and never broken under a live holder, checksums
catch damage that still decodes, and leftovers of killed writes are cleaned up."""

import errno
import json
import multiprocessing
import os
import shutil
import threading
import time
import uuid
import warnings

import numpy as np
import pytest
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from trakwomp.store import Store, StoreError
from trakwomp.store import lease as lease_module
from trakwomp.store.lease import ObjectStoreLease

from trakwomp.analysis.status import status


def add_entries(location, worker, count):
    handle = Store.open(location)
    for i in range(count):
        handle.set_entry("entries", f"w{worker}-{i}", {"worker": worker, "i": i})


def test_concurrent_manifest_updates_from_processes_are_all_kept(tmp_path):
    Store.open(tmp_path / "s", create=True)
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=add_entries, args=(str(tmp_path / "s"), w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    assert [p.exitcode for p in workers] == [0] * 4
    scores = Store.open(tmp_path / "s").manifest.json["entries"]
    assert sorted(scores) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))


class ObjectLikeFileSystem(LocalFileSystem):
    """A local folder with an object store's write semantics: a PUT replaces an object whole
    (write, then rename), and mode="create" is atomic (O_EXCL), as S3's conditional PUT is."""

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if mode == "create":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # FileExistsError if present
            os.write(fd, value)
            os.close(fd)
            return
        partial = f"{path}.{uuid.uuid4().hex}"
        with open(partial, "wb") as f:
            f.write(value)
        os.replace(partial, path)


def new_lease(root):
    return ObjectStoreLease(AsyncFileSystemWrapper(ObjectLikeFileSystem()), str(root), str(root))


def generation_path(root, generation):
    return root / "manifest_lease" / f"{generation:012d}" / "zarr.json"


# The lease object of a holder that died holding it: never renewed, never released.
STALE_LEASE = {"zarr_format": 3, "node_type": "group", "attributes": {"token": "dead", "renewals": 0, "released": False}}


def write_stale_lease(root, generation=0):
    generation_path(root, generation).parent.mkdir(parents=True)
    generation_path(root, generation).write_text(json.dumps(STALE_LEASE))


def take_record_release(root, seconds, results):
    """Take the lease, record (generation, time taken, time released), hold it, release it."""
    with new_lease(root) as lease:
        taken = time.time()
        time.sleep(seconds)
        lease.check()
        released = time.time()
    results.put((lease.generation, taken, released))


@pytest.fixture
def short_lease(monkeypatch):
    monkeypatch.setattr(lease_module, "LEASE_SECONDS", 0.6)
    monkeypatch.setattr(lease_module, "WAIT_SECONDS", 20.0)


def run_processes(target, argument_lists):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, results)) for args in argument_lists]
    for p in processes:
        p.start()
    for p in processes:
        p.join(30)
    assert [p.exitcode for p in processes] == [0] * len(processes)
    return sorted(results.get(timeout=5) for _ in processes)


def test_two_processes_racing_to_break_a_stale_lease_take_it_one_after_the_other(tmp_path, short_lease):
    write_stale_lease(tmp_path)
    (first, taken_1, released_1), (second, taken_2, released_2) = run_processes(
        take_record_release, [(tmp_path, 0.3), (tmp_path, 0.3)])
    assert (first, second) == (1, 2)  # exactly one broke generation 0; the other waited for its release
    assert taken_2 >= released_1
    assert not generation_path(tmp_path, 0).exists() and not generation_path(tmp_path, 1).exists()


def test_a_holder_that_outlives_the_lease_period_keeps_it(tmp_path, short_lease):
    """The holder holds for 4 lease periods, renewing; a contender that starts meanwhile waits
    until the holder releases, and the holder's checks pass throughout."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    holder = context.Process(target=take_record_release, args=(tmp_path, 2.4, results))
    holder.start()
    while not generation_path(tmp_path, 0).exists():
        time.sleep(0.01)
    contender = context.Process(target=take_record_release, args=(tmp_path, 0.0, results))
    contender.start()
    for p in (holder, contender):
        p.join(30)
    assert (holder.exitcode, contender.exitcode) == (0, 0)
    (g_holder, _, released), (g_contender, taken, _) = sorted(results.get(timeout=5) for _ in range(2))
    assert (g_holder, g_contender) == (0, 1) and taken >= released


def test_a_paused_holder_loses_its_lease_and_knows_it(tmp_path, short_lease):
    """A holder whose renewals stop (a paused process) has its lease broken after the lease
    period; it then refuses to write instead of writing over its successor."""
    holder = new_lease(tmp_path).__enter__()
    holder._stop.set()  # renewals stop, as in a process that is paused
    successor = new_lease(tmp_path)
    started = time.monotonic()
    successor.acquire()
    assert successor.generation == 1 and time.monotonic() - started >= 0.6
    with pytest.raises(StoreError, match="lost the manifest lease"):
        holder.check()
    successor.check()
    successor.release()


def fresh_store_with_arrays(root):
    handle = Store.open(root, create=True)
    handle.write_array("features/000000/phi", np.arange(4096, dtype=np.float32).reshape(64, 64), chunks=(32, 64))
    handle.write_array("finalize/v/000000/inverse", np.eye(16)[None].repeat(2, axis=0), chunks=(1, 16, 16))
    handle.write_array("scores/k/tau", np.linspace(-1, 1, 600, dtype=np.float32).reshape(20, 30), chunks=(10, 30))
    return handle


@pytest.mark.parametrize("array", ["features/000000/phi", "finalize/v/000000/inverse", "scores/k/tau"])
def test_a_flipped_bit_in_any_chunk_is_reported_as_damage_naming_the_array(tmp_path, array):
    handle = fresh_store_with_arrays(tmp_path / "s")
    chunk = tmp_path / "s" / array / "c" / "0" / "0" if array != "finalize/v/000000/inverse" else \
        tmp_path / "s" / array / "c" / "1" / "0" / "0"
    for position in (0.1, 0.5, 0.9):  # in the compressed payload, wherever it lands
        data = bytearray(chunk.read_bytes())
        original = bytes(data)
        data[int(position * (len(data) - 4))] ^= 0x10
        chunk.write_bytes(bytes(data))
        with pytest.raises(StoreError, match=f"damaged: a chunk of '{array}' fails its CRC-32C checksum"):
            handle.array(array)[...]
        chunk.write_bytes(original)
    handle.array(array)[...]


def test_a_version_1_store_without_checksums_still_opens_and_reads(tmp_path):
    group = zarr.open_group(str(tmp_path / "old"), mode="w", zarr_format=3,
                            attributes={"trakwomp": {"format_version": 1}})
    group.create_array("features/000000/q", data=np.arange(5, dtype=np.float32),
                       compressors=zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"))
    handle = Store.open(tmp_path / "old")
    assert handle.manifest.format_version == 1
    assert handle.read_array("features/000000/q").tolist() == [0, 1, 2, 3, 4]


def walk_warnings(root):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(zarr.open_group(str(root), mode="r").members(max_depth=None))
    return [str(w.message) for w in caught]


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    handle = fresh_store_with_arrays(tmp_path / "s")
    old = time.time() - 120
    stale = [tmp_path / "s" / "features/000000/phi/c/0/0.0123abcd.partial", tmp_path / "s" / "zarr.0456ef.partial",
             tmp_path / "s" / "done/featurize/000000/zarr.fault.partial"]
    fresh = tmp_path / "s" / "features/000000/phi/c/1/0.89ab.partial"  # a write in flight in another process
    elsewhere = tmp_path / "s" / "scores/k/tau/c/0/0.cdef.partial"  # not in the folders being redone
    for path in (*stale, fresh, elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a chunk")
        if path != fresh:
            os.utime(path, (old, old))
    assert any("not recognized" in w for w in walk_warnings(tmp_path / "s"))
    assert len(handle.temporaries()) == 5
    assert handle.remove_stale_temporaries(["features", "done/featurize"]) == 3
    assert sorted(handle.temporaries()) == ["features/000000/phi/c/1/0.89ab.partial", "scores/k/tau/c/0/0.cdef.partial"]
    assert status(tmp_path / "s").temporary_files == 2


def test_no_write_and_no_removal_goes_through_a_link_inside_the_store(tmp_path):
    """A folder of the store that is a symbolic link to one outside: the stale temporary there is
    not removed, and an array is not written there; each is refused in one line."""
    handle = fresh_store_with_arrays(tmp_path / "s")
    outside = tmp_path / "outside"
    shutil.move(tmp_path / "s" / "features", outside)
    (tmp_path / "s" / "features").symlink_to(outside, target_is_directory=True)
    leftover = outside / "000000/phi/c/0/0.0123abcd.partial"
    leftover.write_bytes(b"half a chunk")
    os.utime(leftover, (time.time() - 120, time.time() - 120))
    before = sorted(p.relative_to(outside) for p in outside.rglob("*"))
    with pytest.raises(StoreError, match="holds a symbolic link at 'features'"):
        handle.remove_stale_temporaries(["features"])
    with pytest.raises(StoreError, match="holds a symbolic link at 'features'"):
        handle.write_array("features/000001/q", np.zeros(3, np.float32))
    with pytest.raises(StoreError, match="holds a symbolic link at 'features'"):
        handle.remove("features/000000")
    assert sorted(p.relative_to(outside) for p in outside.rglob("*")) == before


class IgnoresCreateIfAbsent(ObjectLikeFileSystem):
    """An object store that ignores If-None-Match: a "create" overwrites what is there."""

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        super().pipe_file(path, value, mode="overwrite", **kwargs)


def renew(lease):
    """One renewal, as the holder's thread makes it."""
    lease.renewals += 1
    lease.fs.pipe_file(lease._path(lease.generation), lease._content())
    lease.renewed_at = time.monotonic()


def test_a_contender_paused_after_reading_does_not_break_a_holder_that_renewed_meanwhile(tmp_path, short_lease,
                                                                                     monkeypatch):
    """The contender reads the lease twice, then is paused for 1.5 lease periods after its second
    read while the holder renews; the pause must not make that read look stale."""
    holder = new_lease(tmp_path)
    holder.acquire()
    contender = new_lease(tmp_path)
    read = contender.newest
    calls = []

    def paused_after_the_second_read():
        result = read()
        calls.append(result)
        if len(calls) == 2:
            for _ in range(6):  # 1.5 lease periods, the holder renewing every quarter period
                time.sleep(lease_module.LEASE_SECONDS / 4)
                renew(holder)
        if len(calls) == 4:
            holder.release()
        return result

    monkeypatch.setattr(contender, "newest", paused_after_the_second_read)
    monkeypatch.setattr(lease_module.random, "uniform", lambda a, b: 0.0)  # read again at once
    contender.acquire()
    assert len(calls) >= 4  # it waited for the release instead of breaking the renewed lease
    assert contender.generation == 1 and holder.renewals == 6


def test_a_holder_whose_next_generation_was_removed_still_knows_it_lost(tmp_path, short_lease):
    """A paused holder (generation 0) loses to B (generation 1); C then takes generation 2 and
    removes 0 and 1. The holder's check must not pass because generation 1 is gone."""
    holder = new_lease(tmp_path)
    holder.acquire()
    second = new_lease(tmp_path)
    second.acquire()  # breaks generation 0 once it has looked stale for a lease period
    second.release()
    third = new_lease(tmp_path)
    third.acquire()
    assert third.generation == 2 and not generation_path(tmp_path, 1).exists()
    holder.renewed_at = time.monotonic()  # as if its renewals had gone on: only the generations tell
    with pytest.raises(StoreError, match="lost the manifest lease"):
        holder.check()
    third.check()


def test_a_store_that_ignores_create_if_absent_gives_no_two_holders(tmp_path, short_lease):
    """Two processes 'create' generation 0 on a store that overwrites instead: the one whose
    object was overwritten learns it does not hold the lease before it writes."""
    first = ObjectStoreLease(AsyncFileSystemWrapper(IgnoresCreateIfAbsent()), str(tmp_path), str(tmp_path))
    second = ObjectStoreLease(AsyncFileSystemWrapper(IgnoresCreateIfAbsent()), str(tmp_path), str(tmp_path))
    first.acquire()
    assert second._take(0)  # the "conditional" create succeeds although generation 0 exists
    with pytest.raises(StoreError, match="lost the manifest lease"):
        first.check()
    second.check()


class AnswersLikeS3(ObjectLikeFileSystem):
    """Conditional creates answered as s3fs reports S3's replies: a lost race as a 412 without a
    Condition field (OSError EINVAL, not FileExistsError), the first create as a 409
    ConditionalRequestConflict (OSError EBUSY, nothing written), or every create as a 403."""

    def __init__(self, answer, **kwargs):
        super().__init__(**kwargs)
        self.answer, self.conflicts = answer, 0

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if mode == "create" and self.answer == "409" and self.conflicts == 0:
            self.conflicts += 1
            raise OSError(errno.EBUSY, "ConditionalRequestConflict")
        if mode == "create" and self.answer == "403":
            raise PermissionError(errno.EACCES, "Access Denied")
        try:
            super().pipe_file(path, value, mode=mode, **kwargs)
        except FileExistsError:
            raise OSError(errno.EINVAL, "At least one of the pre-conditions you specified did not hold") from None


def s3_like_lease(root, answer):
    return ObjectStoreLease(AsyncFileSystemWrapper(AnswersLikeS3(answer)), str(root), str(root))


def test_a_412_without_its_condition_is_a_lost_race_and_the_loser_waits(tmp_path, short_lease):
    holder = new_lease(tmp_path)
    holder.acquire()
    contender = s3_like_lease(tmp_path, "412")
    assert not contender._take(0)  # generation 0 exists: the EINVAL reply lost the race
    threading.Timer(0.3, holder.release).start()
    contender.acquire()
    assert contender.generation == 1
    contender.check()


def test_a_409_conditional_conflict_is_read_again_and_an_access_denied_is_one_line(tmp_path, short_lease):
    conflicted = s3_like_lease(tmp_path / "a", "409")
    conflicted.acquire()
    assert conflicted.generation == 0 and conflicted.fs.sync_fs.conflicts == 1
    conflicted.check()
    with pytest.raises(StoreError, match=r"cannot create the manifest lease object .*: \[Errno 13\] Access Denied$"):
        s3_like_lease(tmp_path / "b", "403").__enter__()
    assert not list((tmp_path / "b").rglob("*"))


def test_an_array_whose_parent_group_another_process_makes_meanwhile_is_taken(tmp_path, monkeypatch):
    """Two runs of one shard: the second finds the array made by the first, whose parent group's
    metadata is written at the same moment; its repair of the parents then meets a group that did
    not exist when it looked (zarr's ContainsGroupError), which is what it wanted."""
    handle = Store.open(tmp_path / "s", create=True)
    handle.require_array("scores/key/tau", (4, 3), "float32", (2, 3))[...] = np.ones((4, 3), np.float32)

    def made_meanwhile(self, name, **kwargs):
        raise zarr.errors.ContainsGroupError(f"A group exists at path {name!r}")

    monkeypatch.setattr(zarr.Group, "require_group", made_meanwhile)
    again = Store.open(tmp_path / "s").require_array("scores/key/tau", (4, 3), "float32", (2, 3))
    np.testing.assert_array_equal(again[...], np.ones((4, 3), np.float32))
