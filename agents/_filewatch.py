"""Waking an asyncio task when one file may have changed, without periodic wake-ups.

:class:`FileWatch` tells its owner *when to look*; what changed is the owner's
business (``agents._override.OverrideFile`` compares the file's stat). The owner
looks once after creating it, then after each :meth:`FileWatch.wait`::

    with FileWatch(path) as watch:
        while True:
            look()
            await watch.wait()

On Linux it watches with inotify (through libc, ``ctypes``): one instance per
watch, read in the loop (``loop.add_reader``), each directory that the path's
resolution goes through and that could change what the path names::

    the directory holding the file          the file's name: created, written,
                                            closed, its mode or owner, renamed
                                            in or out, removed
    the directory holding a symbolic link   the link's name: replaced or removed
      met on the way (the path itself, a    (a ConfigMap volume's ``..data``
      directory in it, a link's target)     swap: ``..data`` is such a link)
    the deepest directory that exists,      the missing name: created
      when a component is missing
    each of them                            itself: its mode or owner, deleted,
                                            moved, unmounted; the queue overflowed

Anything else in those directories (other files, reads of the file) wakes no
one. After each wake-up the watch is made afresh from the path as it now
resolves (a new inotify instance, the previous one closed), then the owner
looks: whatever changed between the two is seen by the look, whatever changes
after it wakes the owner again. A directory that does not exist yet is watched
for from its nearest existing ancestor; a watched directory deleted or moved is
a wake-up like the others, and the watch follows the path.

Where inotify cannot be used (another system, no such symbols in libc, the
per-user limits of instances or watches reached, a directory that cannot be
read, ``use_inotify=False``) :meth:`FileWatch.wait` returns every
:data:`FALLBACK_INTERVAL` seconds, and tries inotify again each time.

A rename of a directory above the deepest one watched that is not a symbolic
link (``mv /etc/app /etc/app.old``) is not seen until something watched changes.

The inotify descriptor is closed by :meth:`FileWatch.close` (the owner's task
cancelled); in a child process made by ``os.fork()`` every inherited one is
closed at once, untouched in the parent's loop, so that only a new watch made in
the child watches there.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import stat
import struct
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

log = logging.getLogger("agents")

FALLBACK_INTERVAL = 1.0
"""Seconds :meth:`FileWatch.wait` waits where the file cannot be watched."""

# <sys/inotify.h>
_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_ONLYDIR = 0x01000000
_DIRECTORY_EVENTS = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
    | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
)  # fmt: skip
"""What a watched directory reports (IN_IGNORED, IN_UNMOUNT and IN_Q_OVERFLOW
always are); not IN_ACCESS, IN_OPEN nor IN_CLOSE_NOWRITE: the owner's own look
at the file must not wake it."""
_EVENT = struct.Struct("iIII")
"""struct inotify_event: wd, mask, cookie, len; then len bytes of name."""
_READ_SIZE = 64 * 1024
_ATTEMPTS = 3
"""Resolutions tried in a row when a directory goes while being watched."""
_MAX_LINKS = 40
"""Symbolic links followed resolving one path, as the kernel does (ELOOP beyond)."""


@dataclass(frozen=True, slots=True)
class _Libc:
    init1: Callable[[int], int]
    add_watch: Callable[[int, bytes, int], int]
    get_errno: Callable[[], int]


@functools.cache
def _libc() -> _Libc | None:
    """libc's inotify calls, or None where there are none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here: only Linux pays for it, at the first watch

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init1, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    init1.argtypes = [ctypes.c_int]
    init1.restype = ctypes.c_int
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    return _Libc(init1, add_watch, ctypes.get_errno)


def _error(libc: _Libc, what: str) -> OSError:
    code = libc.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def watched_names(path: str) -> dict[str, set[bytes]]:
    """The directories to watch for ``path``, each with the names in it whose
    change can change what ``path`` names: each symbolic link met resolving it,
    and where the resolution ends (the file, or the first missing component).

    Raises:
        OSError: A component cannot be looked at (permission), or there are too
            many symbolic links.
    """
    start = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    todo = [part for part in reversed(start.split("/")) if part not in ("", ".")]
    current = "/"
    links = 0
    found: dict[str, set[bytes]] = {}
    while todo:
        name = todo.pop()
        if name == "..":
            current = os.path.dirname(current)  # ``current`` holds no links
            continue
        entry = os.path.join(current, name)
        try:
            st = os.lstat(entry)
        except (FileNotFoundError, NotADirectoryError):
            found.setdefault(current, set()).add(os.fsencode(name))
            return found  # the first missing component: watched for
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            found.setdefault(current, set()).add(os.fsencode(name))
            target = os.readlink(entry)
            if target.startswith("/"):
                current = "/"
            todo.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
            continue
        if not todo or not stat.S_ISDIR(st.st_mode):
            # The end (or a file where a directory should be: watched until it is one).
            found.setdefault(current, set()).add(os.fsencode(name))
            return found
        current = entry
    found.setdefault(current, set())  # the path is "/" (or resolves to it)
    return found


_open: weakref.WeakSet[_Inotify] = weakref.WeakSet()


class _Inotify:
    """One inotify instance, its watches and its reader in a loop."""

    def __init__(
        self,
        libc: _Libc,
        loop: asyncio.AbstractEventLoop,
        directories: dict[str, set[bytes]],
        wake: Callable[[], None],
    ) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = wake
        self._names: dict[int, set[bytes]] = {}
        self.fd = libc.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise _error(libc, "inotify_init1")
        try:
            for directory, names in directories.items():
                wd = libc.add_watch(self.fd, os.fsencode(directory), _DIRECTORY_EVENTS)
                if wd < 0:
                    raise _error(libc, f"inotify_add_watch {directory}")
                self._names.setdefault(wd, set()).update(names)
            loop.add_reader(self.fd, self._readable)
            self._loop = loop
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        _open.add(self)

    def _readable(self) -> None:
        relevant = False
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError:  # not expected of inotify: made afresh at the wake-up
                relevant = True
                break
            if not data:
                break
            relevant = self._relevant(data) or relevant
        if relevant:
            self._wake()

    def _relevant(self, data: bytes) -> bool:
        relevant = False
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            offset = start + length
            names = self._names.get(wd)
            # No name: the directory itself (or the queue, wd -1) tells of something.
            if names is None or not length or data[start:offset].rstrip(b"\0") in names:
                relevant = True
        return relevant

    def close(self) -> None:
        _open.discard(self)
        if self.fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.fd)
        self._loop = None
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1

    def forsake(self) -> None:
        """In a forked child: close the copy of the descriptor, leaving the
        parent's loop (whose epoll instance the child shares) alone."""
        self._loop = None
        self.close()


def _after_fork_in_child() -> None:
    for inotify in list(_open):
        inotify.forsake()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FileWatch:
    """Wakes its owner when the file at ``path`` may have changed (see the module).

    Made, used and closed in one running event loop; a context manager closing it.

    Args:
        path: The file (it and its directories need not exist).
        use_inotify: False: never watch, wake every :data:`FALLBACK_INTERVAL`.
    """

    def __init__(self, path: str | os.PathLike[str], *, use_inotify: bool = True) -> None:
        self.path = os.fspath(path)
        self._use_inotify = use_inotify
        self._loop = asyncio.get_running_loop()
        self._woken = asyncio.Event()
        self._inotify: _Inotify | None = None
        self._closed = False
        self._polling_because: str | None = None
        self._arm()

    @property
    def watching(self) -> bool:
        """Whether inotify watches the path (else :meth:`wait` returns each
        :data:`FALLBACK_INTERVAL`)."""
        return self._inotify is not None

    def fileno(self) -> int:
        """The inotify descriptor; -1 when not watching."""
        return -1 if self._inotify is None else self._inotify.fd

    async def wait(self) -> None:
        """Return when the file may have changed since the previous return (or
        since the watch was made), or after :data:`FALLBACK_INTERVAL` when not
        watching. Never raises but to be cancelled.
        """
        if self._closed:
            raise RuntimeError("the file watch is closed")
        if self._inotify is None:
            await asyncio.sleep(FALLBACK_INTERVAL)
        else:
            await self._woken.wait()
        self._woken.clear()
        self._arm()

    def close(self) -> None:
        """Close the inotify descriptor. Idempotent."""
        self._closed = True
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _arm(self) -> None:
        """Watch afresh, from the path as it resolves now."""
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        if not self._use_inotify:
            return
        libc = _libc()
        if libc is None:
            self._polling("no inotify here", logging.DEBUG)
            return
        try:
            for attempt in range(_ATTEMPTS):
                try:
                    self._inotify = _Inotify(
                        libc, self._loop, watched_names(self.path), self._woken.set
                    )
                    break
                except (FileNotFoundError, NotADirectoryError):
                    # A directory went between the resolution and its watch: again.
                    if attempt == _ATTEMPTS - 1:
                        raise
        except (OSError, NotImplementedError) as exc:
            # ENOSPC, EMFILE: the user's watches or instances are all in use;
            # EACCES: a directory that cannot be read; a loop without add_reader.
            self._polling(str(exc) or type(exc).__name__, logging.INFO)
            return
        if self._polling_because is not None:
            log.info("agent_file_watch_watching path=%s", self.path)
            self._polling_because = None

    def _polling(self, because: str, level: int) -> None:
        if because != self._polling_because:
            log.log(
                level,
                "agent_file_watch_polling path=%s every=%ss because=%s",
                self.path,
                FALLBACK_INTERVAL,
                because,
            )
        self._polling_because = because


__all__ = ["FALLBACK_INTERVAL", "FileWatch", "watched_names"]
