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

Resolution reads the agent's snapshot: no I/O, and no lock unless the agent's
state is one the SDK has not been told of yet (see Lifecycle). The control plane has
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

They are emitted from the agent's callbacks (``on_change``, ``on_state``), in
the agents' thread (or the ``AsyncAgent``'s loop), where emitting only queues
the OpenFeature SDK's handlers; a state the SDK has not been told of yet is also
announced by the next evaluation (see Lifecycle). The provider starts no thread
of its own and has no polling interval (no ``state_interval`` argument, no
``STATE_INTERVAL``): while the agent's state stays the same it wakes for nothing.

Lifecycle (the OpenFeature SDK calls these):

- ``initialize`` (from ``set_provider``, in a thread of the SDK's, or in the
  caller's with ``set_provider_and_wait``) subscribes to the agent's changes and
  states, then waits up to ``ready_timeout`` seconds for the agent to have a
  state: ``READY`` or ``STALE`` (booted from its cache). It returns at once
  when it has one, and the SDK then marks the provider ``READY``. Without a
  state by then it raises ``ProviderNotReadyError`` (the SDK marks the provider
  ``ERROR``; evaluations give their defaults with ``PROVIDER_NOT_READY``) and
  the agent keeps trying: ``PROVIDER_READY`` follows when it connects.
- A ``STALE`` agent is first announced ``READY`` by the SDK (in OpenFeature an
  ``initialize`` that returns means ``READY``, and the SDK says so after it
  returned); ``PROVIDER_STALE`` follows at the first evaluation, or the first
  callback from the agent (a change, a new state), after that. The provider
  has no thread of its own to run anything later on: until then the status
  says ``READY``, while each evaluation already says ``CACHED`` with
  ``agent_state`` ``STALE``.
- ``shutdown`` unsubscribes (the agent keeps running), and stops an
  ``initialize`` still waiting; ``initialize`` may be called again afterwards.
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

_SERVING = ("READY", "STALE")
"""The agent states with a state to serve."""

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

    def on_state(self, callback: Callable[[str], object]) -> Callable[[], None]: ...


class ControlPlaneProvider(AbstractProvider):
    """The OpenFeature provider of the control plane's flags (see the module docstring).

    Args:
        agent: A started (or soon started) agent of the service.
        ready_timeout: Seconds ``initialize`` waits for the agent to have a state.
    """

    def __init__(self, agent: ProviderAgent, *, ready_timeout: float = READY_TIMEOUT) -> None:
        super().__init__()
        self.agent = agent
        self.ready_timeout = ready_timeout
        # Serialises subscribing and unsubscribing; never taken by the agent's
        # callbacks, and never held while waiting.
        self._lifecycle = threading.Lock()
        # Guards what follows, wakes a waiting initialize, and is held while
        # emitting so that events leave in the order of the states they announce.
        # Taken in the agent's callbacks (under the agent's own lock for a
        # StaticAgent): with it held the agent is only read (state, snapshot).
        self._cond = threading.Condition()
        # The agent's unsubscribe functions while subscribed: from initialize to shutdown.
        self._subscription: tuple[Callable[[], None], ...] | None = None
        # The state the SDK was last told of (None: not initialized, nothing emitted).
        self._announced: str | None = None

    # ------------------------------------------------------------ lifecycle

    def get_metadata(self) -> Metadata:
        return Metadata(name=PROVIDER_NAME)

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Subscribe, wait for a state (see the module docstring).

        Raises:
            ProviderNotReadyError: The agent has no state after ``ready_timeout``,
                or ``shutdown`` came first.
        """
        with self._lifecycle:
            subscription = self._subscription
            if subscription is None:
                # Subscribed first, read after (in the wait): a state set in
                # between wakes the wait, none is missed.
                subscription = (
                    self.agent.on_state(self._state_changed),
                    self.agent.on_change(self._changed),
                )
                with self._cond:
                    self._subscription = subscription
        with self._cond:
            has_state = self._cond.wait_for(
                lambda: self._subscription is not subscription or self._state() in _SERVING,
                self.ready_timeout,
            )
            if self._subscription is not subscription:
                raise ProviderNotReadyError("the provider was shut down during initialize")
            # The SDK announces READY once this returns, ERROR if it raises (a
            # STALE agent is announced READY: PROVIDER_STALE follows at the next
            # evaluation or callback, see _follow).
            self._announced = "READY" if has_state else "CONNECTING"
            if not has_state:
                raise ProviderNotReadyError(
                    f"the agent has no state from the control plane after {self.ready_timeout:g}s "
                    "(it keeps trying; PROVIDER_READY follows)"
                )

    def shutdown(self) -> None:
        """Unsubscribe from the agent (it keeps running) and stop a waiting ``initialize``."""
        with self._lifecycle:
            with self._cond:
                subscription, self._subscription = self._subscription, None
                self._announced = None
                self._cond.notify_all()
            for unsubscribe in subscription or ():
                unsubscribe()

    # ------------------------------------------------------------ events

    def _state(self) -> str:
        return str(self.agent.state)

    def _state_changed(self, _state: str) -> None:
        # The agent's thread (or loop). The state is read again rather than
        # taken from the argument: callbacks may run in two threads (Agent.start
        # loading the cache, the agents' thread connecting), and the last one
        # to take the lock then reads the last state.
        self._follow()

    def _follow(self) -> None:
        """Wake a waiting ``initialize``; emit READY or STALE if the agent's state is
        not the one the SDK was last told of."""
        with self._cond:
            self._cond.notify_all()
            announced = self._announced
            if announced is None:
                return  # not initialized: initialize decides what the SDK announces
            state = self._state()
            if state == announced or state not in _SERVING:
                return
            self._announced = state
            self._emit_state(state)

    def _changed(self, change: StateChange) -> None:
        # The agent's thread (or loop): emitting only queues the SDK's handlers.
        self._follow()
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
        state = self._state()
        announced = self._announced
        if state != announced and announced is not None and state in _SERVING:
            # A state the SDK was not told of yet: a STALE agent announced READY
            # by the SDK after initialize, or a callback still on its way.
            self._follow()
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
