"""Files that grant power, checked as sshd's StrictModes checks a user's files.

The auth file says who may do what; an override file changes what a service serves
and which version it is pinned to; token, key and password files let whoever holds
them act as their owner. Each must be owned by the user the program runs as (or by
root) and writable by no one else, and so must the directory it is in (whoever can
write the directory can replace the file). A file that fails is refused with a
message naming it, its owner and mode, and the fix. Secrets others can read get a
warning: they still work, but anyone on the host can use them.

On a platform without user ids (Windows) nothing is checked. Standard library only:
the agents and ``cpctl`` use this too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["UnsafeFileError", "read_guarded"]


class UnsafeFileError(OSError):
    """A file that grants power can be changed by someone else; the message says how to fix it."""


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _problem(st: os.stat_result, me: int) -> str | None:
    """Why a file or directory with this status lets someone else change it (None: it does not).

    A sticky directory (``/tmp``) may be writable by all: no one can replace a file in it
    that is not theirs, and a file someone else made there fails the owner check.
    """
    if st.st_uid not in (me, 0):
        allowed = "root" if me == 0 else f"{_owner_name(me)} or root"
        return f"is owned by {_owner_name(st.st_uid)}, not by {allowed}"
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return "is writable by others"
    if st.st_mode & stat.S_IWGRP:
        return "is writable by its group"
    return None


def _refusal(path: Path, what: str, st: os.stat_result, problem: str, *, directory: bool) -> str:
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    owner = _owner_name(st.st_uid)
    me = _owner_name(os.geteuid())
    if directory:
        fix = (
            f"chown {me} {path} && chmod go-w {path}"
            if "owned" in problem
            else f"chmod go-w {path}"
        )
        return (
            f"{what} is refused: its directory {path} {problem} (owner {owner}, mode {mode}), "
            f"so others could replace the file: {fix}, or keep the file in a directory of its own"
        )
    fix = f"chown {me} {path} && chmod 600 {path}" if "owned" in problem else f"chmod 600 {path}"
    return f"{what} {path} is refused: it {problem} (owner {owner}, mode {mode}): {fix}"


def read_guarded(
    path: Path,
    what: str,
    *,
    secret: bool = False,
    follow_symlinks: bool = True,
    max_bytes: int = -1,
    strict: bool = True,
) -> tuple[bytes, str | None]:
    """Read ``path`` if no one but its owner (this user or root) can change it.

    Args:
        path: The file.
        what: What it is, for messages ("the auth file").
        secret: It holds a secret: others reading it gets a warning.
        follow_symlinks: False opens the file itself only (a symlink is refused).
        max_bytes: Read at most this many bytes (-1: all).
        strict: False reads a file someone else can change all the same, the refusal
            returned as the warning (an operator's explicit choice).

    Returns:
        The content, and a warning to log (None: nothing to say).

    Raises:
        UnsafeFileError: Someone else can change the file or its directory, or it is a
            symlink where none is allowed.
        OSError: It cannot be read (missing, no permission...).
    """
    # Non-blocking: a FIFO someone put there must not hang the reader on its open.
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_symlinks and path.is_symlink():
            raise UnsafeFileError(
                f"{what} {path} is refused: it is a symbolic link (whoever can change the "
                "link chooses the file): put the file itself there"
            ) from exc
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{what} {path} is refused: it is not a regular file")
        os.set_blocking(f.fileno(), True)
        try:
            warning = _check(path, what, st, secret=secret)
        except UnsafeFileError as exc:
            if strict:
                raise
            warning = str(exc)
        return f.read(max_bytes), warning


def _check(path: Path, what: str, st: os.stat_result, *, secret: bool) -> str | None:
    if not hasattr(os, "geteuid"):
        return None
    me = os.geteuid()
    problem = _problem(st, me)
    if problem is not None:
        raise UnsafeFileError(_refusal(path, what, st, problem, directory=False))
    directory = Path(os.path.realpath(path)).parent
    try:
        dst = os.stat(directory)
    except OSError:  # a directory one may not look into: its file was opened all the same
        dst = None
    if dst is not None:
        problem = _problem(dst, me)
        if problem is not None:
            raise UnsafeFileError(_refusal(directory, what, dst, problem, directory=True))
    if secret and st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        mode = f"{stat.S_IMODE(st.st_mode):04o}"
        return f"{what} {path} is readable by others (mode {mode}): chmod 600 {path}"
    return None
