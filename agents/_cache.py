"""The cache file an agent boots from when no server answers (fail static).

A write is atomic (``agents._atomic``): the content goes to a temporary file in
the same directory, is flushed to disk, and replaces the cache with
``os.replace``; a reader (this process after a restart, or another worker sharing
the path) sees the old file or the new one, never a part.

Writes are serialised per process and never go backwards: a write of an older
state than the last one written is skipped (writes run on a worker thread and a
stopping agent flushes its last state itself).

Several processes may share one path (gunicorn workers): each write takes an
exclusive ``flock`` on the sibling ``<path>.lock`` (created once, never removed)
and, holding it, skips the write when the file already holds a newer revision of
the same service, so that a worker that fell behind never replaces a newer state
with its older one. The one exception is a state the server itself sent older
(etcd restored from an older backup): it replaces whatever the file holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from agents import _codec
from agents._atomic import write_atomic
from agents._codec import snapshot_from_proto
from agents._state import MAX_REVISION, CorruptCacheError, InvalidChangeError, Snapshot
from controlplane.api.v1 import agent_pb2

log = logging.getLogger("agents")

CACHE_FORMAT = 1

_R = TypeVar("_R")


def snapshot_to_cache(snapshot: Snapshot, records: RecordsJSON | None = None) -> bytes:
    """The cache file's content: JSON with the service, the revision and the records.

    The records are in protobuf's JSON form (field names as in the .proto), layers
    included, so that an agent booting from the cache switches on time too.
    ``records`` keeps that form of each record of the last state encoded: a
    change replaces one record, and only that one is converted again.
    """
    doc = {
        "format": CACHE_FORMAT,
        "service": snapshot.service,
        "revision": snapshot.revision,
        "records": (records or RecordsJSON()).of(snapshot),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class RecordsJSON:
    """The protobuf JSON form of a snapshot's records, as ``MessageToDict`` of its
    Snapshot message (revision aside) gives it, remembered per record object
    (records are immutable; a snapshot after a change shares the others)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[object, dict[str, Any]]] = {}

    def of(self, snapshot: Snapshot) -> dict[str, Any]:
        known, self._known = self._known, {}
        doc: dict[str, Any] = {}
        flags = [
            self._one(record, known, _codec.flag_record_to_proto)
            for record in snapshot.flag_records.values()
        ]
        if flags:
            doc["flags"] = flags
        if snapshot.shedding_record is not None:
            doc["shedding"] = self._one(
                snapshot.shedding_record, known, _codec.shedding_record_to_proto
            )
        if snapshot.pin_record is not None:
            doc["pin"] = self._one(snapshot.pin_record, known, _codec.pin_record_to_proto)
        return doc

    def _one(
        self,
        record: _R,
        known: dict[int, tuple[object, dict[str, Any]]],
        to_proto: Callable[[_R], Message],
    ) -> dict[str, Any]:
        hit = known.get(id(record))
        if hit is not None and hit[0] is record:
            form = hit[1]
        else:
            form = json_format.MessageToDict(to_proto(record), preserving_proto_field_name=True)
        self._known[id(record)] = (record, form)
        return form


def snapshot_from_cache(data: bytes, service: str, now: datetime) -> Snapshot:
    """The snapshot a cache file holds, evaluated at ``now``.

    Fields the .proto does not know are ignored, so that a service rolled back to
    an older agent still boots from the cache a newer one wrote.

    Raises:
        CorruptCacheError: The content is not a cache of this format, is for
            another service, or holds a record the agent would reject; whatever
            is wrong with the content, never another exception.
    """
    try:
        return _snapshot_from_cache(data, service, now)
    except CorruptCacheError:
        raise
    except InvalidChangeError as exc:
        raise CorruptCacheError(f"invalid record: {exc}") from None
    except Exception as exc:  # anything else a damaged or hand-edited file can cause
        raise CorruptCacheError(f"unusable ({type(exc).__name__}: {exc})") from None


def _snapshot_from_cache(data: bytes, service: str, now: datetime) -> Snapshot:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CorruptCacheError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptCacheError("not a JSON object")
    if doc.get("format") != CACHE_FORMAT:
        raise CorruptCacheError(
            f"format {doc.get('format')!r} is not the supported format {CACHE_FORMAT}"
        )
    cached_service = doc.get("service")
    if cached_service != service:
        raise CorruptCacheError(f"the cache is for service {cached_service!r}, not {service!r}")
    revision = doc.get("revision")
    if (
        not isinstance(revision, int)
        or isinstance(revision, bool)
        or not 0 <= revision <= MAX_REVISION
    ):
        raise CorruptCacheError(f"revision {revision!r} is not a revision")
    records = doc.get("records")
    if not isinstance(records, dict):
        raise CorruptCacheError("'records' is missing or not a JSON object")
    msg = agent_pb2.Snapshot()
    try:
        json_format.ParseDict(records, msg, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise CorruptCacheError(f"records do not parse: {exc}") from None
    msg.revision = revision
    return snapshot_from_proto(service, msg, now)


def read_cache(path: Path, service: str, now: datetime) -> Snapshot | None:
    """The state the cache at ``path`` holds, evaluated at ``now``, or None.

    A missing file is None without a word; an unreadable or corrupt one (or one
    for another service) is None with a warning: the agent then starts without
    state rather than from something it cannot trust.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("agent_cache_unreadable path=%s error=%s", path, exc)
        return None
    try:
        return snapshot_from_cache(data, service, now)
    except CorruptCacheError as exc:
        log.warning("agent_cache_corrupt path=%s error=%s (ignored)", path, exc)
        return None
    except Exception as exc:  # never: snapshot_from_cache says CorruptCacheError
        log.warning("agent_cache_corrupt path=%s error=%r (ignored)", path, exc)
        return None


def lock_path(path: Path) -> Path:
    """The lock file the writers of ``path`` take: ``<path>.lock``."""
    return path.with_name(path.name + ".lock")


class _LockFile:
    """The ``flock`` the writers of one cache path take, on ``<path>.lock``, through a
    descriptor opened once and kept (the file is created once, never removed): a
    write then costs no open and close of it, nor their file events."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock exclusively while the block runs (the folder made if missing)."""
        if self._fd < 0:
            try:
                self._fd = _open_lock(self.path)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = _open_lock(self.path)
        _flock(self._fd, True)
        try:
            yield
        finally:
            _flock(self._fd, False)

    def close(self) -> None:
        """Close the descriptor (opened again by the next write)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = -1


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


if sys.platform == "win32":  # no flock: each write is still atomic, the last one wins

    def _flock(fd: int, exclusive: bool) -> None:
        return

else:
    import fcntl

    def _flock(fd: int, exclusive: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_UN)


def revision_on_disk(path: Path, service: str) -> int | None:
    """The revision of the usable cache of ``service`` at ``path``, or None (no
    file, unreadable, another service's, or one an agent would not boot from: a
    corrupt file never keeps a good state out)."""
    try:
        return snapshot_from_cache(path.read_bytes(), service, datetime.now(UTC)).revision
    except Exception:  # missing, unreadable or corrupt: nothing to protect
        return None


class CacheWriter:
    """Atomic writes of one cache path, serialised, never older than the last.

    Args:
        path: The cache file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = lock_path(path)
        self._lock_file = _LockFile(self.lock_path)
        self._lock = threading.Lock()
        self._written = -1
        self._records = RecordsJSON()
        self._unsynced = False
        self.writes = 0
        """Files written (skipped writes not counted)."""
        # The file as this writer left it (device, inode, size, mtime) and the
        # revision in it: while the file is still that one, the revision on
        # disk is known without reading it back.
        self._mine: tuple[tuple[int, int, int, int], int] | None = None

    def write(
        self,
        snapshot: Snapshot,
        sequence: int,
        *,
        replace_newer: bool = False,
        durable: bool = False,
    ) -> bool:
        """Write ``snapshot`` unless a later ``sequence`` was written already, or
        the file holds a newer revision of the same service.

        ``sequence`` orders the writes of one agent (its applied states, in
        order). ``replace_newer`` writes over a newer revision on disk: for a
        state the server sent older than the one applied before (etcd went
        back). ``durable`` syncs it to disk (``agents._atomic``); a stop does,
        the writes while running do not. Errors are logged, not raised: a cache
        that cannot be written must not stop the agent from applying the
        server's state.

        Returns:
            Whether the file now holds ``snapshot``.
        """
        with self._lock:
            if sequence <= self._written:
                return False
            try:
                data = snapshot_to_cache(snapshot, self._records)
                # One writer at a time across the processes sharing the path; the
                # check and the replace under the same lock.
                with self._lock_file.held():
                    on_disk = self._revision_on_disk(snapshot.service)
                    if on_disk is not None and on_disk > snapshot.revision and not replace_newer:
                        log.debug(
                            "agent_cache_newer_on_disk path=%s revision=%d on_disk=%d (kept)",
                            self.path,
                            snapshot.revision,
                            on_disk,
                        )
                        self._written = sequence
                        return False
                    written = write_atomic(self.path, data, durable=durable)
                    self._unsynced = not durable
                    self.writes += 1
                    self._mine = (_identity_of(written), snapshot.revision)
            except (OSError, ValueError) as exc:
                self._mine = None
                log.warning("agent_cache_write_failed path=%s error=%s", self.path, exc)
                return False
            self._written = sequence
            return True

    def _revision_on_disk(self, service: str) -> int | None:
        """The revision the file holds: known while it is the file this writer left,
        else read back (another process sharing the path wrote it, or someone else)."""
        mine = self._mine
        if mine is not None:
            try:
                if _identity(self.path) == mine[0]:
                    return mine[1]
            except OSError:
                pass
        return revision_on_disk(self.path, service)

    def release(self) -> None:
        """Let go of the lock file's descriptor (the agent stopped; a next write,
        after a restart, opens it again)."""
        with self._lock:
            self._lock_file.close()

    def sync(self) -> None:
        """Sync the last file written to disk, if it was written without (at a stop)."""
        with self._lock:
            if not self._unsynced:
                return
            self._unsynced = False
            try:
                for target in (self.path, self.path.parent):
                    fd = os.open(target, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            except OSError as exc:
                log.warning("agent_cache_sync_failed path=%s error=%s", self.path, exc)

    def reset_after_fork(self) -> None:
        """A fresh lock in a forked child (the parent's may have been held)."""
        self._lock = threading.Lock()
        # The child's copy of the descriptor closed (the parent's lock, if held, stays
        # the parent's); the next write opens one of its own.
        self._lock_file.close()


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: a replace makes a new inode."""
    return _identity_of(os.stat(path))


def _identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
