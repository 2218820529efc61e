"""Pure tests of the agent's wire decoding: Snapshot and Change messages into snapshots."""

from __future__ import annotations

from datetime import timedelta

import pytest

from agents import Criticality, PinnedVersion, SheddingLevel, _codec, _shed, _state
from agents._state import (
    InvalidChangeError,
    StaleRevisionError,
)
from controlplane import model
from controlplane.api.v1 import agent_pb2, types_pb2
from tests.helpers.agent_records import (
    SERVICE,
    T0,
    T1,
    change,
    flag,
    fv,
    never,
    pin,
    shedding,
    snap,
)

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
    s = _codec.snapshot_from_proto(SERVICE, msg, T0)
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
    assert not _shed.should_shed(s, Criticality.SHEDDABLE, never)
    after = _codec.apply_change(s, agent_pb2.Change(revision=1, flags_set=[flag("x", False)]), T0)
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
        _codec.snapshot_from_proto(SERVICE, msg, T0)


def test_a_record_without_meta_is_applied() -> None:
    # Meta is informative only: its absence must not hold back a mitigation.
    msg = agent_pb2.Snapshot(
        revision=5,
        flags=[types_pb2.Flag(scope=SERVICE, name="f", value=fv("x"))],
        pin=types_pb2.Pin(version="v1"),
    )
    s = _codec.snapshot_from_proto(SERVICE, msg, T0)
    assert s.flags == {"f": "x"}
    assert s.pin == PinnedVersion("v1", "", None)
    assert s.next_expiry is None


# ---------------------------------------------------------------- changes


def test_setting_a_service_flag_hides_the_global_and_removing_it_falls_back() -> None:
    base = snap(flag("new-ui", True, scope="global"))
    own = _codec.apply_change(base, change(11, flags_set=[flag("new-ui", False)]), T0)
    assert own.revision == 11
    assert own.flags["new-ui"] is False
    assert own.flag_scopes["new-ui"] == SERVICE

    gone = _codec.apply_change(
        own, change(12, flags_removed=[agent_pb2.FlagRef(scope=SERVICE, name="new-ui")]), T0
    )
    assert gone.flags["new-ui"] is True
    assert gone.flag_scopes["new-ui"] == "global"
    # Pure: the earlier snapshots are untouched.
    assert base.flags == {"new-ui": True}
    assert own.flags == {"new-ui": False}


def test_a_global_change_under_a_service_entry_changes_no_effective_value() -> None:
    s = snap(flag("mode", "full", scope="global"), flag("mode", "lite"))
    after = _codec.apply_change(s, change(flags_set=[flag("mode", "off", scope="global")]), T0)
    assert after.flags == {"mode": "lite"}
    assert after.flag_records[("global", "mode")].value == "off"
    removed = _codec.apply_change(
        after, change(12, flags_removed=[agent_pb2.FlagRef(scope="global", name="mode")]), T0
    )
    assert removed.flags == {"mode": "lite"}
    assert ("global", "mode") not in removed.flag_records


def test_removing_what_is_not_there_is_not_an_error() -> None:
    # The agent may have dropped an expired record before the server's restore arrives.
    s = snap(flag("a", True))
    after = _codec.apply_change(
        s, change(flags_removed=[agent_pb2.FlagRef(scope=SERVICE, name="zzz")]), T0
    )
    assert after.flags == {"a": True}
    assert after.revision == 11


def test_shedding_and_pin_are_set_replaced_and_removed() -> None:
    s = snap()
    assert s.shedding is None and s.pin is None
    s = _codec.apply_change(s, change(11, shedding=shedding(3, 50)), T0)
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE_PLUS, 50.0)
    assert (s.shed_tier, s.shed_fraction) == (3, 0.5)
    s = _codec.apply_change(s, change(12, shedding=shedding(2, 20), pin=pin("v1.4.2")), T0)
    assert s.shedding == SheddingLevel(Criticality.CRITICAL, 20.0)
    assert s.pin is not None and s.pin.version == "v1.4.2" and s.pin.reason == "bad"
    assert s.pin.since == T0 - timedelta(days=1)
    s = _codec.apply_change(s, change(13, shedding_removed=True), T0)
    assert s.shedding is None
    assert not _shed.should_shed(s, Criticality.SHEDDABLE, never)
    assert s.pin is not None
    s = _codec.apply_change(s, change(14, pin_removed=True), T0)
    assert s.pin is None and s.pin_record is None


def test_an_old_or_repeated_revision_is_rejected() -> None:
    s = snap(flag("a", True), revision=10)
    for revision in (10, 9, 0):
        with pytest.raises(StaleRevisionError, match=f"revision {revision} "):
            _codec.apply_change(s, change(revision, flags_set=[flag("a", False)]), T0)


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
        _codec.apply_change(s, msg, T0)
    assert s.flags == {"a": True}
