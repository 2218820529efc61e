"""A sidecar over a StaticAgent, for the sidecar's unit tests: agents whose state
the test sets, the sidecar's answers as JSON, changes, and polling a file."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents import PinnedVersion, StateChange
from agents.sidecar import (
    HookResult,
    Sidecar,
    SidecarOptions,
)
from agents.testing import StaticAgent

WAIT = 5.0
OK = HookResult(True, "exit status 0")
FAIL = HookResult(False, "exit status 1", "boom")


class SwitchableAgent(StaticAgent):
    """A StaticAgent that starts in the state given (READY, STALE, CONNECTING)."""

    def __init__(self, *args: Any, state: str = "READY", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_state(state)


def static(**kwargs: Any) -> SwitchableAgent:
    return SwitchableAgent(
        {"new-ui": True, "mode": "read-only", "limit": 3},
        service="checkout",
        shedding=("SHEDDABLE_PLUS", 100),
        pinned_version="v1.4.2",
        **kwargs,
    )


def sidecar_for(agent: StaticAgent, **options: Any) -> Sidecar:
    return Sidecar(SidecarOptions(service="checkout", listen="127.0.0.1:0", **options), agent=agent)


def body(sidecar: Sidecar, target: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
    response = sidecar.handle(method, target)
    # What goes on the wire is JSON.
    return response.status, json.loads(response.encode())


def change(revision: int, **flags: tuple[Any, Any]) -> StateChange:
    return StateChange(revision=revision, flags=flags)


def pinned(version: str, reason: str = "known good") -> PinnedVersion:
    return PinnedVersion(version=version, reason=reason, since=None)


def pin_change(revision: int, old: PinnedVersion | None, new: PinnedVersion | None) -> StateChange:
    return StateChange(revision=revision, flags={}, pin=(old, new))


def wait_until(check: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``check`` (a file another thread writes) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.005)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return doc
