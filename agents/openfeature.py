"""An OpenFeature provider over the agent: our flags for services already on OpenFeature.

    from openfeature import api
    from agents import Agent
    from agents.openfeature import ControlPlaneProvider

    agent = Agent("checkout", ["10.0.0.5:50051"], cache_path="/var/cache/checkout.json",
                  tls_ca="/etc/controlplane/ca.pem", token_file="/run/secrets/cp-token")
    agent.start()
    api.set_provider(ControlPlaneProvider(agent))
    client = api.get_client()
    if client.get_boolean_value("new-checkout", True): ...

Needs ``openfeature-sdk`` (the ``openfeature`` extra); nothing else in the SDK
imports this module. The provider does not own the agent: start it before or
after ``set_provider`` and close it yourself; the provider's ``shutdown`` only
lets go of it.

Resolution reads the agent's snapshot: no lock, no I/O. The control plane has
no targeting: the evaluation context is ignored and every evaluation of a flag
gives the same value at one revision.

==============================  ==================  =====================================
the flag                        reason              error code
==============================  ==================  =====================================
set, agent READY                ``STATIC``          none
set, agent STALE                ``CACHED``          none: the last known value, kept in
                                                    memory and in the cache file while no
                                                    server answers (fail static: a lost
                                                    connection never clears a mitigation)
not set                         ``DEFAULT``         ``FLAG_NOT_FOUND`` (the default value)
of another type                 ``ERROR``           ``TYPE_MISMATCH`` (the default value)
agent CONNECTING (no state)     ``ERROR``           ``PROVIDER_NOT_READY`` (the default)
==============================  ==================  =====================================

``STATIC`` because the value is the control plane's current one, the same for
every context; ``CACHED`` rather than ``STALE`` because the value is not
doubtful, only possibly behind: the provider's status (``STALE``, with a
``PROVIDER_STALE`` event) says that the connection is lost. Types: flags hold
booleans, strings, numbers and JSON objects. Numbers are floats: an integer
evaluation accepts a whole number (``3.0`` gives ``3``) and is a type mismatch
for anything else (``2.5``); a float evaluation accepts every number; a boolean
is never a number. Each resolution's ``flag_metadata`` carries the ``revision``,
the ``scope`` the value comes from (``global`` or the service), the
``agent_state`` and, for a time-boxed value, ``expires_at``.

Events:

- ``PROVIDER_CONFIGURATION_CHANGED`` when flags change (a change from the
  server, a time-boxed value expiring), with ``flags_changed`` (the names) and
  ``metadata["revision"]``; a change of shedding or pin alone is no flag change.
- ``PROVIDER_STALE`` when the agent goes ``STALE``, ``PROVIDER_READY`` when it is
  ``READY`` again.

The agent reports changes to callbacks but its state (READY, STALE) only to
reads: a watcher thread reads it every ``state_interval`` seconds (default
0.05) and emits on a transition.

Lifecycle (the OpenFeature SDK calls these):

- ``initialize`` (from ``set_provider``, in a thread of the SDK's, or in the
  caller's with ``set_provider_and_wait``) starts the watcher, subscribes to
  changes, and waits up to ``ready_timeout`` seconds for the agent to have a
  state: ``READY`` or ``STALE`` (booted from its cache). It returns at once
  when it has one; the SDK then marks the provider ``READY``, and a ``STALE``
  agent's ``PROVIDER_STALE`` follows within ``state_interval``. Without a state
  by then it raises ``ProviderNotReadyError`` (the SDK marks the provider
  ``ERROR``; evaluations give their defaults with ``PROVIDER_NOT_READY``) and
  the agent keeps trying: ``PROVIDER_READY`` follows when it connects.
- ``shutdown`` unsubscribes and stops the watcher; ``initialize`` may be called
  again afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import ErrorCode, ProviderNotReadyError
from openfeature.flag_evaluation import FlagMetadata, FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

from agents._state import Snapshot, StateChange

__all__ = ["ControlPlaneProvider"]

PROVIDER_NAME = "controlplane"
READY_TIMEOUT = 5.0
"""Seconds ``initialize`` waits for the agent to have a state."""
STATE_INTERVAL = 0.05
"""Seconds between the watcher's reads of the agent state."""

_T = TypeVar("_T")
_MISSING = object()
_ObjectValue = Sequence[FlagValueType] | Mapping[str, FlagValueType]


class ProviderAgent(Protocol):
    """What the provider needs of an agent: :class:`agents.Agent`,
    :class:`agents.AsyncAgent` or :class:`agents.testing.StaticAgent`.

    It lives in the SDK's package and reads the agent's immutable snapshot
    itself, so that value, scope and revision of one resolution come from one
    and the same revision.
    """

    _snapshot: Snapshot

    @property
    def state(self) -> str: ...

    def on_change(self, callback: Callable[[StateChange], None]) -> Callable[[], None]: ...


class ControlPlaneProvider(AbstractProvider):
    """The OpenFeature provider of the control plane's flags (see the module docstring).

    Args:
        agent: A started (or soon started) agent of the service.
        ready_timeout: Seconds ``initialize`` waits for the agent to have a state.
        state_interval: Seconds between the watcher's reads of the agent state.
    """

    def __init__(
        self,
        agent: ProviderAgent,
        *,
        ready_timeout: float = READY_TIMEOUT,
        state_interval: float = STATE_INTERVAL,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.ready_timeout = ready_timeout
        self.state_interval = state_interval
        self._cond = threading.Condition()
        self._seen = str(agent.state)
        # The state the SDK was last told of (None: not initialized, nothing emitted).
        self._announced: str | None = None
        self._watcher: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------ lifecycle

    def get_metadata(self) -> Metadata:
        return Metadata(name=PROVIDER_NAME)

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Subscribe, start the watcher, wait for a state (see the module docstring).

        Raises:
            ProviderNotReadyError: The agent has no state after ``ready_timeout``.
        """
        with self._cond:
            if self._watcher is None:
                self._stop = threading.Event()
                self._unsubscribe = self.agent.on_change(self._changed)
                self._seen = str(self.agent.state)
                self._watcher = threading.Thread(
                    target=self._watch,
                    args=(self._stop,),
                    name="controlplane-openfeature-state",
                    daemon=True,
                )
                self._watcher.start()
            has_state = self._cond.wait_for(
                lambda: self._seen in ("READY", "STALE"), self.ready_timeout
            )
            # The SDK announces READY once this returns, ERROR if it raises; a
            # STALE agent is announced as READY then, and the watcher follows
            # with PROVIDER_STALE.
            self._announced = "READY" if has_state else "CONNECTING"
            if not has_state:
                raise ProviderNotReadyError(
                    f"the agent has no state from the control plane after {self.ready_timeout:g}s "
                    "(it keeps trying; PROVIDER_READY follows)"
                )

    def shutdown(self) -> None:
        """Unsubscribe from the agent and stop the watcher (the agent keeps running)."""
        with self._cond:
            stop, watcher, unsubscribe = self._stop, self._watcher, self._unsubscribe
            self._stop = self._watcher = self._unsubscribe = None
            self._announced = None
        if unsubscribe is not None:
            unsubscribe()
        if stop is not None:
            stop.set()
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join()

    # ------------------------------------------------------------ events

    def _changed(self, change: StateChange) -> None:
        # The agent's thread (or loop): emitting only queues the SDK's handlers.
        if not change.flags:
            return
        with self._cond:
            if self._announced is None:
                return  # not initialized yet: READY comes first
        self.emit_provider_configuration_changed(
            ProviderEventDetails(
                flags_changed=sorted(change.flags), metadata={"revision": change.revision}
            )
        )

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.state_interval):
            state = str(self.agent.state)
            with self._cond:
                if state != self._seen:
                    self._seen = state
                    self._cond.notify_all()
                announced = self._announced
                emit = announced is not None and state != announced and state != "CONNECTING"
                if emit:
                    self._announced = state
            if emit:
                self._emit_state(state)

    def _emit_state(self, state: str) -> None:
        revision = self.agent._snapshot.revision
        if state == "READY":
            self.emit_provider_ready(
                ProviderEventDetails(
                    message="connected to the control plane", metadata={"revision": revision}
                )
            )
        else:
            self.emit_provider_stale(
                ProviderEventDetails(
                    message=(
                        "no control server reachable: serving the last known state "
                        f"(revision {revision})"
                    ),
                    metadata={"revision": revision},
                )
            )

    # ------------------------------------------------------------ resolution

    def resolve_boolean_details(
        self,
        flag_key: str,
        default_value: bool,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, _as_bool, "a boolean")

    def resolve_string_details(
        self,
        flag_key: str,
        default_value: str,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, _as_str, "a string")

    def resolve_integer_details(
        self,
        flag_key: str,
        default_value: int,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, _as_int, "an integer")

    def resolve_float_details(
        self,
        flag_key: str,
        default_value: float,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, default_value, _as_float, "a number")

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: _ObjectValue,
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[_ObjectValue]:
        return self._resolve(flag_key, default_value, _as_object, "a JSON object")

    def _resolve(
        self,
        key: str,
        default: _T,
        convert: Callable[[object], _T | None],
        wanted: str,
    ) -> FlagResolutionDetails[_T]:
        snapshot = self.agent._snapshot
        state = str(self.agent.state)
        if state == "CONNECTING":
            return FlagResolutionDetails(
                value=default,
                reason=Reason.ERROR,
                error_code=ErrorCode.PROVIDER_NOT_READY,
                error_message="no state from the control plane yet",
            )
        raw = snapshot.flags.get(key, _MISSING)
        if raw is _MISSING:
            return FlagResolutionDetails(
                value=default,
                reason=Reason.DEFAULT,
                error_code=ErrorCode.FLAG_NOT_FOUND,
                error_message=f"flag {key!r} is not set for service {snapshot.service!r}",
                flag_metadata={"revision": snapshot.revision, "agent_state": state},
            )
        value = convert(raw)
        if value is None:
            return FlagResolutionDetails(
                value=default,
                reason=Reason.ERROR,
                error_code=ErrorCode.TYPE_MISMATCH,
                error_message=f"flag {key!r} is {_describe(raw)}, not {wanted}",
                flag_metadata={"revision": snapshot.revision, "agent_state": state},
            )
        return FlagResolutionDetails(
            value=value,
            reason=Reason.STATIC if state == "READY" else Reason.CACHED,
            flag_metadata=_metadata(snapshot, key, state),
        )


def _metadata(snapshot: Snapshot, key: str, state: str) -> FlagMetadata:
    scope = snapshot.flag_scopes.get(key, "")
    metadata: dict[str, bool | int | float | str] = {
        "revision": snapshot.revision,
        "scope": scope,
        "agent_state": state,
    }
    record = snapshot.flag_records.get((scope, key))
    if record is not None and record.meta.expires_at is not None:
        metadata["expires_at"] = record.meta.expires_at.isoformat()
    return metadata


def _as_bool(raw: object) -> bool | None:
    return raw if isinstance(raw, bool) else None


def _as_str(raw: object) -> str | None:
    return raw if isinstance(raw, str) else None


def _as_float(raw: object) -> float | None:
    if isinstance(raw, bool) or not isinstance(raw, float | int):
        return None
    return float(raw)


def _as_int(raw: object) -> int | None:
    number = _as_float(raw)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _as_object(raw: object) -> _ObjectValue | None:
    return raw if isinstance(raw, dict) else None


def _describe(raw: object) -> str:
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, float | int):
        return f"the number {raw:g}"
    if isinstance(raw, str):
        return "a string"
    return "a JSON object"
