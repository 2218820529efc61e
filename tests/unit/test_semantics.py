"""Pure tests of what writes, clears and expiries do to a key's record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controlplane import semantics
from controlplane.errors import InvalidArgumentError
from controlplane.model import Flag, FlagValue, Meta, Pin, Shedding, Tier, WriteOptions

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def opts(ttl: timedelta | None = None, now: datetime = T0, reason: str = "r") -> WriteOptions:
    return WriteOptions(reason=reason, actor="oncall", expires_at=now + ttl if ttl else None)


def set_flag(
    current: Flag | None, value: FlagValue, ttl: timedelta | None = None, now: datetime = T0
) -> semantics.Decision:
    return semantics.decide_set_flag(current, now, "checkout", "new-ui", value, opts(ttl, now))


def test_a_time_boxed_change_layers_on_the_base_and_expiry_restores_it() -> None:
    base = set_flag(None, True).new
    assert base.replaced is None
    layer = set_flag(base, False, timedelta(minutes=30))
    assert layer.changed
    assert layer.new.value is False
    assert layer.new.replaced == base
    assert layer.new.meta.expires_at == T0 + timedelta(minutes=30)

    early = semantics.decide_expiry(layer.new, T0 + timedelta(minutes=29), "flag")
    assert not early.changed
    due = semantics.decide_expiry(layer.new, T0 + timedelta(minutes=30), "flag")
    assert due.changed
    assert due.action == "flag.expire"
    assert due.new == base
    assert "applies again" in due.summary


def test_expiry_of_a_change_that_replaced_nothing_removes_the_key() -> None:
    layer = set_flag(None, False, timedelta(minutes=5)).new
    due = semantics.decide_expiry(layer, T0 + timedelta(minutes=6), "flag")
    assert due.changed
    assert due.new is None
    assert "now unset" in due.summary


def test_a_chain_unwinds_in_order_and_expired_lower_layers_are_skipped() -> None:
    base = Shedding("checkout", Tier.SHEDDABLE, 0.0, Meta("a", "r", T0))
    mid = semantics.decide_set_shedding(
        base, T0, "checkout", Tier.SHEDDABLE, 30.0, opts(timedelta(hours=1))
    ).new
    top = semantics.decide_set_shedding(
        mid, T0, "checkout", Tier.SHEDDABLE_PLUS, 100.0, opts(timedelta(minutes=10))
    ).new
    assert semantics.chain_depth(top) == 3
    first = semantics.decide_expiry(top, T0 + timedelta(minutes=10), "shedding").new
    assert first.percent == 30.0
    second = semantics.decide_expiry(first, T0 + timedelta(hours=1), "shedding").new
    assert second == base
    # Both expired by the time the server looks: straight to the base.
    assert semantics.decide_expiry(top, T0 + timedelta(hours=2), "shedding").new == base


def test_a_write_without_expiry_is_the_new_base() -> None:
    layered = set_flag(set_flag(None, True).new, False, timedelta(minutes=30)).new
    base = set_flag(layered, True)
    assert base.changed
    assert base.new.replaced is None
    assert base.new.meta.expires_at is None


def test_same_value_with_a_new_expiry_extends_and_without_expiry_makes_it_permanent() -> None:
    base = set_flag(None, True).new
    layer = set_flag(base, False, timedelta(minutes=30)).new
    extended = set_flag(layer, False, timedelta(minutes=60))
    assert extended.changed
    assert extended.action == "flag.extend"
    assert extended.new.meta.expires_at == T0 + timedelta(minutes=60)
    assert extended.new.replaced == base
    again = set_flag(extended.new, False, timedelta(minutes=60))
    assert not again.changed
    permanent = set_flag(extended.new, False)
    assert permanent.changed
    assert permanent.new.replaced is None
    assert permanent.new.meta.expires_at is None
    assert not set_flag(permanent.new, False).changed


def test_clear_restores_the_layer_beneath_or_everything_with_all_layers() -> None:
    base = set_flag(None, True).new
    layer = set_flag(base, False, timedelta(minutes=30)).new
    cleared = semantics.decide_clear_flag(layer, T0, "new-ui", all_layers=False)
    assert cleared.new == base
    assert cleared.restored == base
    assert cleared.summary == (
        "flag new-ui: time-boxed value false removed (the value beneath it, true, applies now)"
    )
    wiped = semantics.decide_clear_flag(layer, T0, "new-ui", all_layers=True)
    assert wiped.new is None
    assert wiped.summary == "flag new-ui cleared (was false) with every layer beneath it (true)"
    assert not semantics.decide_clear_flag(None, T0, "new-ui", all_layers=False).changed
    # Everything in it expired (the server has not restored it yet): nothing is set.
    gone = semantics.decide_clear_flag(layer, T0 + timedelta(hours=1), "new-ui", all_layers=False)
    assert gone.changed  # the base beneath is still in force
    only = set_flag(None, False, timedelta(minutes=1)).new
    expired = semantics.decide_clear_flag(only, T0 + timedelta(hours=1), "new-ui", all_layers=False)
    assert not expired.changed


def test_writes_prune_layers_that_have_expired() -> None:
    base = set_flag(None, True).new
    short = set_flag(base, False, timedelta(minutes=1)).new
    later = T0 + timedelta(minutes=5)
    # The short layer expired (the server has not restored it yet): a new layer goes
    # on the base, and the "was" is what was really in force.
    layer = semantics.decide_set_flag(
        short, later, "checkout", "new-ui", False, opts(timedelta(minutes=1), later)
    )
    assert layer.new.replaced == base
    assert "(was true)" in layer.summary


def test_too_many_layers_are_refused() -> None:
    record = set_flag(None, True).new
    for i in range(semantics.MAX_LAYERS - 1):
        record = set_flag(record, i % 2 == 0, timedelta(minutes=10 + i)).new
    with pytest.raises(InvalidArgumentError, match="layers"):
        set_flag(record, record.value is False, timedelta(minutes=99))


def test_pins_keep_the_previous_pin_and_rollback_action() -> None:
    first = semantics.decide_pin(None, T0, "checkout", "v1", opts()).new
    second = semantics.decide_pin(first, T0, "checkout", "v2", opts(), action="pin.rollback")
    assert second.action == "pin.rollback"
    assert isinstance(second.new, Pin)
    assert second.new.previous is not None
    assert second.new.previous.version == "v1"
    unpinned = semantics.decide_unpin(second.new, T0, all_layers=False)
    assert unpinned.new is None
    assert "was v2" in unpinned.summary


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        (
            False,
            "flase",
            "x is a boolean flag; 'flase' is not true or false but a string: set true or "
            "false, or change the flag's type on purpose (change_type; cpctl flag set "
            "--change-type; change_type: true in a bundle file)",
        ),
        ("read-only", True, "x is a string flag; true is not a string but a boolean"),
        (30.0, "30%", "x is a number flag; '30%' is not a number but a string"),
        ({"mode": "lite"}, "lite", "x is an object flag; 'lite' is not a JSON object but a string"),
    ],
)
def test_a_flag_keeps_its_type_unless_the_change_is_meant(
    first: FlagValue, then: FlagValue, message: str
) -> None:
    current = set_flag(None, first).new
    with pytest.raises(InvalidArgumentError) as info:
        semantics.decide_set_flag(current, T0, "checkout", "x", then, opts())
    assert message in str(info.value)
    meant = semantics.decide_set_flag(
        current,
        T0,
        "checkout",
        "x",
        then,
        opts(),
        change_type=True,
    )
    assert meant.changed
    assert meant.new.value == then
    assert "type changed from" in meant.summary


def test_numbers_of_either_kind_and_a_cleared_flag_take_any_value() -> None:
    current = set_flag(None, 1.0).new
    assert semantics.decide_set_flag(current, T0, "checkout", "x", 2.5, opts()).changed
    # Expired: nothing in force, so no type either.
    boxed = set_flag(None, False, ttl=timedelta(minutes=5)).new
    later = T0 + timedelta(hours=1)
    assert semantics.decide_set_flag(boxed, later, "checkout", "x", "on", opts(now=later)).changed


def test_a_first_value_in_a_scope_takes_the_flags_type_elsewhere() -> None:
    check = semantics.check_type_across_scopes
    # Same type, or no other scope: nothing to say.
    assert check("new-ui", "checkout", False, {"global": True, "payments": False}) == ""
    assert check("new-ui", "checkout", "lite", {}) == ""
    with pytest.raises(InvalidArgumentError) as info:
        check("new-ui", "checkout", "flase", {"global": True})
    assert str(info.value) == (
        "value: new-ui is a boolean flag (scope global); 'flase' is not true or false but a "
        "string: set true or false, or if checkout is meant to hold a string where scope "
        "global holds a boolean, say so (change_type; cpctl flag set --change-type; "
        "change_type: true in a bundle file)"
    )
    # Meant: written, and the note for the summary (the audit) says what differs.
    assert check("new-ui", "checkout", "lite", {"global": True}, change_type=True) == (
        " (a string in checkout, where scope global holds a boolean)"
    )
    # Services disagreeing with the value: the type the most of them hold is named, with
    # global first.
    with pytest.raises(InvalidArgumentError) as info:
        check("mode", "global", 3, {"a": "lite", "b": "lite", "c": {"x": 1}, "d": {"y": 2}})
    assert "mode is a string flag (scopes a, b); 3 is not a string" in str(info.value)
