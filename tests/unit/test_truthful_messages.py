"""What the server says: a time gone by, what a clear left in force, and why a rollback
found nothing to go back to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controlplane import semantics
from controlplane._durations import in_the_past
from controlplane.errors import FailedPreconditionError
from controlplane.model import KnownGood, Meta, Pin, Shedding, Tier
from controlplane.server._mitigation_service import ROLLBACK_REASONS_SHOWN, rollback_target

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_a_time_gone_by_is_shown_beside_the_time_now() -> None:
    late = datetime(2026, 11, 26, 7, 0, 0, 250_000, tzinfo=UTC)
    assert in_the_past(late, T0 + timedelta(seconds=5, microseconds=900_000)) == (
        "2026-11-26T07:00:00Z is in the past: it is now 2026-11-26T12:00:05Z (UTC)"
    )


def _meta(expires_in: timedelta | None = None) -> Meta:
    return Meta(
        actor="oncall", reason="r", set_at=T0, expires_at=T0 + expires_in if expires_in else None
    )


def test_clearing_a_pin_layer_says_the_pin_beneath_applies_now() -> None:
    base = Pin("checkout", "v1.4.2", _meta(timedelta(hours=2)))
    top = Pin("checkout", "v1.5.0", _meta(timedelta(minutes=30)), replaced=base)
    cleared = semantics.decide_unpin(top, T0, all_layers=False)
    assert cleared.new == base and cleared.restored == base
    assert cleared.summary == (
        "pin: time-boxed pin v1.5.0 removed (the pin beneath it, v1.4.2, applies now "
        "until 2026-11-26T14:00:00.000000Z)"
    )
    # No "; " in it: a bundle's summary joins its changes' summaries with "; ".
    assert "; " not in cleared.summary
    everything = semantics.decide_unpin(top, T0, all_layers=True)
    assert everything.new is None and everything.restored is None
    assert everything.summary == "pin cleared (was v1.5.0) with every layer beneath it (v1.4.2)"
    # An expired layer beneath is not named: it had stopped applying.
    gone = Pin("checkout", "v1.3.0", Meta(actor="o", reason="r", set_at=T0, expires_at=T0))
    deep = Pin("checkout", "v1.5.0", _meta(timedelta(minutes=30)), replaced=gone)
    assert semantics.decide_unpin(deep, T0, all_layers=True).summary == "pin cleared (was v1.5.0)"
    assert semantics.decide_unpin(deep, T0, all_layers=False).summary == "pin cleared (was v1.5.0)"


def test_clearing_a_shedding_layer_says_the_level_beneath_applies_now() -> None:
    base = Shedding("checkout", Tier.SHEDDABLE, 20.0, _meta())
    top = Shedding("checkout", Tier.SHEDDABLE_PLUS, 50.0, _meta(timedelta(hours=1)), replaced=base)
    cleared = semantics.decide_clear_shedding(top, T0, all_layers=False)
    assert cleared.summary == (
        "shedding: time-boxed level SHEDDABLE_PLUS 50% removed (the level beneath it, "
        "SHEDDABLE 20%, applies now)"
    )


def _marks(*versions: str) -> list[KnownGood]:
    """Known-good marks, the first most recently marked (as the store lists them)."""
    return [
        KnownGood("checkout", v, Meta(actor="ci", reason="ok", set_at=T0 - timedelta(hours=i)))
        for i, v in enumerate(versions)
    ]


def test_rollback_goes_to_the_newest_mark_before_the_current_one() -> None:
    marks = _marks("v1.6.0", "v1.5.0", "v1.4.2", "v1.3.0")
    assert rollback_target("checkout", "v1.5.0", marks, source="its pin") == "v1.4.2"
    # Not marked itself: the newest other mark.
    assert rollback_target("checkout", "v1.5.1", marks, source="its pin") == "v1.6.0"


def test_rollback_never_goes_forward_and_says_why_for_each_version() -> None:
    marks = _marks("v1.3.0", "v1.4.2")  # v1.4.2 marked first, then v1.3.0
    with pytest.raises(FailedPreconditionError) as info:
        rollback_target("checkout", "v1.4.2", marks, source="its pin")
    assert info.value.message.splitlines() == [
        "nothing to roll back to: checkout is on v1.4.2 (its pin); v1.4.2 is itself marked "
        "known-good, so only versions marked before it qualify, and there is none. Considered:",
        "  v1.3.0 was marked after v1.4.2 (a rollback goes back, never forward); pin it with "
        "`cpctl pin set checkout v1.3.0` if you mean it",
        "  v1.4.2 is the current version",
    ]


def test_rollback_with_no_marks_or_only_the_current_one() -> None:
    with pytest.raises(FailedPreconditionError, match="has no known-good versions: mark one"):
        rollback_target("checkout", "v2", [], source="the current_version given")
    with pytest.raises(FailedPreconditionError) as info:
        rollback_target("checkout", "v2", _marks("v2"), source="its pin")
    assert info.value.message.endswith("Considered:\n  v2 is the current version")


def test_a_long_list_of_refusals_is_cut_short() -> None:
    newer = [f"v2.{i}.0" for i in range(30, 0, -1)]
    with pytest.raises(FailedPreconditionError) as info:
        rollback_target("checkout", "v1.0.0", _marks(*newer, "v1.0.0"), source="its pin")
    lines = info.value.message.splitlines()
    assert len(lines) == 1 + ROLLBACK_REASONS_SHOWN + 2
    assert lines[1].startswith("  v2.30.0 was marked after v1.0.0")
    assert lines[-2:] == [
        f"  and {30 - ROLLBACK_REASONS_SHOWN} more marked after v1.0.0",
        "  v1.0.0 is the current version",
    ]
