"""The state file: the ``/v1/state`` document, rewritten atomically whenever
what it says changes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents._atomic import write_atomic
from agents.sidecar._options import STATE_FILE_MODE, STATE_RETRY, STATE_RETRY_CAP

log = logging.getLogger("agents.sidecar")


class StateFileWriter:
    """Rewrites the state file on a thread of its own when woken and ``key()`` changed.

    :meth:`wake` is all it waits for (the sidecar calls it on a change, a new
    snapshot, the agent state, a hook's status): no timer runs while the file is
    written. Wake-ups that come while it writes make one more write, of the
    newest document. A failed write is tried again after ``retry`` seconds,
    doubled per failure up to ``retry_cap``, or at the next wake-up.
    """

    def __init__(
        self,
        path: Path,
        document: Callable[[], dict[str, Any]],
        key: Callable[[], object],
        retry: float = STATE_RETRY,
        retry_cap: float = STATE_RETRY_CAP,
    ) -> None:
        self.path = path
        self._document = document
        self._key = key
        self._retry = retry
        self._retry_cap = retry_cap
        self._wakeup = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._written: object = None
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._loop, name="cp-agent-state-file", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Look at the state again (from any thread; never blocks)."""
        self._wakeup.set()

    def stop(self) -> None:
        """Stop the thread and write the last state. Idempotent."""
        self._stopping = True
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join()
        self.write_if_changed()

    def _loop(self) -> None:
        delay: float | None = None  # None: until woken
        while True:
            self._wakeup.wait(delay)
            # Cleared before the look: a wake-up during it makes another one.
            self._wakeup.clear()
            if self._stopping:
                return
            if self.write_if_changed():
                delay = None
            else:
                delay = self._retry if delay is None else min(delay * 2, self._retry_cap)

    def write_if_changed(self) -> bool:
        """Write the document if ``key()`` changed since the last write; return
        False when the write failed (it is logged once per kind of failure)."""
        with self._lock:
            key = self._key()
            if key == self._written:
                return True
            data = (json.dumps(self._document(), ensure_ascii=False, indent=2) + "\n").encode()
            try:
                write_atomic(self.path, data, mode=STATE_FILE_MODE)
            except OSError as exc:
                if str(exc) != self._failure:
                    log.error("state_file_write_failed path=%s error=%s", self.path, exc)
                self._failure = str(exc)
                return False
            if self._failure is not None:
                log.info("state_file_written path=%s (again)", self.path)
            self._failure = None
            self._written = key
            return True


def read_previous_hooks(path: Path, service: str) -> dict[str, Any]:
    """The ``hooks`` section of a previous run's state file (empty if none)."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("state_file_unreadable path=%s error=%s (hooks start afresh)", path, exc)
        return {}
    if not isinstance(doc, dict) or doc.get("service") != service:
        log.warning("state_file_other path=%s (not this service's: hooks start afresh)", path)
        return {}
    hooks = doc.get("hooks")
    return hooks if isinstance(hooks, dict) else {}
