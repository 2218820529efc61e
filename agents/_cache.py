"""The cache file an agent boots from when no server answers (DESIGN.md, "Fail static").

A write is atomic: the content goes to a temporary file in the same directory,
is flushed to disk, and replaces the cache with ``os.replace``; a reader (this
process after a restart, or another worker sharing the path) sees the old file or
the new one, never a part. Several processes may share one path: each write is
a complete state, and the last one wins.

Writes are serialised per process and never go backwards: a write of an older
state than the last one written is skipped (writes run on a worker thread and a
stopping agent flushes its last state itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from datetime import datetime
from pathlib import Path

from agents._state import CorruptCacheError, Snapshot, snapshot_from_cache, snapshot_to_cache

log = logging.getLogger("agents")


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


class CacheWriter:
    """Atomic writes of one cache path, serialised, never older than the last.

    Args:
        path: The cache file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._written = -1

    def write(self, snapshot: Snapshot, sequence: int) -> bool:
        """Write ``snapshot`` unless a later ``sequence`` was written already.

        ``sequence`` orders the writes of one agent (its applied states, in
        order). Errors are logged, not raised: a cache that cannot be written
        must not stop the agent from applying the server's state.

        Returns:
            Whether the file now holds ``snapshot``.
        """
        with self._lock:
            if sequence <= self._written:
                return False
            try:
                write_atomic(self.path, snapshot_to_cache(snapshot))
            except (OSError, ValueError) as exc:
                log.warning("agent_cache_write_failed path=%s error=%s", self.path, exc)
                return False
            self._written = sequence
            return True

    def reset_after_fork(self) -> None:
        """A fresh lock in a forked child (the parent's may have been held)."""
        self._lock = threading.Lock()


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, fsync, ``os.replace``).

    Raises:
        OSError: The directory cannot be created or written; ``path`` is unchanged
            and no temporary file is left behind.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable once the directory is synced; a crash before
    # that leaves the previous cache, which is still a whole state.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
