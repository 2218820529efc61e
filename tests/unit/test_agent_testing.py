"""The in-memory StaticAgent behaves like the real agent's reads and calls back on change."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from agents import Criticality, PinnedVersion, SheddingLevel, StateChange
from agents.testing import StaticAgent


def recorder(agent: StaticAgent) -> list[StateChange]:
    seen: list[StateChange] = []
    agent.on_change(seen.append)
    return seen


def test_reads_answer_from_the_initial_state() -> None:
    agent = StaticAgent(
        {"new-ui": True, "mode": "lite", "limit": 3, "cfg": {"a": [1, 2]}},
        service="checkout",
        shedding=("SHEDDABLE_PLUS", 100),
        pinned_version="v1.4.2",
    )
    assert agent.state == "READY"
    assert agent.enabled("new-ui") is True
    assert agent.value("mode", "full") == "lite"
    # Numbers come back as floats, as from the server.
    limit = agent.value("limit")
    assert limit == 3.0 and isinstance(limit, float)
    assert agent.value("cfg") == {"a": [1, 2]}
    assert agent.value("missing") is None
    assert agent.value("missing", "full") == "full"
    assert agent.enabled("missing") is False
    assert agent.enabled("missing", default=True) is True
    # A string flag is not a kill switch: the default, as the real agent.
    assert agent.enabled("mode", default=True) is True
    assert agent.should_shed("SHEDDABLE") is True
    assert agent.should_shed(Criticality.SHEDDABLE_PLUS) is True
    assert agent.should_shed("CRITICAL") is False
    pinned = agent.pinned_version
    assert pinned is not None and pinned.version == "v1.4.2"


@pytest.mark.parametrize(
    "odd", [["x"], {"a": 1}, float("nan"), object(), None, b"SHEDDABLE"], ids=repr
)
def test_reads_never_raise_whatever_they_are_given(odd: Any) -> None:
    agent = StaticAgent({"on": True}, shedding=("CRITICAL", 100))
    # An odd criticality counts as CRITICAL: shed at a CRITICAL tier of 100 %.
    assert agent.should_shed(odd) is True
    assert agent.should_shed(odd, key="user-1") is True
    assert agent.should_shed("CRITICAL_PLUS", key=odd) is False
    assert agent.should_shed("SHEDDABLE", key=odd) is True
    assert agent.enabled(odd, default=True) is True
    assert agent.value(odd, "dflt") == "dflt"
    relaxed = StaticAgent(shedding=("SHEDDABLE", 100))
    assert relaxed.should_shed(odd) is False


def test_start_wait_and_close_are_harmless() -> None:
    agent = StaticAgent({"a": True})
    agent.start()
    assert agent.wait_ready(timeout=0) is True
    agent.close()
    assert agent.enabled("a") is True


def test_flags_set_and_cleared_call_back_with_what_changed() -> None:
    agent = StaticAgent({"new-ui": True})
    seen = recorder(agent)
    start = agent.revision

    agent.set_flag("new-ui", False)
    assert agent.enabled("new-ui", default=True) is False
    agent.set_flag("mode", "read-only")
    agent.clear_flag("mode")
    assert agent.value("mode", "full") == "full"

    assert [c.flags for c in seen] == [
        {"new-ui": (True, False)},
        {"mode": (None, "read-only")},
        {"mode": ("read-only", None)},
    ]
    assert [c.revision for c in seen] == [start + 1, start + 2, start + 3]
    assert agent.revision == start + 3


def test_setting_what_is_already_set_calls_nothing() -> None:
    agent = StaticAgent({"a": True})
    seen = recorder(agent)
    agent.set_flag("a", True)
    agent.clear_flag("never-set")
    agent.clear_shedding()
    agent.unpin()
    assert seen == []


def test_shedding_level_set_and_cleared() -> None:
    draws = iter([0.1, 0.5, 0.99, 0.99])
    agent = StaticAgent(rand=lambda: next(draws))
    seen = recorder(agent)
    assert agent.should_shed("SHEDDABLE") is False

    agent.set_shedding(Criticality.SHEDDABLE, 30)
    assert agent.should_shed("SHEDDABLE") is True  # draw 0.1 < 0.3
    assert agent.should_shed("SHEDDABLE") is False  # draw 0.5
    assert agent.should_shed("SHEDDABLE_PLUS") is False  # no draw taken

    agent.set_shedding("CRITICAL", 100)
    assert agent.should_shed("SHEDDABLE_PLUS") is True
    assert agent.should_shed("CRITICAL") is True
    assert agent.should_shed("unknown-counts-as-critical") is True
    assert agent.should_shed("CRITICAL_PLUS") is False

    agent.clear_shedding()
    assert agent.should_shed("SHEDDABLE") is False
    # One draw per request of the tier itself, none for the others.
    assert next(draws, None) is None
    assert [c.shedding for c in seen] == [
        (None, SheddingLevel(Criticality.SHEDDABLE, 30.0)),
        (SheddingLevel(Criticality.SHEDDABLE, 30.0), SheddingLevel(Criticality.CRITICAL, 100.0)),
        (SheddingLevel(Criticality.CRITICAL, 100.0), None),
    ]


def test_should_shed_with_a_key_is_stable() -> None:
    agent = StaticAgent(shedding=("SHEDDABLE", 50))
    keys = [f"session-{i}" for i in range(2_000)]
    first = [agent.should_shed("SHEDDABLE", key=k) for k in keys]
    assert [agent.should_shed("SHEDDABLE", key=k) for k in keys] == first
    assert 0.45 <= sum(first) / len(first) <= 0.55


def test_pin_and_unpin() -> None:
    agent = StaticAgent()
    seen = recorder(agent)
    assert agent.pinned_version is None
    agent.pin("v1.4.2", reason="bad deploy")
    pinned = agent.pinned_version
    assert isinstance(pinned, PinnedVersion)
    assert (pinned.version, pinned.reason, pinned.expires_at) == ("v1.4.2", "bad deploy", None)
    assert pinned.since is not None
    agent.unpin()
    assert agent.pinned_version is None
    assert [c.pin for c in seen] == [(None, pinned), (pinned, None)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.set_shedding("SHEDABLE", 10), "unknown tier 'SHEDABLE'"),
        (lambda a: a.set_shedding("SHEDDABLE", 150), "between 0 and 100"),
        (lambda a: a.set_flag("x", [1, 2]), "none of bool, number, string or JSON object"),
        (lambda a: a.set_flag("x", float("nan")), "not finite"),
        (lambda a: a.pin(""), "no version"),
    ],
)
def test_invalid_settings_raise_and_change_nothing(
    call: Callable[[StaticAgent], object], message: str
) -> None:
    agent = StaticAgent({"a": True}, shedding=("SHEDDABLE", 10))
    seen = recorder(agent)
    revision = agent.revision
    with pytest.raises(ValueError, match=message):
        call(agent)
    assert agent.revision == revision
    assert agent.enabled("a") is True
    assert seen == []


def test_a_removed_callback_is_not_called_again() -> None:
    agent = StaticAgent()
    seen: list[StateChange] = []
    remove = agent.on_change(seen.append)
    agent.set_flag("a", True)
    remove()
    remove()
    agent.set_flag("a", False)
    assert [c.flags for c in seen] == [{"a": (None, True)}]


def test_a_failing_callback_surfaces_in_the_test_after_the_state_changed() -> None:
    agent = StaticAgent()

    def boom(change: StateChange) -> None:
        raise RuntimeError("callback failed")

    agent.on_change(boom)
    with pytest.raises(RuntimeError, match="callback failed"):
        agent.set_flag("a", True)
    assert agent.enabled("a") is True


def test_set_state_calls_the_state_callbacks_and_keeps_the_reads() -> None:
    agent = StaticAgent({"new-ui": False})
    heard: list[tuple[str, str, bool]] = []
    removed: list[str] = []
    agent.on_state(lambda state: heard.append((state, agent.state, agent.wait_ready(0))))
    remove = agent.on_state(removed.append)
    agent.set_state("READY")  # no change: nothing called
    agent.set_state("STALE")
    remove()
    remove()
    agent.set_state("READY")
    assert heard == [("STALE", "STALE", False), ("READY", "READY", True)]
    assert removed == ["STALE"]
    assert agent.enabled("new-ui", default=True) is False  # the state set so far, kept
    assert agent.revision == 1
    with pytest.raises(ValueError, match="unknown state 'GONE'"):
        agent.set_state("GONE")
    assert agent.state == "READY"


def test_concurrent_setters_lose_no_change() -> None:
    agent = StaticAgent()
    seen = recorder(agent)
    start = agent.revision

    def flip(worker: int) -> None:
        for i in range(50):
            agent.set_flag(f"w{worker}", float(i))

    threads = [threading.Thread(target=flip, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert agent.revision == start + 200
    assert [c.revision for c in seen] == list(range(start + 1, start + 201))
    assert all(agent.value(f"w{w}") == 49.0 for w in range(4))


def test_static_agent_exposes_its_service_and_shedding_level() -> None:
    from agents.testing import StaticAgent

    agent = StaticAgent(service="checkout")
    assert agent.service == "checkout"
    assert agent.shedding is None
    agent.set_shedding("SHEDDABLE_PLUS", 30)
    assert agent.shedding is not None
    assert (agent.shedding.tier.name, agent.shedding.percent) == ("SHEDDABLE_PLUS", 30.0)
