"""The history checker finds each kind of violation, and passes a clean history."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tests.faults.history import AgentHistory, Write, check, expected_final


def writes() -> list[Write]:
    return [
        Write(1, "a", "w1", "ok", revision=10),
        Write(2, "a", "w2", "failed"),
        Write(3, "b", "w3", "ok", revision=11),
        Write(4, "a", "w4", "unknown"),
        Write(5, "a", "w5", "ok", revision=13),
        Write(6, "b", "w6", "unknown"),
    ]


def clean_agent(name: str) -> AgentHistory:
    return AgentHistory(
        name,
        [
            (10, {"a": "w1"}),
            (11, {"a": "w1", "b": "w3"}),
            (12, {"a": "w4", "b": "w3"}),  # an unknown write that did commit
            (13, {"a": "w5", "b": "w3"}),
        ],
    )


def test_a_clean_history_passes_and_is_counted() -> None:
    report = check(writes(), [clean_agent("x"), clean_agent("y")])
    assert report.ok, report.violations
    assert (report.writes, report.acknowledged, report.failed, report.unknown) == (6, 3, 1, 2)
    assert report.applied == 8
    assert "0 violations" in report.summary()


def test_the_final_state_may_hold_a_later_unknown_write() -> None:
    assert expected_final(writes()) == {"a": {"w5"}, "b": {"w3", "w6"}}
    late = clean_agent("x")
    late.applied.append((14, {"a": "w5", "b": "w6"}))
    other = clean_agent("y")
    other.applied.append((14, {"a": "w5", "b": "w6"}))
    assert check(writes(), [late, other]).ok


@pytest.mark.parametrize(
    ("applied", "message"),
    [
        ([(10, {"a": "w1"}), (10, {"a": "w1", "b": "w3"})], "must strictly increase"),
        ([(10, {"a": "zz"})], "was never written"),
        ([(10, {"a": "w2"})], "a write that failed"),
        ([(10, {"a": "w5"})], "but written at 13"),
        ([(13, {"a": "w5", "b": "w3"}), (14, {"a": "w1", "b": "w3"})], "went back in time"),
        ([(11, {"a": "w1", "b": "w3"})], "an acknowledged write is missing"),
    ],
)
def test_each_violation_is_found(
    applied: list[tuple[int, Mapping[str, Any]]], message: str
) -> None:
    report = check(writes(), [AgentHistory("bad", applied)])
    assert not report.ok
    assert any(message in v for v in report.violations), report.violations


def test_agents_must_agree() -> None:
    one = clean_agent("x")
    two = clean_agent("y")
    two.applied.append((14, {"a": "w5", "b": "w6"}))
    report = check(writes(), [one, two])
    assert any("ended in another state than x" in v for v in report.violations)


def test_values_must_identify_writes() -> None:
    with pytest.raises(ValueError, match="unique per key"):
        check([Write(1, "a", "v", "ok", 1), Write(2, "a", "v", "ok", 2)], [])


def test_violations_are_capped() -> None:
    agents = [AgentHistory(f"a{i}", [(1, {"a": "zz"})]) for i in range(50)]
    report = check(writes(), agents, limit=5)
    assert len(report.violations) == 6
    assert report.violations[-1].startswith("... more")
