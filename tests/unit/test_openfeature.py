"""The OpenFeature provider over a StaticAgent, used through the OpenFeature client API."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import EventDetails, ProviderEvent, ProviderEventDetails
from openfeature.exception import ErrorCode, ProviderNotReadyError
from openfeature.flag_evaluation import Reason
from openfeature.provider import FeatureProvider, ProviderStatus

from agents.openfeature import ControlPlaneProvider
from agents.testing import StaticAgent
from tests.helpers.agent_process import ROOT

WAIT = 5.0


class Events:
    """OpenFeature events a client's handlers received, in arrival order."""

    def __init__(self, client: Any, *kinds: ProviderEvent) -> None:
        self._queue: queue.Queue[tuple[ProviderEvent, EventDetails]] = queue.Queue()
        for kind in kinds:
            client.add_handler(kind, self._handler(kind))

    def _handler(self, kind: ProviderEvent) -> Callable[[EventDetails], None]:
        return lambda details: self._queue.put((kind, details))

    def next(self, timeout: float = WAIT) -> tuple[ProviderEvent, EventDetails]:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s") from None

    def expect(self, kind: ProviderEvent) -> EventDetails:
        got, details = self.next()
        assert got is kind, (got, details)
        return details


@pytest.fixture(autouse=True)
def clean_api() -> Iterator[None]:
    yield
    api.shutdown()


def test_values_of_every_kind_resolve_as_static_with_revision_and_scope() -> None:
    agent = StaticAgent(
        {"new-ui": True, "mode": "read-only", "limit": 3, "ratio": 0.25, "cfg": {"a": [1, 2]}},
        service="checkout",
    )
    api.set_provider_and_wait(ControlPlaneProvider(agent))
    client = api.get_client()

    details = client.get_boolean_details("new-ui", False)
    assert (details.value, details.reason, details.error_code) == (True, Reason.STATIC, None)
    assert details.flag_metadata == {"revision": 1, "scope": "checkout", "agent_state": "READY"}
    assert client.get_string_value("mode", "full") == "read-only"
    limit = client.get_integer_value("limit", 0)
    assert limit == 3 and type(limit) is int
    assert client.get_float_value("limit", 0.0) == 3.0
    assert client.get_float_value("ratio", 1.0) == 0.25
    assert client.get_object_value("cfg", {}) == {"a": [1, 2]}
    assert client.get_object_details("cfg", {}).reason == Reason.STATIC
    # The evaluation context changes nothing: there is no targeting.
    ctx = EvaluationContext(targeting_key="user-1", attributes={"country": "NL"})
    assert client.get_boolean_value("new-ui", False, ctx) is True


def test_a_flag_not_set_gives_the_default_with_flag_not_found() -> None:
    api.set_provider_and_wait(ControlPlaneProvider(StaticAgent({"other": True})))
    details = api.get_client().get_string_details("mode", "full")
    assert details.value == "full"
    assert details.reason == Reason.DEFAULT
    assert details.error_code == ErrorCode.FLAG_NOT_FOUND
    assert details.error_message is not None and "mode" in details.error_message


@pytest.mark.parametrize(
    ("value", "getter", "default"),
    [
        ("read-only", "get_boolean_details", True),
        (True, "get_string_details", "full"),
        (2.5, "get_integer_details", 7),
        (True, "get_integer_details", 7),
        (True, "get_float_details", 1.5),
        ("3", "get_float_details", 1.5),
        ({"a": 1}, "get_string_details", "full"),
        ("x", "get_object_details", {"d": 1}),
    ],
    ids=repr,
)
def test_a_flag_of_another_type_is_a_type_mismatch(value: Any, getter: str, default: Any) -> None:
    api.set_provider_and_wait(ControlPlaneProvider(StaticAgent({"flag": value})))
    details = getattr(api.get_client(), getter)("flag", default)
    assert details.value == default
    assert details.reason == Reason.ERROR
    assert details.error_code == ErrorCode.TYPE_MISMATCH


def test_a_flag_change_emits_configuration_changed_with_the_names() -> None:
    agent = StaticAgent({"new-ui": True}, service="checkout")
    api.set_provider_and_wait(ControlPlaneProvider(agent))
    client = api.get_client()
    events = Events(client, ProviderEvent.PROVIDER_CONFIGURATION_CHANGED)
    agent.set_flag("new-ui", False)
    details = events.expect(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED)
    assert details.flags_changed == ["new-ui"]
    assert details.metadata == {"revision": 2}
    assert details.provider_name == "controlplane"
    assert client.get_boolean_value("new-ui", True) is False


class Recorder:
    """What the provider emits, recorded as the SDK's ``attach`` would receive it:
    synchronously, in the thread that emits."""

    def __init__(self, provider: ControlPlaneProvider) -> None:
        self.emitted: list[tuple[ProviderEvent, ProviderEventDetails]] = []
        provider.attach(self._record)

    def _record(
        self, _: FeatureProvider, event: ProviderEvent, details: ProviderEventDetails
    ) -> None:
        self.emitted.append((event, details))

    @property
    def kinds(self) -> list[ProviderEvent]:
        return [event for event, _ in self.emitted]


def test_events_are_emitted_for_flag_changes_only_and_only_between_initialize_and_shutdown() -> (
    None
):
    agent = StaticAgent({"new-ui": True})
    provider = ControlPlaneProvider(agent)
    # The SDK attaches, then initializes: StaticAgent calls back synchronously.
    recorder = Recorder(provider)
    agent.set_flag("new-ui", False)  # before initialize: READY comes first
    provider.initialize(EvaluationContext())
    agent.set_shedding("SHEDDABLE", 50)  # no flag changed
    agent.pin("v1.4.2")
    agent.set_flag("mode", "lite")
    agent.clear_flag("new-ui")
    provider.shutdown()
    agent.set_flag("mode", "full")  # after shutdown
    agent.set_state("STALE")
    assert [(e, d.flags_changed, d.metadata) for e, d in recorder.emitted] == [
        (ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, ["mode"], {"revision": 5}),
        (ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, ["new-ui"], {"revision": 6}),
    ]


def test_the_provider_starts_no_thread_of_its_own() -> None:
    agent = StaticAgent({"new-ui": True})
    provider = ControlPlaneProvider(agent)
    recorder = Recorder(provider)
    before = set(threading.enumerate())
    provider.initialize(EvaluationContext())
    agent.set_state("STALE")
    agent.set_flag("new-ui", False)
    agent.set_state("READY")
    assert set(threading.enumerate()) - before == set()
    provider.shutdown()
    assert set(threading.enumerate()) - before == set()
    assert recorder.kinds == [
        ProviderEvent.PROVIDER_STALE,
        ProviderEvent.PROVIDER_CONFIGURATION_CHANGED,
        ProviderEvent.PROVIDER_READY,
    ]


def test_state_events_are_emitted_within_set_state_in_its_thread() -> None:
    agent = StaticAgent({"new-ui": True})
    provider = ControlPlaneProvider(agent)
    recorder = Recorder(provider)
    provider.initialize(EvaluationContext())
    assert recorder.emitted == []  # the SDK announces READY itself

    agent.set_state("STALE")
    assert recorder.kinds == [ProviderEvent.PROVIDER_STALE]  # no interval to wait for
    assert recorder.emitted[-1][1].metadata == {"revision": 1}
    agent.set_state("READY")
    assert recorder.kinds == [ProviderEvent.PROVIDER_STALE, ProviderEvent.PROVIDER_READY]
    details = recorder.emitted[-1][1]
    assert (details.message, details.metadata) == (
        "connected to the control plane",
        {"revision": 1},
    )
    provider.shutdown()


def test_stale_and_ready_events_follow_the_agent_state() -> None:
    agent = StaticAgent({"new-ui": False}, service="checkout")
    api.set_provider_and_wait(ControlPlaneProvider(agent))
    client = api.get_client()
    events = Events(client, ProviderEvent.PROVIDER_STALE, ProviderEvent.PROVIDER_READY)
    events.expect(ProviderEvent.PROVIDER_READY)  # a handler added while READY runs at once
    assert client.get_provider_status() is ProviderStatus.READY

    agent.set_state("STALE")
    # The status is the SDK's as soon as set_state returns; the handler runs in its executor.
    assert client.get_provider_status() is ProviderStatus.STALE
    details = events.expect(ProviderEvent.PROVIDER_STALE)
    assert details.message is not None and "last known state (revision 1)" in details.message
    # Still served: fail static, from memory or the cache file.
    stale = client.get_boolean_details("new-ui", True)
    assert (stale.value, stale.reason) == (False, Reason.CACHED)
    assert stale.flag_metadata["agent_state"] == "STALE"

    agent.set_state("READY")
    assert client.get_provider_status() is ProviderStatus.READY
    events.expect(ProviderEvent.PROVIDER_READY)
    assert client.get_boolean_details("new-ui", True).reason == Reason.STATIC


def test_an_agent_stale_from_its_cache_at_start_is_served_and_announced_stale() -> None:
    agent = StaticAgent({"new-ui": False})
    agent.set_state("STALE")
    provider = ControlPlaneProvider(agent)
    stale = threading.Event()
    api.add_handler(ProviderEvent.PROVIDER_STALE, lambda _: stale.set())
    # Returns at once: the cached state is there to serve. Its return means READY
    # to the SDK, which says so after it.
    api.set_provider_and_wait(provider)
    client = api.get_client()
    assert client.get_provider_status() is ProviderStatus.READY
    # The first evaluation serves the cached value and has PROVIDER_STALE follow.
    assert client.get_boolean_details("new-ui", True).reason == Reason.CACHED
    assert stale.wait(WAIT)
    assert client.get_provider_status() is ProviderStatus.STALE
    assert client.get_boolean_details("new-ui", True).reason == Reason.CACHED


def test_an_agent_stale_at_initialize_is_announced_stale_at_its_next_callback() -> None:
    agent = StaticAgent({"new-ui": False})
    agent.set_state("STALE")
    provider = ControlPlaneProvider(agent)
    recorder = Recorder(provider)
    provider.initialize(EvaluationContext())
    assert recorder.emitted == []
    agent.set_flag("new-ui", True)  # a time-boxed value expiring, say: no new state
    assert recorder.kinds == [
        ProviderEvent.PROVIDER_STALE,
        ProviderEvent.PROVIDER_CONFIGURATION_CHANGED,
    ]
    assert provider.resolve_boolean_details("new-ui", False).reason == Reason.CACHED
    assert len(recorder.emitted) == 2  # announced once
    provider.shutdown()


def test_an_agent_stale_at_initialize_is_announced_stale_once_at_the_next_evaluation() -> None:
    agent = StaticAgent({"new-ui": False})
    agent.set_state("STALE")
    provider = ControlPlaneProvider(agent)
    recorder = Recorder(provider)
    provider.initialize(EvaluationContext())
    assert recorder.emitted == []
    for _ in range(2):
        details = provider.resolve_boolean_details("new-ui", True)
        assert (details.value, details.reason) == (False, Reason.CACHED)
        assert recorder.kinds == [ProviderEvent.PROVIDER_STALE]
    provider.shutdown()
    agent.set_state("READY")
    provider.resolve_boolean_details("new-ui", True)  # after shutdown: nothing to announce
    assert recorder.kinds == [ProviderEvent.PROVIDER_STALE]


def test_without_state_initialize_fails_not_ready_and_ready_follows() -> None:
    agent = StaticAgent({"new-ui": False})
    agent.set_state("CONNECTING")
    provider = ControlPlaneProvider(agent, ready_timeout=0.1)
    with pytest.raises(ProviderNotReadyError):
        api.set_provider_and_wait(provider)
    client = api.get_client()
    # A handler added while the status is ERROR runs at once with PROVIDER_ERROR.
    events = Events(client, ProviderEvent.PROVIDER_ERROR, ProviderEvent.PROVIDER_READY)
    events.expect(ProviderEvent.PROVIDER_ERROR)
    assert client.get_provider_status() is ProviderStatus.ERROR
    details = client.get_boolean_details("new-ui", True)
    assert (details.value, details.error_code) == (True, ErrorCode.PROVIDER_NOT_READY)

    agent.set_state("READY")
    events.expect(ProviderEvent.PROVIDER_READY)
    assert client.get_provider_status() is ProviderStatus.READY
    assert client.get_boolean_value("new-ui", True) is False


class Watched(StaticAgent):
    """A StaticAgent that tells when its state is read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read = threading.Event()

    @property
    def state(self) -> str:
        self.read.set()
        return super().state


def initialize_waiting(
    provider: ControlPlaneProvider, agent: Watched
) -> tuple[threading.Thread, list[object]]:
    """``provider.initialize`` in a thread of its own, once it waits for a state; the
    list gets None or the exception."""
    outcome: list[object] = []

    def run() -> None:
        try:
            provider.initialize(EvaluationContext())
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    agent.read.clear()
    thread = threading.Thread(target=run, name="test-initialize")
    thread.start()
    # Read once subscribed, with the provider's lock held: a callback from now on
    # gets that lock only once initialize waits, having let go of it.
    assert agent.read.wait(WAIT)
    return thread, outcome


def test_initialize_returns_when_the_agent_gets_a_state() -> None:
    agent = Watched({"new-ui": True})
    agent.set_state("CONNECTING")
    provider = ControlPlaneProvider(agent, ready_timeout=60.0)
    recorder = Recorder(provider)
    thread, outcome = initialize_waiting(provider, agent)
    agent.set_state("STALE")  # booted from its cache
    thread.join(WAIT)
    assert not thread.is_alive() and outcome == [None]
    assert recorder.emitted == []  # READY is the SDK's to announce
    provider.shutdown()


def test_a_state_set_while_subscribing_is_not_missed() -> None:
    class Connecting(StaticAgent):
        """Its state is set as the provider subscribes, before the callback is in."""

        def on_state(self, callback: Callable[[str], object]) -> Callable[[], None]:
            self.set_state("READY")
            return super().on_state(callback)

    agent = Connecting({"new-ui": True})
    agent.set_state("CONNECTING")
    provider = ControlPlaneProvider(agent, ready_timeout=WAIT)
    provider.initialize(EvaluationContext())  # raises if it read the state too early
    provider.shutdown()


def test_shutdown_stops_a_waiting_initialize_and_initialize_works_again() -> None:
    agent = Watched({"new-ui": True})
    agent.set_state("CONNECTING")
    provider = ControlPlaneProvider(agent, ready_timeout=60.0)
    recorder = Recorder(provider)
    thread, outcome = initialize_waiting(provider, agent)
    provider.shutdown()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ProviderNotReadyError)
    assert agent._state_callbacks == [] and agent._callbacks == []  # unsubscribed

    agent.set_state("READY")  # heard by no one
    provider.initialize(EvaluationContext())
    agent.set_state("STALE")
    assert recorder.kinds == [ProviderEvent.PROVIDER_STALE]
    provider.shutdown()


async def test_async_evaluation_resolves_the_same() -> None:
    api.set_provider_and_wait(ControlPlaneProvider(StaticAgent({"mode": "lite"})))
    client = api.get_client()
    details = await client.get_string_details_async("mode", "full")
    assert (details.value, details.reason) == ("lite", Reason.STATIC)


def test_the_sdk_without_the_extra_never_imports_openfeature() -> None:
    code = (
        "import sys, agents, agents.testing, agents.sidecar; "
        "from agents import Agent; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'openfeature'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
