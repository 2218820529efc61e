"""Whether threads wake up while nothing happens, read from ``/proc`` (Linux)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.helpers.agent_sidecar import wait_until

HAS_PROC = Path("/proc/self/task").is_dir()


def switches(thread: threading.Thread | None) -> int:
    """How many times ``thread`` went off a CPU (it woke up as many times)."""
    assert thread is not None
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


def sleeping(thread: threading.Thread | None) -> bool:
    assert thread is not None
    stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "S"


def wakes_while_idle(threads: Sequence[threading.Thread | None], window: float = 0.5) -> list[int]:
    """How many times each thread woke during ``window`` seconds, once all settled."""

    def settled() -> bool:
        # Asleep and staying so: a thread waiting for the GIL shows asleep too.
        first = [switches(thread) for thread in threads]
        time.sleep(0.1)
        asleep = all(sleeping(thread) for thread in threads)
        return asleep and [switches(thread) for thread in threads] == first

    wait_until(settled, what="all asleep")
    before = [switches(thread) for thread in threads]
    time.sleep(window)  # the window watched, not a wait for something
    return [after - b for after, b in zip((switches(t) for t in threads), before, strict=True)]
