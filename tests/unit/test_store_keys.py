"""The key layout in etcd, on its own: every path the store writes and reads back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controlplane.model import Flag, KnownGood, Meta, Pin, RecordError, Shedding, Tier
from controlplane.store import keys

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
META = Meta(actor="oncall", reason="errors", set_at=NOW)


def test_range_end_covers_exactly_the_keys_under_a_prefix() -> None:
    assert keys.range_end(b"/a/") == b"/a0"
    assert keys.range_end(b"a\xff") == b"b"
    assert keys.range_end(b"\xff\xff") == b"\0"  # every key
    end = keys.range_end(b"/cp/flags/")
    assert b"/cp/flags/" <= b"/cp/flags/zzz" < end
    assert end <= b"/cp/flags0"


@pytest.mark.parametrize(
    ("key", "path", "kind", "scope", "name"),
    [
        (keys.flag_key("global", "new-ui"), "flags/global/new-ui", "flag", "global", "new-ui"),
        (keys.shedding_key("checkout"), "shedding/checkout", "shedding", "checkout", ""),
        (keys.pin_key("checkout"), "pins/checkout", "pin", "checkout", ""),
        (
            keys.known_good_key("checkout", "v1.4.2"),
            "known-good/checkout/v1.4.2",
            "known_good",
            "checkout",
            "v1.4.2",
        ),
    ],
)
def test_each_record_kind_has_one_path_and_is_found_again_from_it(
    key: keys.Key, path: str, kind: str, scope: str, name: str
) -> None:
    assert (key.path, key.kind, key.scope, key.name) == (path, kind, scope, name)
    again = keys.key_for_path(path)
    assert again is not None
    assert (again.path, again.kind, again.scope, again.name) == (path, kind, scope, name)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "flags/global",
        "flags/global/a/b",
        "shedding/a/b",
        "pins",
        "known-good/checkout",
        "audit/00000000000000000001-abcd1234",
        "bundles/20261126-120000-x-ab12",
        "expiries/1/flags/global/x",
        "overrides/checkout/i-1",
    ],
)
def test_paths_outside_the_record_layout_have_no_key(path: str) -> None:
    assert keys.key_for_path(path) is None


def test_a_record_must_name_the_key_that_holds_it() -> None:
    flag = Flag(scope="global", name="new-ui", value=False, meta=META)
    assert keys.flag_key("global", "new-ui").parse(flag.to_record()) == flag
    with pytest.raises(RecordError, match="not checkout/new-ui"):
        keys.flag_key("checkout", "new-ui").parse(flag.to_record())
    shed = Shedding(service="checkout", tier=Tier.SHEDDABLE, percent=30, meta=META)
    with pytest.raises(RecordError, match="not search"):
        keys.shedding_key("search").parse(shed.to_record())
    pin = Pin(service="checkout", version="v1", meta=META)
    with pytest.raises(RecordError, match="not search"):
        keys.pin_key("search").parse(pin.to_record())
    mark = KnownGood(service="checkout", version="v1", meta=META)
    with pytest.raises(RecordError, match="not checkout/v2"):
        keys.known_good_key("checkout", "v2").parse(mark.to_record())


def test_audit_ids_sort_by_time_and_fall_between_their_time_bounds() -> None:
    early = keys.new_audit_id(NOW)
    late = keys.new_audit_id(NOW + timedelta(microseconds=1))
    assert early < late
    assert len(early) == 29
    assert keys.audit_path(early) == f"audit/{early}"
    before, after = keys.audit_at(keys.ns(NOW)), keys.audit_at(keys.ns(NOW) + 1)
    assert before <= keys.audit_path(early) < after


def test_the_expiry_index_orders_by_time_and_names_its_record() -> None:
    soon = keys.expiry_path("flags/global/new-ui", NOW)
    later = keys.expiry_path("pins/checkout", NOW + timedelta(seconds=1))
    assert soon < later
    assert keys.parse_expiry_path(soon) == (keys.ns(NOW), "flags/global/new-ui")
    assert keys.expiry_at(keys.ns(NOW)) <= soon < keys.expiry_at(keys.ns(NOW) + 1)
    assert keys.parse_expiry_path("expiries/soon/flags/global/x") is None


def test_bundle_ids_are_readable_and_ordered_and_fingerprints_follow_content() -> None:
    bundle_id = keys.new_bundle_id(NOW, "degrade-checkout")
    assert bundle_id.startswith("20261126-120000-degrade-checkout-")
    assert keys.bundle_id_of(keys.bundle_path(bundle_id)) == bundle_id
    # Everything older than a cutoff sorts before the cutoff's stamp.
    assert keys.bundle_path(bundle_id) < keys.BUNDLES + keys.bundle_stamp(
        NOW + timedelta(seconds=1)
    )
    changes = [{"kind": "flag", "scope": "global", "name": "x", "value": False}]
    same = [{"value": False, "name": "x", "scope": "global", "kind": "flag"}]
    assert keys.fingerprint("b", changes) == keys.fingerprint("b", same)
    assert keys.fingerprint("b", changes) != keys.fingerprint("c", changes)
    assert keys.fingerprint("b", changes) != keys.fingerprint("b", [{**changes[0], "value": 1}])
    assert keys.fingerprint_path("ab") == "bundle-fingerprints/ab"


def test_presence_keys_live_beside_the_records_not_under_them() -> None:
    presence = keys.presence_prefix(keys.DEFAULT_PREFIX)
    assert presence == "/controlplane/v1-presence/"
    assert not presence.startswith(keys.DEFAULT_PREFIX)  # agents never see them
    assert keys.servers_prefix(presence) == "/controlplane/v1-presence/servers/"
    assert keys.server_chunk_key(presence, "s1", 3) == "/controlplane/v1-presence/servers/s1/0003"
    assert keys.applied_key(presence, 42, "checkout", "s1") == (
        "/controlplane/v1-presence/applied/00000000000000000042/checkout/s1"
    )
    assert keys.applied_prefix(presence, 42) < keys.applied_key(presence, 42, "a", "b")
    assert keys.applied_key(presence, 41, "z", "z") < keys.applied_prefix(presence, 42)
