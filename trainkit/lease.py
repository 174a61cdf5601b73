"""One driver per run: the run folder's owner holds a lease, ``<run>/owner.json``.

A ``fit()`` takes the lease before it writes anything else in the run folder (``acquire``:
before the marker, the manifest and the event stream), renews it from a background thread
every ``lease_s / 3`` (``Lease.start``) and removes it at the end (``Lease.release``). A
second driver finds a live lease and fails at once with ``RunOwnedError`` naming the owner.
A lease whose driver is gone is taken over (``owner_gone``): on the owner's own machine
(same host name, boot and pid namespace) when its pid is not running or is another process
now (its start time differs), anywhere when it was not renewed within its ``lease_s``.

Writes are exclusive where the storage can make them so: a new lease is a hard link of a
complete file on local disk and NFS (fails if one exists) and a PUT with
``If-None-Match: *`` on S3; a takeover holds an exclusive lock file (``owner.json.takeover``,
``O_EXCL``) on local disk and NFS while it checks and replaces the stale file, and PUTs with
``If-Match: <ETag>`` on S3. Every write is read back and compared. A store without conditional writes (other
fsspec filesystems, S3 look-alikes that ignore the headers) gets an unconditional write,
``SETTLE_S`` of waiting and the read-back: two drivers that take over the same stale lease
within that window can both believe they won; the loser finds out at its next renewal or
write (``Lease.check``) and stops.

The lease's I/O goes straight to the filesystem, never through ``RunStore``'s retries and
fault point: an injected storage fault must hit the run's writes, not its lease.

Runs in the driver: local mode, rank 0 under torchrun, the ``ray`` backend's driver. The
Ray controller's ledger gets a copy (pickled) that only checks, never renews. Readers
(``Result.from_path``) call ``owner_gone`` to show a dead driver's ``running`` run as aborted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from typing import Iterator, Optional

from trainkit.errors import ControllerError, RunOwnedError, StorageError, WorkerFailure
from trainkit.owner import Owner, machine, process_started, this_owner
from trainkit.storage import OWNER, RunStore, storage_io_error, to_uri

logger = logging.getLogger("trainkit")

LEASE_S = 30.0  # a lease not renewed for this long is taken over (written into owner.json: its readers use it)
SETTLE_S = 1.0  # stores without conditional writes: wait this long after a takeover write, then read it back
TAKEOVER_LOCK_S = 10.0  # a takeover lock older than this was left by a driver that died taking over
_TRIES = 3  # a lease read or write that fails is tried again this many times (object stores drop requests)

_held_lock = threading.Lock()
_held: set = set()  # tokens of the leases this process holds: a lease of this pid not in here was left behind


def owner_gone(owner: Owner, now: Optional[float] = None) -> Optional[str]:
    """Why ``owner``'s driver is gone (the run may be taken over), or None while it may be alive."""
    now = time.time() if now is None else now
    if owner.machine == machine():
        if owner.pid == os.getpid():
            with _held_lock:
                if owner.token not in _held:
                    return "it was left behind by an earlier fit() of this process"
        else:
            started = process_started(owner.pid)
            if started is None:
                return f"pid {owner.pid} is not running on {owner.host}"
            if owner.started is not None and started > 0 and abs(started - owner.started) > 1.0:
                return f"pid {owner.pid} on {owner.host} is another process now"
    age = now - owner.renewed_at
    if age > owner.lease_s:
        return f"its lease was last renewed {age:.0f} s ago, more than its lease_s={owner.lease_s:g}"
    return None


def driver_gone_error(reason: str, owner: Optional[Owner]) -> ControllerError:
    """The error a run whose driver is gone is marked with (``run_finished`` and readers)."""
    who = f"its driver (pid {owner.pid} on {owner.host})" if owner is not None else "its driver"
    message = f"the run was aborted: {who} is gone ({reason})"
    return ControllerError(message, [WorkerFailure(world_rank=-1, node_id=owner.host if owner else "",
                                                   pid=owner.pid if owner else None, kind="died",
                                                   message=message)])


def owned_error(store: RunStore, owner: Optional[Owner], *, lost: bool = False) -> RunOwnedError:
    path = store.path(OWNER)
    if owner is None:
        return RunOwnedError(f"{path} was removed while this driver (pid {os.getpid()}) ran {store.uri}: this "
                             f"driver stops writing to the run. Remove {OWNER} only when its driver is surely gone.")
    if lost:
        return RunOwnedError(
            f"run {store.uri} was taken over by another driver, {owner.describe()}: this driver (pid "
            f"{os.getpid()}) did not renew its lease in {OWNER} in time (stopped, suspended or cut off from the "
            f"storage), and stops writing to the run. Use another RunConfig.name for a second run.",
            dataclasses.asdict(owner))
    return RunOwnedError(
        f"run {store.uri} is in use by another driver: {owner.describe()}, with the same RunConfig.name "
        f"{store.name!r} and storage_path; two drivers on one run would corrupt it. Wait for that fit() to end, "
        f"use another RunConfig.name, or, if that driver is surely gone, remove {path} (a lease not renewed "
        f"within lease_s is taken over on its own).", dataclasses.asdict(owner))


# -- the lease file ----------------------------------------------------------------------------
def _protocol(store: RunStore) -> str:
    return store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]


def _s3(store: RunStore) -> bool:
    return _protocol(store) in ("s3", "s3a")


def _tried(fn):
    for attempt in range(_TRIES):
        try:
            return fn()
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError:
            if attempt == _TRIES - 1:
                raise
            time.sleep(0.05 * 2 ** attempt)


def read_lease(store: RunStore) -> tuple[Optional[bytes], Optional[str]]:
    """``(bytes of owner.json, its ETag on S3)``; ``(None, None)`` when there is none."""
    p = store.path(OWNER)

    def read():
        if store.local:
            with open(p, "rb") as f:
                return f.read(), None
        etag = None
        if _s3(store):  # before the data: a newer one fails If-Match; never a listing's cached ETag
            store.fs.invalidate_cache(p)
            etag = store.fs.info(p).get("ETag")
        return store.fs.cat_file(p), etag

    try:
        return _tried(read)
    except FileNotFoundError:
        return None, None


def current_owner(store: RunStore) -> Optional[Owner]:
    return Owner.parse(read_lease(store)[0])


def _create(store: RunStore, data: bytes) -> bool:
    """Write ``data`` as owner.json unless one exists. Whether it is ours afterwards."""
    p = store.path(OWNER)
    if store.local:
        os.makedirs(store.run_path, exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)  # atomic, and complete when it appears (NFS too)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: an exclusive create (a reader may see it empty for an instant)
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        return True
    store.fs.makedirs(store.run_path, exist_ok=True)
    try:
        _tried(lambda: store.fs.pipe_file(p, data, mode="create"))  # If-None-Match: * on S3
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without exclusive writes
        if read_lease(store)[0] is not None:
            return False
        _tried(lambda: store.fs.pipe_file(p, data))
        time.sleep(_settle_s(store))
    return read_lease(store)[0] == data


def _replace(store: RunStore, old: bytes, etag: Optional[str], data: bytes) -> bool:
    """Replace owner.json holding ``old`` by ``data``; False if it changed meanwhile. Whether it is ours."""
    p = store.path(OWNER)
    if store.local:
        # Takeovers are serialised by an exclusive lock file (O_EXCL: atomic on local disk and NFS):
        # of several drivers taking over one stale lease, the one holding the lock replaces it.
        lock = f"{p}.takeover"
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(lock) > TAKEOVER_LOCK_S:
                    os.remove(lock)  # its taker died holding it
            return False
        try:
            try:
                with open(p, "rb") as f:
                    current = f.read()
            except FileNotFoundError:
                return _create(store, data)
            if current != old:  # a quicker driver took it over already
                return False
            _replace_local(p, data)
            return read_lease(store)[0] == data
        finally:
            with contextlib.suppress(OSError):
                os.remove(lock)
    if _s3(store) and etag:
        for _ in range(_TRIES):
            try:
                store.fs.pipe_file(p, data, IfMatch=etag)
                return read_lease(store)[0] == data
            except (OSError, ValueError, TypeError):
                if read_lease(store)[0] != old:
                    return False  # another driver wrote it first
        # still unchanged after every try: the store refuses If-Match itself; an unconditional write, below
    if read_lease(store)[0] != old:
        return False
    _tried(lambda: store.fs.pipe_file(p, data))
    time.sleep(_settle_s(store))
    return read_lease(store)[0] == data


def _replace_local(p: str, data: bytes) -> None:
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except FileNotFoundError as e:  # an attempt's clean-up removed the temporary file: try again
        raise OSError(f"renewing {p}: {e}") from e  # no errno: retried, unlike a FileNotFoundError
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _settle_s(store: RunStore) -> float:
    return 0.0 if _protocol(store) == "memory" else SETTLE_S  # memory:// lives in one process


def _remove(store: RunStore) -> None:
    p = store.path(OWNER)
    with contextlib.suppress(FileNotFoundError):
        if store.local:
            os.remove(p)
        else:
            _tried(lambda: store.fs.rm_file(p))


# -- the lease --------------------------------------------------------------------------------------
class Lease:
    """The lease this driver holds on a run folder.

    >>> with owned(RunStore("/tmp/trainkit_results", "demo")) as lease:  # doctest: +SKIP
    ...     lease.check()  # raises RunOwnedError once another driver took the run over
    """

    def __init__(self, store: RunStore, owner: Owner, previous: Optional[Owner] = None,
                 previous_gone: Optional[str] = None, *, holder: bool = True):
        self.store = store
        self.owner = owner
        self.previous = previous  # the gone owner this lease took over, if any
        self.previous_gone = previous_gone  # why it was gone
        self.holder = holder  # False: a copy that only checks (the Ray controller's)
        self._confirmed = owner.renewed_at  # the latest renewal known to be ours (wall clock)
        self._lost: Optional[RunOwnedError] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def __reduce__(self):  # a copy for another process checks; only the driver renews and releases
        return (_checking_copy, (self.store, self.owner, self.previous, self.previous_gone))

    @classmethod
    def acquire(cls, store: RunStore, *, backend: str = "", lease_s: Optional[float] = None) -> "Lease":
        """Take the run folder's lease (``lease_s``: ``LEASE_S``), or raise ``RunOwnedError`` naming its live owner."""
        me = this_owner(LEASE_S if lease_s is None else lease_s, backend)
        data = me.to_json()
        # Held from before the write: a driver thread of this process that reads owner.json just after
        # our write must see a live owner, not a token this process does not hold (which reads as a
        # lease left by an earlier run here, and was taken over: two winners, 1 race in ~10).
        with _held_lock:
            _held.add(me.token)
        won = False
        try:
            for _ in range(5):
                old, etag = read_lease(store)
                if old is None:
                    if _create(store, data):
                        won = True
                        return cls._held(store, me)
                    continue
                owner = Owner.parse(old)
                if owner is not None and owner.token == me.token:  # a write whose answer was lost did land
                    won = True
                    return cls._held(store, me)
                gone = "owner.json is damaged" if owner is None else owner_gone(owner)
                if gone is None:
                    raise owned_error(store, owner)
                if _replace(store, old, etag, data):
                    won = True
                    logger.warning("took over %s: its previous driver%s is gone (%s)", store.uri,
                                   f", {owner.describe()}," if owner else "", gone)
                    return cls._held(store, me, owner, gone)
        except (RunOwnedError, StorageError):
            raise
        except Exception as e:  # noqa: BLE001 - every filesystem's failure is the storage's failure
            raise storage_io_error("taking the lease", to_uri(store.fs, store.path(OWNER)), e) from e
        finally:
            if not won:
                with _held_lock:
                    _held.discard(me.token)
        raise RunOwnedError(f"could not take the lease {store.path(OWNER)} of run {store.uri}: other drivers "
                            "are taking it at the same time; start one driver per RunConfig.name")

    @classmethod
    def _held(cls, store, me, previous=None, gone=None) -> "Lease":
        with _held_lock:
            _held.add(me.token)
        return cls(store, me, previous, gone)

    # -- renewal ---------------------------------------------------------------------------------
    def start(self) -> "Lease":
        """Renew the lease every ``lease_s / 3`` from a daemon thread, until ``release``."""
        if self._thread is None and self.holder:
            self._thread = threading.Thread(target=self._renew_loop, name=f"trainkit-lease-{self.store.name}",
                                            daemon=True)
            self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.owner.lease_s / 3):
            try:
                self.renew()
            except RunOwnedError as e:
                logger.warning("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: try again at the next tick
                logger.warning("could not renew the lease %s: %s: %s", self.store.path(OWNER), type(e).__name__, e)

    def renew(self) -> None:
        """Write a new ``renewed_at``, if the lease is still ours (else ``RunOwnedError``)."""
        with self._lock:
            if self._lost is not None:
                raise self._lost
            old, etag = read_lease(self.store)
            owner = Owner.parse(old)
            if owner is None or owner.token != self.owner.token:
                raise self._lose(owner)
            renewed = dataclasses.replace(owner, renewed_at=time.time())
            data = renewed.to_json()
            p = self.store.path(OWNER)
            if self.store.local:
                _tried(lambda: _replace_local(p, data))
            elif not _replace(self.store, old, etag, data):
                raise self._lose(current_owner(self.store))
            self.owner = renewed
            self._confirmed = renewed.renewed_at

    def _lose(self, owner: Optional[Owner]) -> RunOwnedError:
        self._lost = owned_error(self.store, owner, lost=True)
        return self._lost

    def check(self) -> None:
        """Raise ``RunOwnedError`` when the run is no longer this driver's (taken over, or the driver of a
        checking copy is gone). Reads owner.json only when the last renewal known is older than
        ``lease_s / 2``: free while the renewal thread keeps up."""
        if self._lost is not None:
            raise self._lost
        if not self.holder and self.owner.machine == machine() and process_started(self.owner.pid) is None:
            self._lost = RunOwnedError(
                f"the driver of {self.store.uri} (pid {self.owner.pid} on {self.owner.host}) is gone: "
                "this process stops writing to the run", dataclasses.asdict(self.owner))
            raise self._lost
        if time.time() < self._confirmed + self.owner.lease_s / 2:
            return
        with self._lock:
            try:
                owner = current_owner(self.store)
            except Exception as e:  # noqa: BLE001 - cannot tell: the run's own write meets the same storage
                logger.debug("could not read %s: %s", self.store.path(OWNER), e)
                return
            if owner is None or owner.token != self.owner.token:
                raise self._lose(owner)
            self._confirmed = max(self._confirmed, owner.renewed_at)

    # -- the end -----------------------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and remove owner.json if it is still ours. Never raises: a lease left behind is
        taken over by the next driver (its pid is gone, or it expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not self.holder:
            return
        try:
            with self._lock:
                owner = current_owner(self.store)
                if owner is not None and owner.token == self.owner.token:
                    _remove(self.store)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not remove the lease %s: %s: %s", self.store.path(OWNER), type(e).__name__, e)
        finally:
            with _held_lock:
                _held.discard(self.owner.token)


def _checking_copy(store: RunStore, owner: Owner, previous: Optional[Owner], previous_gone: Optional[str]) -> Lease:
    return Lease(store, owner, previous, previous_gone, holder=False)


@contextlib.contextmanager
def owned(store: RunStore, *, backend: str = "", lease_s: Optional[float] = None) -> Iterator[Lease]:
    """The block runs with the run folder's lease held and renewed: refuses a folder that is not a trainkit
    run's (touching nothing), takes the lease (``RunOwnedError`` if a live driver holds it), releases it."""
    store.check_owned()
    lease = Lease.acquire(store, backend=backend, lease_s=lease_s).start()
    try:
        yield lease
    finally:
        lease.release()


def stale_owner(store: RunStore, now: Optional[float] = None) -> Optional[tuple[Optional[Owner], str]]:
    """For readers of a ``running`` run: ``(the gone owner or None, why it is gone)`` when no live driver
    holds the lease (none at all, a damaged one, or its owner is gone); None while one may hold it, or
    when owner.json cannot be read (the run is then shown as it is)."""
    try:
        data, _ = read_lease(store)
    except Exception as e:  # noqa: BLE001 - a reader shows what it can
        logger.debug("could not read %s: %s", store.path(OWNER), e)
        return None
    if data is None:
        return None, f"no driver holds its lease ({OWNER})"
    owner = Owner.parse(data)
    if owner is None:
        return None, f"its {OWNER} is damaged"
    gone = owner_gone(owner, now)
    return (owner, gone) if gone is not None else None
