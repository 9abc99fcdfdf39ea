"""An exclusive lease between processes on an object store, for the manifest.

Object stores offer one atomic primitive here: create an object only if it is absent (a
conditional PUT). The lease is built from it alone, as a sequence of generations: the object
`manifest_lease/<generation>/zarr.json` (a Zarr group whose attributes are the lease, so that
the store stays a valid Zarr hierarchy) is created (only if absent) by the process that takes the lease,
and from then on only that process writes to it:

- take: read the newest generation g; if there is none, or it says "released", or it is stale,
  create g + 1. Of several processes racing for g + 1, the conditional PUT lets exactly one win;
  the others wait and read again. Nobody ever deletes or overwrites another process's object,
  so breaking a stale lease cannot remove a fresh one.
- hold: the holder rewrites its own object every LEASE_SECONDS / 3 with a renewal counter.
  Another process calls a lease stale once a read of it that started LEASE_SECONDS after it first
  saw that counter still shows it, on its own clock: no clocks need to agree, a holder that is slow
  but alive keeps its lease, and a contender paused after a read does not take that read for new.
- check before writing: the holder refuses to write (StoreError) once its last renewal is older
  than LEASE_SECONDS / 2, once any newer generation exists (not only the next one: a third
  process may have removed that), or once its own generation names another process (a store
  that ignored create-if-absent): a holder that was paused past its lease learns that it lost
  it instead of writing over its successor. A taker reads back what it created, for the same
  reason. After a passing check the holder has at least LEASE_SECONDS / 2 before anyone may
  break its lease, and the manifest write it guards takes milliseconds.
- release: the holder marks its own object released; generations older than the newest are
  removed by the next taker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import threading
import time
import uuid

from trakwomp.store.errors import StoreError
from zarr.core.sync import sync

LEASE_SECONDS = 30.0
WAIT_SECONDS = 300.0
FOLDER = "manifest_lease"
GROUP = {"zarr_format": 3, "node_type": "group"}


class ObjectStoreLease:
    """`with ObjectStoreLease(fs, root, location) as lease: ...; lease.check(); write`."""

    def __init__(self, fs, root: str, location: str):
        self.fs, self.folder, self.location = fs, f"{root.rstrip('/')}/{FOLDER}", location
        self.token = uuid.uuid4().hex
        self.generation = -1  # the generation this process holds (generations count from 0)
        self.renewals = 0
        self.renewed_at = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _path(self, generation: int) -> str:
        return f"{self.folder}/{generation:012d}/zarr.json"

    def _content(self, released: bool = False) -> bytes:
        lease = {"token": self.token, "renewals": self.renewals, "released": released}
        return json.dumps({**GROUP, "attributes": lease}).encode()

    def newest(self) -> tuple[int | None, dict | None]:
        """The newest generation and its content, or (None, None) if there is none."""
        self.fs.invalidate_cache(self.folder)
        try:
            names = sync(self.fs._ls(self.folder, detail=False))
        except FileNotFoundError:
            return None, None
        last_parts = [name.rstrip("/").rsplit("/", 1)[-1] for name in names]
        generations = [int(part) for part in last_parts if part.isdigit()]
        if not generations:
            return None, None
        generation = max(generations)
        return generation, self._read(generation)

    def _read(self, generation: int) -> dict | None:
        """The lease object of `generation` (None if there is none); one that does not parse (a
        holder's rewrite read half-way on a store without atomic PUTs) names no holder."""
        try:
            return json.loads(sync(self.fs._cat_file(self._path(generation))))["attributes"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError):
            return {"token": "", "renewals": -1, "released": False}

    def _create_if_absent(self, path: str, content: bytes) -> bool:
        """Whether this call created the object at `path` (False: it existed already, or a
        concurrent conditional write was in flight; the caller reads the lease again)."""
        try:
            sync(self.fs._pipe_file(path, content, mode="create"))
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError) as e:
            raise StoreError(f"store {self.location!r}: its file system cannot create an object only if absent, "
                             f"which the manifest lease needs ({e})") from None
        except OSError as e:
            return self._outcome_of_failed_create(path, content, e)
        return True

    def _outcome_of_failed_create(self, path: str, content: bytes, error: OSError) -> bool:
        """What a conditional PUT that raised `error` did, learned by reading `path`. S3 answers a
        create that lost a race with 412 (which s3fs makes a FileExistsError only when the reply
        names the If-None-Match condition, else EINVAL), and one that met a concurrent
        conditional write with 409 ConditionalRequestConflict (EBUSY): the object there (or, for
        a 409, its absence) says who won; any other failure is refused in one line."""
        try:
            found = sync(self.fs._cat_file(path))
        except OSError:  # absent, or unreadable: the error below says why
            found = None
        if found is not None:
            return found == content
        if error.errno == errno.EBUSY:
            return False
        raise StoreError(f"store {self.location!r}: cannot create the manifest lease object {path!r}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None

    def acquire(self) -> None:
        # the folder is a group too; made once, by whoever comes first
        self._create_if_absent(f"{self.folder}/zarr.json", json.dumps({**GROUP, "attributes": {}}).encode())
        deadline = time.monotonic() + WAIT_SECONDS
        seen: dict[tuple, float] = {}  # (generation, token, renewals) -> when first seen
        while True:
            read_at = time.monotonic()  # staleness is judged by when the lease was read, not by now:
            generation, content = self.newest()  # a pause after this read must not make it look stale
            if content is not None or generation is None:
                state = (generation, content and content["token"], content and content["renewals"])
                first_seen = seen.setdefault(state, read_at)
                free = content is None or content["released"]  # None: no generation yet
                if free or read_at - first_seen > LEASE_SECONDS:
                    if self._take(0 if generation is None else generation + 1):
                        self._remove_older(self.generation)
                        return
                    continue
            if time.monotonic() > deadline:
                raise StoreError(f"store {self.location!r}: the manifest lease {self.folder!r} stayed taken for "
                                 f"{WAIT_SECONDS:.0f} s")
            time.sleep(random.uniform(0.02, 0.2))

    def _take(self, generation: int) -> bool:
        """Whether this process created `generation`, and so holds the lease: the object is read
        back, since a store that ignored the create-if-absent would let two processes 'create' it."""
        self.renewals = 0
        if not self._create_if_absent(self._path(generation), self._content()):
            return False
        self.generation, self.renewed_at = generation, time.monotonic()
        created = self._read(generation)
        return created is not None and created["token"] == self.token

    def _remove_older(self, generation: int) -> None:
        for older in range(generation - 1, -1, -1):
            try:
                sync(self.fs._rm_file(self._path(older)))
            except FileNotFoundError:
                break

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            self.renewals += 1
            try:
                sync(self.fs._pipe_file(self._path(self.generation), self._content()))
            except OSError:
                continue  # `check` refuses to write once renewals have failed for half a lease
            self.renewed_at = time.monotonic()

    def check(self) -> None:
        """Refuse (StoreError) unless this process still holds the lease for half a lease period:
        its renewals are recent, no newer generation exists (whatever was removed in between), and
        its own generation still names it."""
        lost = time.monotonic() - self.renewed_at > LEASE_SECONDS / 2
        if not lost:
            newest, content = self.newest()
            lost = newest is None or newest > self.generation or content is None or content["token"] != self.token
        if lost:
            raise StoreError(f"store {self.location!r}: this process lost the manifest lease (it was paused or "
                             "cut off for longer than the lease); nothing was written, run the command again")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(OSError):  # unreleased, the lease goes stale and is broken after LEASE_SECONDS
            sync(self.fs._pipe_file(self._path(self.generation), self._content(released=True)))

    def __enter__(self) -> "ObjectStoreLease":
        try:
            self.acquire()
        except OSError as e:  # listing or reading the lease failed (permissions, network)
            raise StoreError(f"store {self.location!r}: cannot read the manifest lease: {e}") from None
        self._renewer = threading.Thread(target=self._renew, daemon=True, name="trakwomp-lease")
        self._renewer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
