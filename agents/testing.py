"""An in-memory agent for service owners' own tests.

:class:`StaticAgent` has the read API of the real agent and answers from the same
immutable snapshot through the same functions, so a service behaves under it as
it does in production: ``enabled`` gives the default for a non-bool flag, numbers
come back as floats, ``should_shed`` follows the same table. Its setters stand in
for the on-call engineer: each one is a new revision, applied the way the real
agent applies a change from the server, and the ``on_change`` callbacks are
called with what changed. ``set_state`` stands in for the connection (a
control plane out of reach: ``STALE``) and calls the ``on_state`` callbacks.

    agent = StaticAgent({"new-ui": True}, service="checkout")
    app = create_app(agent)
    agent.set_flag("new-ui", False)          # the kill switch
    agent.set_shedding("SHEDDABLE", 100)     # every SHEDDABLE request shed
    agent.set_state("STALE")                 # the control plane out of reach

Unlike the real agent, it calls callbacks synchronously in the setter (in the
order they were registered) and lets their exceptions propagate, so that a test
sees them. Reads may run in other threads; setters are serialised by a lock.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TypeVar, overload

from agents import _codec, _shed, _state
from agents._state import Snapshot, StateChange
from agents._types import Criticality, FlagValue, PinnedVersion, SheddingLevel
from controlplane.api.v1 import agent_pb2, types_pb2

__all__ = ["StaticAgent"]

_T = TypeVar("_T")

_ACTOR = "agents.testing"
_REASON = "set by a test"
_STATES = ("CONNECTING", "READY", "STALE")


class StaticAgent:
    """The agent's read API over a state the test sets.

    Args:
        flags: Initial flags, in the service's own scope.
        service: The service name, as the real agent is given it.
        shedding: An initial shedding level ``(tier, percent)``.
        pinned_version: An initial pin.
        rand: The random source of ``should_shed`` for the tier itself (a
            callable returning floats in [0, 1)); pass a fixed one to make
            decisions deterministic.

    Raises:
        ValueError: An initial value is not a flag value, an unknown tier, or a
            percentage outside 0 to 100.
    """

    def __init__(
        self,
        flags: Mapping[str, FlagValue] | None = None,
        *,
        service: str = "test-service",
        shedding: tuple[Criticality | str, float] | None = None,
        pinned_version: str | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._service = service
        self._rand = rand
        self._lock = threading.RLock()
        self._callbacks: list[Callable[[StateChange], None]] = []
        self._state_callbacks: list[Callable[[str], object]] = []
        self._state = "READY"
        now = _now()
        msg = agent_pb2.Snapshot(
            revision=1, flags=[self._flag(name, v, now) for name, v in (flags or {}).items()]
        )
        if shedding is not None:
            msg.shedding.CopyFrom(self._shedding(*shedding, now=now))
        if pinned_version is not None:
            msg.pin.CopyFrom(self._pin(pinned_version, _REASON, now))
        self._snapshot = _codec.snapshot_from_proto(service, msg, now)

    # ------------------------------------------------------------ the real agent's API

    @property
    def state(self) -> str:
        """``"READY"`` (a static agent has its state from the start) until
        :meth:`set_state` says otherwise."""
        return self._state

    @property
    def revision(self) -> int:
        """The revision of the current state; each setter adds one."""
        return self._snapshot.revision

    def start(self) -> None:
        """Nothing to start; here so that code starting its agent runs unchanged."""

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether the state is ``READY``, at once (nothing would change it meanwhile)."""
        return self._state == "READY"

    def close(self) -> None:
        """Nothing to close; the agent keeps answering reads."""

    def enabled(self, name: str, default: bool = False) -> bool:
        """The flag's value if it is a bool, else ``default``."""
        return _state.enabled(self._snapshot, name, default)

    @overload
    def value(self, name: str) -> FlagValue | None: ...
    @overload
    def value(self, name: str, default: _T) -> FlagValue | _T: ...
    def value(self, name: str, default: object = None) -> object:
        """The flag's value of whatever kind (numbers as floats), or ``default``."""
        return _state.value(self._snapshot, name, default)

    def should_shed(self, criticality: Criticality | str, key: str | None = None) -> bool:
        """Whether to shed a request of this criticality; stable per ``key`` when given."""
        if key is None:
            return _shed.should_shed(self._snapshot, criticality, self._rand)
        return _shed.should_shed_key(self._snapshot, criticality, key)

    @property
    def pinned_version(self) -> PinnedVersion | None:
        """The pin in force, or None."""
        return self._snapshot.pin

    @property
    def shedding(self) -> SheddingLevel | None:
        """The shedding level in force (tier and percent), or None."""
        return self._snapshot.shedding

    @property
    def service(self) -> str:
        """The service this agent stands in for."""
        return self._snapshot.service

    @property
    def override_active(self) -> bool:
        """Always False: a static agent has no break-glass override file."""
        return False

    @property
    def override(self) -> None:
        """Always None (see ``override_active``)."""
        return None

    def on_change(self, callback: Callable[[StateChange], None]) -> Callable[[], None]:
        """Call ``callback`` with each change a service would see; returns a function
        that removes it (calling that twice is harmless)."""
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

    def on_state(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback`` with the new state whenever :meth:`set_state` changes
        it; returns a function that removes it (calling that twice is harmless)."""
        with self._lock:
            self._state_callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._state_callbacks:
                    self._state_callbacks.remove(callback)

        return remove

    # ------------------------------------------------------------ setters for tests

    def set_state(self, state: str) -> None:
        """Set the agent state (``CONNECTING``, ``READY`` or ``STALE``); the reads
        keep the state set so far, as the real agent's do. The ``on_state``
        callbacks are called when it changes.

        Raises:
            ValueError: ``state`` is none of the three.
        """
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}: one of {', '.join(_STATES)}")
        with self._lock:
            if state == self._state:
                return
            self._state = str(state)
            for callback in list(self._state_callbacks):
                callback(self._state)

    def set_flag(self, name: str, value: FlagValue) -> None:
        """Set a flag in the service's own scope (an int is stored as a number).

        Raises:
            ValueError: ``value`` is none of bool, number, string or JSON object.
        """
        now = _now()
        self._apply(agent_pb2.Change(flags_set=[self._flag(name, value, now)]), now)

    def clear_flag(self, name: str) -> None:
        """Remove the flag: reads give their default again."""
        ref = agent_pb2.FlagRef(scope=self._service, name=name)
        self._apply(agent_pb2.Change(flags_removed=[ref]), _now())

    def set_shedding(self, tier: Criticality | str, percent: float) -> None:
        """Shed every request less critical than ``tier`` and ``percent`` of the tier.

        Raises:
            ValueError: ``tier`` is not a tier name, or ``percent`` is not 0 to 100.
        """
        now = _now()
        self._apply(agent_pb2.Change(shedding=self._shedding(tier, percent, now=now)), now)

    def clear_shedding(self) -> None:
        """Stop shedding."""
        self._apply(agent_pb2.Change(shedding_removed=True), _now())

    def pin(self, version: str, reason: str = _REASON) -> None:
        """Pin the service to ``version``."""
        now = _now()
        self._apply(agent_pb2.Change(pin=self._pin(version, reason, now)), now)

    def unpin(self) -> None:
        """Remove the pin."""
        self._apply(agent_pb2.Change(pin_removed=True), _now())

    # ------------------------------------------------------------ internals

    def _apply(self, change: agent_pb2.Change, now: datetime) -> None:
        with self._lock:
            old: Snapshot = self._snapshot
            change.revision = old.revision + 1
            new = _codec.apply_change(old, change, now)
            self._snapshot = new
            delta = _state.diff(old, new)
            if delta.empty:
                return
            for callback in list(self._callbacks):
                callback(delta)

    def _flag(self, name: str, value: FlagValue, now: datetime) -> types_pb2.Flag:
        return types_pb2.Flag(
            scope=self._service,
            name=name,
            value=_codec.flag_value_to_proto(value),
            meta=_meta(_REASON, now),
        )

    def _shedding(
        self, tier: Criticality | str, percent: float, *, now: datetime
    ) -> types_pb2.Shedding:
        if isinstance(tier, str):
            # Strict where Criticality.parse is tolerant: a typo in a test is a bug.
            if tier not in Criticality.__members__:
                raise ValueError(
                    f"unknown tier {tier!r}: one of {', '.join(Criticality.__members__)}"
                )
            tier = Criticality[tier]
        return types_pb2.Shedding(
            service=self._service,
            tier=Criticality(tier).name,
            percent=percent,
            meta=_meta(_REASON, now),
        )

    def _pin(self, version: str, reason: str, now: datetime) -> types_pb2.Pin:
        return types_pb2.Pin(service=self._service, version=version, meta=_meta(reason, now))


def _now() -> datetime:
    return datetime.now(UTC)


def _meta(reason: str, now: datetime) -> types_pb2.Meta:
    msg = types_pb2.Meta(actor=_ACTOR, reason=reason)
    msg.set_at.FromDatetime(now)
    return msg
