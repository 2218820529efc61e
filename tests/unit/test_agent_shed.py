"""Pure tests of the shedding decisions: tiers, criticalities, keys, odd inputs."""

from __future__ import annotations

from typing import Any

import pytest

from agents import Criticality, _shed, _state
from tests.helpers.agent_records import (
    fixed,
    flag,
    never,
    shedding,
    snap,
)

# ---------------------------------------------------------------- reads


ORDER = [
    Criticality.SHEDDABLE,
    Criticality.SHEDDABLE_PLUS,
    Criticality.CRITICAL,
    Criticality.CRITICAL_PLUS,
]


@pytest.mark.parametrize(
    ("tier", "percent", "expected"),
    [
        # The shedding table, columns SHEDDABLE, SHEDDABLE_PLUS, CRITICAL, CRITICAL_PLUS.
        (Criticality.SHEDDABLE, 30, [0.30, 0, 0, 0]),
        (Criticality.SHEDDABLE_PLUS, 100, [1, 1, 0, 0]),
        (Criticality.SHEDDABLE_PLUS, 0, [1, 0, 0, 0]),
        (Criticality.CRITICAL, 20, [1, 1, 0.20, 0]),
    ],
)
def test_should_shed_follows_the_design_table(
    tier: Criticality, percent: float, expected: list[float]
) -> None:
    s = snap(shed=shedding(int(tier), percent))
    for criticality, share in zip(ORDER, expected, strict=True):
        if criticality != tier:
            # Above or below the tier: all or nothing, no random draw.
            assert _shed.should_shed(s, criticality, never) is bool(share), criticality
            continue
        # The tier itself: shed when the draw in [0, 1) falls below percent / 100.
        assert _shed.should_shed(s, criticality, fixed(0.0)) is (share > 0)
        assert _shed.should_shed(s, criticality, fixed(0.999999)) is (share == 1)
        if 0 < share < 1:
            assert _shed.should_shed(s, criticality, fixed(share - 0.001)) is True
            assert _shed.should_shed(s, criticality, fixed(share)) is False


def test_should_shed_takes_names_and_treats_unknown_ones_as_critical() -> None:
    s = snap(shed=shedding(int(Criticality.SHEDDABLE_PLUS), 100))
    assert _shed.should_shed(s, "SHEDDABLE", never) is True
    assert _shed.should_shed(s, "sheddable_plus", fixed(0.5)) is True
    assert _shed.should_shed(s, "bogus", never) is False
    critical = snap(shed=shedding(int(Criticality.CRITICAL), 100))
    assert _shed.should_shed(critical, "bogus", fixed(0.5)) is True
    assert _shed.should_shed(critical, "CRITICAL_PLUS", never) is False


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("SHEDDABLE", Criticality.SHEDDABLE),
        ("sheddable-plus", Criticality.SHEDDABLE_PLUS),
        (" Critical_Plus ", Criticality.CRITICAL_PLUS),
        (Criticality.SHEDDABLE_PLUS, Criticality.SHEDDABLE_PLUS),
        (4, Criticality.SHEDDABLE),
        ("", Criticality.CRITICAL),
        ("TIER_UNSPECIFIED", Criticality.CRITICAL),
        ("critical-ish", Criticality.CRITICAL),
        (None, Criticality.CRITICAL),
        (0, Criticality.CRITICAL),
        (True, Criticality.CRITICAL),
    ],
)
def test_criticality_parse_is_tolerant(given: Any, expected: Criticality) -> None:
    assert Criticality.parse(given) is expected


class Hostile:
    """A value whose hash and comparisons raise."""

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __str__(self) -> str:
        raise RuntimeError("no str")


class SameHashAsCritical:
    """Hashes like CRITICAL, so a dict lookup compares it, and the comparison raises."""

    def __hash__(self) -> int:
        return hash(2)

    def __eq__(self, other: object) -> bool:
        raise ValueError("no eq")


ODD_INPUTS: list[Any] = [
    ["x"],
    {"a": 1},
    {"SHEDDABLE"},
    float("nan"),
    float("inf"),
    4.5,
    -1,
    2**100,
    True,
    False,
    None,
    object(),
    b"SHEDDABLE",
    bytearray(b"x"),
    "\ud800",  # a lone surrogate
    "\x00" * 10_000,
    Hostile(),
    SameHashAsCritical(),
    Criticality,
]


@pytest.mark.parametrize("odd", ODD_INPUTS, ids=lambda v: type(v).__name__)
def test_reads_never_raise_and_an_odd_criticality_is_critical(odd: Any) -> None:
    assert Criticality.parse(odd) is Criticality.CRITICAL
    # CRITICAL: shed at a CRITICAL tier (100 %), kept at any less critical one.
    at_critical = snap(flag("on", True), shed=shedding(int(Criticality.CRITICAL), 100))
    at_sheddable = snap(flag("on", True), shed=shedding(int(Criticality.SHEDDABLE), 100))
    assert _shed.should_shed(at_critical, odd, fixed(0.5)) is True
    assert _shed.should_shed(at_sheddable, odd, never) is False
    assert _shed.should_shed_key(at_critical, odd, "user-1") is True
    assert _shed.should_shed_key(at_sheddable, odd, "user-1") is False
    # Odd names and keys: the default, and a decision (the same one each time).
    assert _state.enabled(at_critical, odd, True) is True
    assert _state.enabled(at_critical, odd, False) is False
    assert _state.value(at_critical, odd, "dflt") == "dflt"
    half = snap(shed=shedding(int(Criticality.SHEDDABLE), 50))
    decision = _shed.should_shed_key(half, "SHEDDABLE", odd)
    assert decision in (True, False)
    assert _shed.should_shed_key(half, "SHEDDABLE", odd) is decision


def test_keys_that_are_not_strings_hash_as_their_str() -> None:
    half = snap(shed=shedding(int(Criticality.SHEDDABLE), 50))
    keys = range(200)
    as_ints = [_shed.should_shed_key(half, "SHEDDABLE", k) for k in keys]
    as_strs = [_shed.should_shed_key(half, "SHEDDABLE", str(k)) for k in keys]
    assert as_ints == as_strs and any(as_ints) and not all(as_ints)
    as_bytes = [_shed.should_shed_key(half, "SHEDDABLE", str(k).encode()) for k in keys]
    assert as_bytes == as_strs


@pytest.mark.parametrize("key_form", ["user-{}", "session-{}", "order:{:08d}", "{}"])
def test_stable_key_decisions_shed_the_set_share_of_the_tier(key_form: str) -> None:
    s30 = snap(shed=shedding(int(Criticality.SHEDDABLE), 30))
    s20 = snap(shed=shedding(int(Criticality.SHEDDABLE), 20))
    # Structured keys, as services use: the share must hold for them too.
    keys = [key_form.format(i) for i in range(10_000)]
    shed30 = {k for k in keys if _shed.should_shed_key(s30, Criticality.SHEDDABLE, k)}
    shed20 = {k for k in keys if _shed.should_shed_key(s20, Criticality.SHEDDABLE, k)}
    assert 0.28 <= len(shed30) / len(keys) <= 0.32
    assert 0.18 <= len(shed20) / len(keys) <= 0.22
    # Raising the level only adds keys: nobody flips back and forth.
    assert shed20 <= shed30
    # Stable: the same key, the same answer.
    assert all(_shed.should_shed_key(s30, Criticality.SHEDDABLE, k) for k in shed30)
    # Other tiers follow the table regardless of the key.
    assert not any(_shed.should_shed_key(s30, Criticality.SHEDDABLE_PLUS, k) for k in keys[:100])
    none = snap(shed=shedding(int(Criticality.SHEDDABLE), 0))
    every = snap(shed=shedding(int(Criticality.SHEDDABLE), 100))
    assert not any(_shed.should_shed_key(none, "SHEDDABLE", k) for k in keys)
    assert all(_shed.should_shed_key(every, "SHEDDABLE", k) for k in keys)
