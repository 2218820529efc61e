"""Pure tests of the agent's snapshot: building, changes, expiry, reads, cache, diff."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agents import Criticality, PinnedVersion, SheddingLevel, _state
from agents._state import (
    CorruptCacheError,
    InvalidChangeError,
    Snapshot,
    StaleRevisionError,
)
from controlplane import model
from controlplane.api.v1 import agent_pb2, types_pb2

SERVICE = "checkout"
T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=30)
T2 = T0 + timedelta(minutes=10)
TICK = timedelta(microseconds=1)


# ---------------------------------------------------------------- builders


def meta(expires_at: datetime | None = None, reason: str = "incident") -> types_pb2.Meta:
    msg = types_pb2.Meta(actor="oncall", reason=reason, incident="INC-1", mod_revision=7)
    msg.set_at.FromDatetime(T0 - timedelta(days=1))
    if expires_at is not None:
        msg.expires_at.FromDatetime(expires_at)
    return msg


def fv(value: Any) -> types_pb2.FlagValue:
    if isinstance(value, bool):
        return types_pb2.FlagValue(bool_value=value)
    if isinstance(value, float | int):
        return types_pb2.FlagValue(number_value=value)
    if isinstance(value, str):
        return types_pb2.FlagValue(string_value=value)
    return types_pb2.FlagValue(json_value=json.dumps(value))


def flag(
    name: str,
    value: Any,
    scope: str = SERVICE,
    expires_at: datetime | None = None,
    replaced: types_pb2.Flag | None = None,
) -> types_pb2.Flag:
    msg = types_pb2.Flag(scope=scope, name=name, value=fv(value), meta=meta(expires_at))
    if replaced is not None:
        msg.replaced.CopyFrom(replaced)
    return msg


def shedding(
    tier: int,
    percent: float,
    expires_at: datetime | None = None,
    replaced: types_pb2.Shedding | None = None,
) -> types_pb2.Shedding:
    msg = types_pb2.Shedding(service=SERVICE, percent=percent, meta=meta(expires_at))
    msg.tier = tier  # type: ignore[assignment]
    if replaced is not None:
        msg.replaced.CopyFrom(replaced)
    return msg


def pin(
    version: str, expires_at: datetime | None = None, replaced: types_pb2.Pin | None = None
) -> types_pb2.Pin:
    msg = types_pb2.Pin(service=SERVICE, version=version, meta=meta(expires_at, reason="bad"))
    if replaced is not None:
        msg.replaced.CopyFrom(replaced)
    return msg


def snap(
    *flags: types_pb2.Flag,
    shed: types_pb2.Shedding | None = None,
    pinned: types_pb2.Pin | None = None,
    revision: int = 10,
    now: datetime = T0,
) -> Snapshot:
    msg = agent_pb2.Snapshot(revision=revision, flags=list(flags))
    if shed is not None:
        msg.shedding.CopyFrom(shed)
    if pinned is not None:
        msg.pin.CopyFrom(pinned)
    return _state.snapshot_from_proto(SERVICE, msg, now)


def fixed(x: float) -> Callable[[], float]:
    return lambda: x


def never() -> float:
    raise AssertionError("rand must not be called outside the tier itself")


# ---------------------------------------------------------------- building


def test_the_service_entry_wins_over_the_global_one_in_either_order() -> None:
    for order in (1, -1):
        flags = [flag("new-ui", True, scope="global"), flag("new-ui", False)][::order]
        s = snap(*flags, flag("banner", "hello", scope="global"))
        assert s.flags == {"new-ui": False, "banner": "hello"}
        assert s.flag_scopes == {"new-ui": SERVICE, "banner": "global"}
        # The hidden global record is kept, for status.
        assert set(s.flag_records) == {
            ("global", "new-ui"),
            (SERVICE, "new-ui"),
            ("global", "banner"),
        }
        assert s.flag_records[("global", "new-ui")].value is True


def test_every_kind_of_value_is_read_as_its_python_type() -> None:
    s = snap(
        flag("kill", False),
        flag("ratio", 0.25),
        flag("mode", "read-only"),
        flag("limits", {"rps": 10, "tags": ["a"], "on": True}),
    )
    assert s.flags["kill"] is False
    assert s.flags["ratio"] == 0.25
    assert s.flags["mode"] == "read-only"
    assert s.flags["limits"] == {"rps": 10, "tags": ["a"], "on": True}


def test_records_built_by_the_server_model_are_understood() -> None:
    m = model.Meta(actor="oncall", reason="INC", set_at=T0, expires_at=T1)
    base = model.Meta(actor="oncall", reason="base", set_at=T0 - timedelta(days=3))
    msg = agent_pb2.Snapshot(
        revision=42,
        flags=[
            model.Flag("global", "new-ui", True, base).to_proto(),
            model.Flag(
                SERVICE, "cfg", {"a": 1}, m, model.Flag(SERVICE, "cfg", 2.0, base)
            ).to_proto(),
        ],
        shedding=model.Shedding(SERVICE, model.Tier.SHEDDABLE_PLUS, 40.0, m).to_proto(),
        pin=model.Pin(
            SERVICE, "v1.4.2", m, previous=model.PinHistory("v1.5.0", "ci", "deploy", base.set_at)
        ).to_proto(),
    )
    s = _state.snapshot_from_proto(SERVICE, msg, T0)
    assert s.revision == 42
    assert s.flags == {"new-ui": True, "cfg": {"a": 1}}
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE_PLUS, 40.0)
    assert s.pin == PinnedVersion("v1.4.2", "INC", T0, T1)
    assert s.pin_record is not None and s.pin_record.previous is not None
    assert s.pin_record.previous.version == "v1.5.0"
    assert s.next_expiry == T1
    assert _state.at(s, T1).flags == {"new-ui": True, "cfg": 2.0}


def test_an_empty_snapshot_reads_defaults_and_takes_the_first_change() -> None:
    s = _state.empty_snapshot(SERVICE)
    assert s.revision == 0
    assert _state.enabled(s, "x", True) is True
    assert _state.value(s, "x", "full") == "full"
    assert not _state.should_shed(s, Criticality.SHEDDABLE, never)
    after = _state.apply_change(s, agent_pb2.Change(revision=1, flags_set=[flag("x", False)]), T0)
    assert _state.enabled(after, "x", True) is False


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (agent_pb2.Snapshot(flags=[flag("f", [1, 2])]), "not a JSON object"),
        (
            agent_pb2.Snapshot(
                flags=[
                    types_pb2.Flag(
                        scope=SERVICE, name="f", value=types_pb2.FlagValue(json_value="{oops")
                    )
                ]
            ),
            "not valid JSON",
        ),
        (
            agent_pb2.Snapshot(
                flags=[
                    types_pb2.Flag(
                        scope=SERVICE, name="f", value=types_pb2.FlagValue(json_value='{"a": NaN}')
                    )
                ]
            ),
            "not valid JSON",
        ),
        (agent_pb2.Snapshot(flags=[flag("f", float("inf"))]), "not finite"),
        (agent_pb2.Snapshot(flags=[types_pb2.Flag(scope=SERVICE, name="f")]), "has no value"),
        (agent_pb2.Snapshot(flags=[flag("", True)]), "has no name"),
        (agent_pb2.Snapshot(flags=[flag("f", True, scope="payments")]), "'payments'"),
        (agent_pb2.Snapshot(flags=[flag("f", True), flag("f", False)]), "appears twice"),
        (agent_pb2.Snapshot(shedding=shedding(4, 101)), "between 0 and 100"),
        (agent_pb2.Snapshot(shedding=shedding(4, -1)), "between 0 and 100"),
        (agent_pb2.Snapshot(shedding=shedding(4, float("nan"))), "between 0 and 100"),
        (agent_pb2.Snapshot(shedding=shedding(0, 10)), "unspecified tier"),
        (agent_pb2.Snapshot(shedding=shedding(9, 10)), "unknown tier 9"),
        (
            agent_pb2.Snapshot(shedding=types_pb2.Shedding(service="payments", tier="SHEDDABLE")),
            "for service 'payments'",
        ),
        (agent_pb2.Snapshot(pin=pin("")), "no version"),
        (
            agent_pb2.Snapshot(flags=[flag("f", True, expires_at=T1, replaced=flag("f", [1]))]),
            "not a JSON object",
        ),
        (
            agent_pb2.Snapshot(shedding=shedding(4, 10, expires_at=T1, replaced=shedding(4, 300))),
            "between 0 and 100",
        ),
    ],
)
def test_a_malformed_record_is_rejected_with_its_reason(
    msg: agent_pb2.Snapshot, reason: str
) -> None:
    msg.revision = 5
    with pytest.raises(InvalidChangeError, match=reason):
        _state.snapshot_from_proto(SERVICE, msg, T0)


def test_a_record_without_meta_is_applied() -> None:
    # Meta is informative only: its absence must not hold back a mitigation.
    msg = agent_pb2.Snapshot(
        revision=5,
        flags=[types_pb2.Flag(scope=SERVICE, name="f", value=fv("x"))],
        pin=types_pb2.Pin(version="v1"),
    )
    s = _state.snapshot_from_proto(SERVICE, msg, T0)
    assert s.flags == {"f": "x"}
    assert s.pin == PinnedVersion("v1", "", None)
    assert s.next_expiry is None


# ---------------------------------------------------------------- changes


def change(revision: int = 11, **fields: Any) -> agent_pb2.Change:
    return agent_pb2.Change(revision=revision, **fields)


def test_setting_a_service_flag_hides_the_global_and_removing_it_falls_back() -> None:
    base = snap(flag("new-ui", True, scope="global"))
    own = _state.apply_change(base, change(11, flags_set=[flag("new-ui", False)]), T0)
    assert own.revision == 11
    assert own.flags["new-ui"] is False
    assert own.flag_scopes["new-ui"] == SERVICE

    gone = _state.apply_change(
        own, change(12, flags_removed=[agent_pb2.FlagRef(scope=SERVICE, name="new-ui")]), T0
    )
    assert gone.flags["new-ui"] is True
    assert gone.flag_scopes["new-ui"] == "global"
    # Pure: the earlier snapshots are untouched.
    assert base.flags == {"new-ui": True}
    assert own.flags == {"new-ui": False}


def test_a_global_change_under_a_service_entry_changes_no_effective_value() -> None:
    s = snap(flag("mode", "full", scope="global"), flag("mode", "lite"))
    after = _state.apply_change(s, change(flags_set=[flag("mode", "off", scope="global")]), T0)
    assert after.flags == {"mode": "lite"}
    assert after.flag_records[("global", "mode")].value == "off"
    removed = _state.apply_change(
        after, change(12, flags_removed=[agent_pb2.FlagRef(scope="global", name="mode")]), T0
    )
    assert removed.flags == {"mode": "lite"}
    assert ("global", "mode") not in removed.flag_records


def test_removing_what_is_not_there_is_not_an_error() -> None:
    # The agent may have dropped an expired record before the server's restore arrives.
    s = snap(flag("a", True))
    after = _state.apply_change(
        s, change(flags_removed=[agent_pb2.FlagRef(scope=SERVICE, name="zzz")]), T0
    )
    assert after.flags == {"a": True}
    assert after.revision == 11


def test_shedding_and_pin_are_set_replaced_and_removed() -> None:
    s = snap()
    assert s.shedding is None and s.pin is None
    s = _state.apply_change(s, change(11, shedding=shedding(3, 50)), T0)
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE_PLUS, 50.0)
    assert (s.shed_tier, s.shed_fraction) == (3, 0.5)
    s = _state.apply_change(s, change(12, shedding=shedding(2, 20), pin=pin("v1.4.2")), T0)
    assert s.shedding == SheddingLevel(Criticality.CRITICAL, 20.0)
    assert s.pin is not None and s.pin.version == "v1.4.2" and s.pin.reason == "bad"
    assert s.pin.since == T0 - timedelta(days=1)
    s = _state.apply_change(s, change(13, shedding_removed=True), T0)
    assert s.shedding is None
    assert not _state.should_shed(s, Criticality.SHEDDABLE, never)
    assert s.pin is not None
    s = _state.apply_change(s, change(14, pin_removed=True), T0)
    assert s.pin is None and s.pin_record is None


def test_an_old_or_repeated_revision_is_rejected() -> None:
    s = snap(flag("a", True), revision=10)
    for revision in (10, 9, 0):
        with pytest.raises(StaleRevisionError, match=f"revision {revision} "):
            _state.apply_change(s, change(revision, flags_set=[flag("a", False)]), T0)


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        (
            change(
                flags_set=[flag("a", False)],
                flags_removed=[agent_pb2.FlagRef(scope=SERVICE, name="a")],
            ),
            "both set and removed",
        ),
        (change(flags_set=[flag("a", False), flag("a", True)]), "set twice"),
        (change(shedding=shedding(4, 10), shedding_removed=True), "shedding is both"),
        (change(pin=pin("v2"), pin_removed=True), "pin is both"),
        (change(flags_removed=[agent_pb2.FlagRef(scope="payments", name="a")]), "'payments'"),
        (change(flags_set=[flag("b", True), flag("c", [1])]), "not a JSON object"),
    ],
)
def test_a_malformed_change_is_rejected_whole(msg: agent_pb2.Change, reason: str) -> None:
    s = snap(flag("a", True))
    with pytest.raises(InvalidChangeError, match=reason):
        _state.apply_change(s, msg, T0)
    assert s.flags == {"a": True}


# ---------------------------------------------------------------- expiry


def chain() -> types_pb2.Flag:
    """Base true; false layered until T1; "x" layered on that until T2 (< T1)."""
    return flag(
        "f", "x", expires_at=T2, replaced=flag("f", False, expires_at=T1, replaced=flag("f", True))
    )


def test_a_chain_of_layers_gives_way_one_by_one_at_each_expiry() -> None:
    s = snap(chain())
    assert s.flags["f"] == "x"
    assert s.next_expiry == T2

    assert _state.at(s, T2 - TICK) is s

    s2 = _state.at(s, T2)
    assert s2.flags["f"] is False
    assert s2.next_expiry == T1
    assert s2.revision == s.revision
    assert _state.at(s2, T1 - TICK) is s2

    s3 = _state.at(s2, T1)
    assert s3.flags["f"] is True
    assert s3.next_expiry is None
    assert s3.flag_records[(SERVICE, "f")].replaced is None

    # A timer that fires late skips straight to what applies then.
    late = _state.at(s, T1 + timedelta(hours=1))
    assert late.flags["f"] is True
    assert late.next_expiry is None

    # Built at a later time, the expired layers never apply.
    assert snap(chain(), now=T2 + TICK).flags["f"] is False


def test_a_layer_beneath_a_longer_one_does_not_set_the_next_expiry() -> None:
    # Top until T1, beneath it a layer until T2 < T1: nothing changes at T2.
    mid = flag("f", "mid", expires_at=T2, replaced=flag("f", "base"))
    s = snap(flag("f", "top", expires_at=T1, replaced=mid))
    assert s.next_expiry == T1
    assert _state.at(s, T2).flags["f"] == "top"
    assert _state.at(s, T1).flags["f"] == "base"


def test_an_expiring_service_entry_with_nothing_beneath_gives_way_to_the_global() -> None:
    s = snap(flag("new-ui", True, scope="global"), flag("new-ui", False, expires_at=T1))
    assert s.flags["new-ui"] is False
    after = _state.at(s, T1)
    assert after.flags["new-ui"] is True
    assert after.flag_scopes["new-ui"] == "global"
    assert (SERVICE, "new-ui") not in after.flag_records


def test_shedding_and_pin_expire_and_the_earliest_expiry_wins() -> None:
    s = snap(
        flag("a", True, expires_at=T1 + timedelta(hours=1)),
        shed=shedding(4, 100, expires_at=T1, replaced=shedding(4, 30)),
        pinned=pin("v1.4.2", expires_at=T2),
    )
    assert s.next_expiry == T2
    s = _state.at(s, T2)
    assert s.pin is None
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE, 100.0)
    assert s.next_expiry == T1
    s = _state.at(s, T1)
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE, 30.0)
    assert s.shed_fraction == pytest.approx(0.3)
    assert s.next_expiry == T1 + timedelta(hours=1)
    s = _state.at(s, T1 + timedelta(hours=1))
    assert s.flags == {}
    assert s.next_expiry is None


def test_a_change_applied_after_an_expiry_is_evaluated_at_its_time() -> None:
    s = snap(flag("a", False, expires_at=T1, replaced=flag("a", True)))
    after = _state.apply_change(s, change(flags_set=[flag("b", 1.0)]), T1)
    assert after.flags == {"a": True, "b": 1.0}


# ---------------------------------------------------------------- reads


def test_enabled_reads_only_bools_and_value_reads_anything() -> None:
    s = snap(flag("on", True), flag("off", False), flag("mode", "lite"), flag("n", 1.0))
    assert _state.enabled(s, "on", False) is True
    assert _state.enabled(s, "off", True) is False
    # Not a kill switch: the default, not the value's truthiness.
    assert _state.enabled(s, "mode", False) is False
    assert _state.enabled(s, "n", False) is False
    assert _state.enabled(s, "missing", True) is True
    assert _state.value(s, "mode", "full") == "lite"
    assert _state.value(s, "on", None) is True
    assert _state.value(s, "missing", "full") == "full"


ORDER = [
    Criticality.SHEDDABLE,
    Criticality.SHEDDABLE_PLUS,
    Criticality.CRITICAL,
    Criticality.CRITICAL_PLUS,
]


@pytest.mark.parametrize(
    ("tier", "percent", "expected"),
    [
        # DESIGN.md's table, columns SHEDDABLE, SHEDDABLE_PLUS, CRITICAL, CRITICAL_PLUS.
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
            assert _state.should_shed(s, criticality, never) is bool(share), criticality
            continue
        # The tier itself: shed when the draw in [0, 1) falls below percent / 100.
        assert _state.should_shed(s, criticality, fixed(0.0)) is (share > 0)
        assert _state.should_shed(s, criticality, fixed(0.999999)) is (share == 1)
        if 0 < share < 1:
            assert _state.should_shed(s, criticality, fixed(share - 0.001)) is True
            assert _state.should_shed(s, criticality, fixed(share)) is False


def test_should_shed_takes_names_and_treats_unknown_ones_as_critical() -> None:
    s = snap(shed=shedding(int(Criticality.SHEDDABLE_PLUS), 100))
    assert _state.should_shed(s, "SHEDDABLE", never) is True
    assert _state.should_shed(s, "sheddable_plus", fixed(0.5)) is True
    assert _state.should_shed(s, "bogus", never) is False
    critical = snap(shed=shedding(int(Criticality.CRITICAL), 100))
    assert _state.should_shed(critical, "bogus", fixed(0.5)) is True
    assert _state.should_shed(critical, "CRITICAL_PLUS", never) is False


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
    assert _state.should_shed(at_critical, odd, fixed(0.5)) is True
    assert _state.should_shed(at_sheddable, odd, never) is False
    assert _state.should_shed_key(at_critical, odd, "user-1") is True
    assert _state.should_shed_key(at_sheddable, odd, "user-1") is False
    # Odd names and keys: the default, and a decision (the same one each time).
    assert _state.enabled(at_critical, odd, True) is True
    assert _state.enabled(at_critical, odd, False) is False
    assert _state.value(at_critical, odd, "dflt") == "dflt"
    half = snap(shed=shedding(int(Criticality.SHEDDABLE), 50))
    decision = _state.should_shed_key(half, "SHEDDABLE", odd)
    assert decision in (True, False)
    assert _state.should_shed_key(half, "SHEDDABLE", odd) is decision


def test_keys_that_are_not_strings_hash_as_their_str() -> None:
    half = snap(shed=shedding(int(Criticality.SHEDDABLE), 50))
    keys = range(200)
    as_ints = [_state.should_shed_key(half, "SHEDDABLE", k) for k in keys]
    as_strs = [_state.should_shed_key(half, "SHEDDABLE", str(k)) for k in keys]
    assert as_ints == as_strs and any(as_ints) and not all(as_ints)
    as_bytes = [_state.should_shed_key(half, "SHEDDABLE", str(k).encode()) for k in keys]
    assert as_bytes == as_strs


@pytest.mark.parametrize("key_form", ["user-{}", "session-{}", "order:{:08d}", "{}"])
def test_stable_key_decisions_shed_the_set_share_of_the_tier(key_form: str) -> None:
    s30 = snap(shed=shedding(int(Criticality.SHEDDABLE), 30))
    s20 = snap(shed=shedding(int(Criticality.SHEDDABLE), 20))
    # Structured keys, as services use: the share must hold for them too.
    keys = [key_form.format(i) for i in range(10_000)]
    shed30 = {k for k in keys if _state.should_shed_key(s30, Criticality.SHEDDABLE, k)}
    shed20 = {k for k in keys if _state.should_shed_key(s20, Criticality.SHEDDABLE, k)}
    assert 0.28 <= len(shed30) / len(keys) <= 0.32
    assert 0.18 <= len(shed20) / len(keys) <= 0.22
    # Raising the level only adds keys: nobody flips back and forth.
    assert shed20 <= shed30
    # Stable: the same key, the same answer.
    assert all(_state.should_shed_key(s30, Criticality.SHEDDABLE, k) for k in shed30)
    # Other tiers follow the table regardless of the key.
    assert not any(_state.should_shed_key(s30, Criticality.SHEDDABLE_PLUS, k) for k in keys[:100])
    none = snap(shed=shedding(int(Criticality.SHEDDABLE), 0))
    every = snap(shed=shedding(int(Criticality.SHEDDABLE), 100))
    assert not any(_state.should_shed_key(none, "SHEDDABLE", k) for k in keys)
    assert all(_state.should_shed_key(every, "SHEDDABLE", k) for k in keys)


# ---------------------------------------------------------------- cache


def full_snapshot(now: datetime = T0) -> Snapshot:
    return snap(
        chain(),
        flag("new-ui", True, scope="global"),
        flag("cfg", {"limits": {"rps": 5}, "on": True}),
        flag("ratio", 0.5, scope="global"),
        shed=shedding(3, 25, expires_at=T1, replaced=shedding(4, 10)),
        pinned=types_pb2.Pin(
            service=SERVICE,
            version="v1.4.2",
            meta=meta(),
            previous=types_pb2.PinHistory(version="v1.5.0", actor="ci", reason="deploy"),
        ),
        revision=77,
        now=now,
    )


def test_the_cache_round_trips_records_layers_and_all() -> None:
    s = full_snapshot()
    data = _state.snapshot_to_cache(s)
    doc = json.loads(data)
    assert (doc["format"], doc["service"], doc["revision"]) == (1, SERVICE, 77)
    # Protobuf's JSON form, with the layers.
    chained = next(f for f in doc["records"]["flags"] if f["name"] == "f")
    assert chained["value"] == {"string_value": "x"}
    assert chained["replaced"]["value"] == {"bool_value": False}
    assert chained["replaced"]["meta"]["expires_at"] == "2026-11-26T12:30:00Z"

    back = _state.snapshot_from_cache(data, SERVICE, T0)
    assert back == s
    # Booted later, the agent is where it would have been had it kept running.
    assert _state.snapshot_from_cache(data, SERVICE, T2) == _state.at(s, T2)
    assert _state.snapshot_from_cache(data, SERVICE, T1).flags["f"] is True


def test_a_cache_with_fields_this_version_does_not_know_still_loads() -> None:
    doc = json.loads(_state.snapshot_to_cache(full_snapshot()))
    doc["records"]["flags"][0]["future_field"] = 1
    doc["written_by"] = "a newer agent"
    back = _state.snapshot_from_cache(json.dumps(doc).encode(), SERVICE, T0)
    assert back == full_snapshot()


def _cache_with(**changes: Any) -> bytes:
    doc = json.loads(_state.snapshot_to_cache(full_snapshot()))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b'{"format": 1, "service": "checkout"', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_cache_with(format=2), "format 2"),
        (_cache_with(service="payments"), "for service 'payments', not 'checkout'"),
        (_cache_with(revision="77"), "revision '77'"),
        (_cache_with(revision=-1), "revision -1"),
        (_cache_with(revision=2**63), "revision 9223372036854775808 is not a revision"),
        (_cache_with(revision=10**400), "is not a revision"),
        (_cache_with(revision=True), "revision True"),
        (_cache_with(records=[]), "'records'"),
        (_cache_with(records={"flags": "nope"}), "do not parse"),
        (
            _cache_with(records={"shedding": {"service": SERVICE, "tier": 4, "percent": 250}}),
            "invalid record: shedding: percent 250",
        ),
        (
            _cache_with(records={"flags": [{"scope": "payments", "name": "a"}]}),
            "invalid record: flag 'a' in scope 'payments'",
        ),
    ],
)
def test_an_unusable_cache_says_why(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptCacheError, match=reason):
        _state.snapshot_from_cache(data, SERVICE, T0)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, the root included."""
    found = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*path, index))
    return found


def _replaced(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(doc))
    node = copy
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = new
    return copy


ODD_JSON: list[Any] = [
    2**63,
    -(2**63) - 1,
    10**400,
    -1,
    1e308,
    0.5,
    None,
    True,
    "",
    "x" * 3000,
    "10000-01-01T00:00:00Z",
    [],
    [None],
    {},
    {"seconds": 2**70},
]


def test_whatever_a_cache_file_holds_the_only_error_is_corrupt_cache() -> None:
    """Every place of a real cache file, given every odd JSON value: a snapshot or
    CorruptCacheError, never another exception (Agent.start() must not raise)."""
    doc = json.loads(_state.snapshot_to_cache(full_snapshot()))
    outcomes = {"loaded": 0, "corrupt": 0}
    for path in _paths(doc):
        for new in ODD_JSON:
            data = json.dumps(_replaced(doc, path, new)).encode()
            try:
                _state.snapshot_from_cache(data, SERVICE, T0)
            except CorruptCacheError:
                outcomes["corrupt"] += 1
            else:
                outcomes["loaded"] += 1
    assert outcomes["loaded"] > 0 and outcomes["corrupt"] > 0
    # Byte-level damage too (a fixed seed: the same cases each run).
    rng = random.Random(5)
    data = _state.snapshot_to_cache(full_snapshot())
    for _ in range(2000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        with contextlib.suppress(CorruptCacheError):
            _state.snapshot_from_cache(bytes(damaged), SERVICE, T0)


# ---------------------------------------------------------------- diff


def test_diff_reports_effective_changes_only() -> None:
    old = snap(
        flag("kill", True),
        flag("gone", "x"),
        flag("cfg", {"a": 1, "b": [1, 2]}),
        flag("same", "v", scope="global"),
        flag("same", "v"),
        flag("n", True),
        shed=shedding(4, 30),
        pinned=pin("v1"),
    )
    new = _state.apply_change(
        old,
        change(
            flags_set=[
                flag("kill", False),
                flag("new", 2.0),
                flag("cfg", {"b": [1, 2], "a": 1}),
                flag("n", 1.0),
            ],
            flags_removed=[
                agent_pb2.FlagRef(scope=SERVICE, name="gone"),
                # The global one has the same value: nothing a service sees changes.
                agent_pb2.FlagRef(scope=SERVICE, name="same"),
            ],
            shedding=shedding(3, 30),
        ),
        T0,
    )
    d = _state.diff(old, new)
    assert d.revision == 11
    assert d.flags == {
        "kill": (True, False),
        "gone": ("x", None),
        "new": (None, 2.0),
        # True == 1.0 in Python; a kill switch becoming a number is still a change.
        "n": (True, 1.0),
    }
    assert d.shedding == (
        SheddingLevel(Criticality.SHEDDABLE, 30.0),
        SheddingLevel(Criticality.SHEDDABLE_PLUS, 30.0),
    )
    assert d.pin is None
    assert not d.empty

    unpinned = _state.apply_change(new, change(12, pin_removed=True), T0)
    d2 = _state.diff(new, unpinned)
    assert d2.flags == {} and d2.shedding is None
    assert d2.pin is not None and d2.pin[1] is None and d2.pin[0] is not None
    assert d2.pin[0].version == "v1"

    same = _state.apply_change(unpinned, change(13, flags_set=[flag("kill", False)]), T0)
    assert _state.diff(unpinned, same).empty


def test_an_expiry_shows_up_in_the_diff() -> None:
    s = snap(chain())
    d = _state.diff(s, _state.at(s, T2))
    assert d.flags == {"f": ("x", False)}
    assert d.revision == s.revision


# ---------------------------------------------------------------- packaging


def test_the_agent_imports_no_server_module() -> None:
    code = (
        "import sys, agents, agents.testing\n"
        "server = sorted(m for m in sys.modules if m.startswith('controlplane')\n"
        "                and not m.startswith('controlplane.api'))\n"
        "heavy = sorted(m for m in ('grpc', 'aetcd', 'structlog', 'prometheus_client', 'yaml')\n"
        "               if m in sys.modules)\n"
        "print(server, heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['controlplane'] []"
