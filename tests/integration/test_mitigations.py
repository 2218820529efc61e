"""MitigationService against a real server on a real etcd: flags, shedding, pins, audit."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.model import datetime_to_timestamp
from controlplane.server import ControlServer
from tests.helpers.raw_etcd import RawEtcd

Stub = mitigation_pb2_grpc.MitigationServiceStub


def opts(reason: str = "errors on /pay", **kw: Any) -> t.WriteOptions:
    return t.WriteOptions(reason=reason, actor="oncall", **kw)


def boolean(value: bool) -> t.FlagValue:
    return t.FlagValue(bool_value=value)


async def set_flag(stub: Stub, scope: str, name: str, value: t.FlagValue, **kw: Any) -> Any:
    return await stub.SetFlag(
        m.SetFlagRequest(scope=scope, name=name, value=value, options=opts(**kw))
    )


async def audit_records(raw: RawEtcd, prefix: str) -> list[dict[str, Any]]:
    rows = await raw.get_prefix(prefix + "audit/")
    return [json.loads(v) for _, v in sorted(rows.items())]


async def test_set_flag_writes_json_record_and_audit_in_one_transaction(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    resp = await set_flag(stub, "checkout", "new-ui", boolean(False), incident="INC-42")

    assert resp.result.changed
    assert resp.result.summary == "flag new-ui = false (was unset)"
    got = await raw_etcd.get(prefix + "flags/checkout/new-ui")
    assert got is not None
    raw, mod_revision = got
    record = json.loads(raw)
    assert record["value"] is False
    assert record["meta"]["reason"] == "errors on /pay"
    assert record["meta"]["incident"] == "INC-42"
    assert record["meta"]["actor"] == "oncall"
    assert record["meta"]["actor_authenticated"] is False
    assert mod_revision == resp.result.revision == resp.flag.meta.mod_revision

    audit_key = prefix + "audit/" + resp.result.audit_id
    audit = await raw_etcd.get(audit_key)
    assert audit is not None
    # Same transaction: the audit record has the change's revision.
    assert audit[1] == mod_revision
    entry = json.loads(audit[0])
    assert entry["action"] == "flag.set"
    assert entry["before"] is None
    assert entry["after"]["value"] is False


async def test_large_values_can_be_changed_although_the_audit_holds_before_and_after(
    stub: Stub,
) -> None:
    big = json.dumps({"blob": "x" * 40_000})
    await set_flag(stub, "global", "config", t.FlagValue(json_value=big))
    again = await set_flag(
        stub, "global", "config", t.FlagValue(json_value=json.dumps({"blob": "y" * 40_000}))
    )
    assert again.result.changed


async def test_flag_values_of_every_kind_round_trip(stub: Stub) -> None:
    values = [
        t.FlagValue(bool_value=True),
        t.FlagValue(number_value=2.5),
        t.FlagValue(number_value=-7),
        t.FlagValue(string_value="read-only"),
        t.FlagValue(json_value='{"mode": "degraded", "limits": [1, 2], "x": null}'),
    ]
    for i, value in enumerate(values):
        await set_flag(stub, "global", f"f{i}", value)
        got = await stub.GetFlag(m.GetFlagRequest(scope="global", name=f"f{i}"))
        if value.HasField("json_value"):
            assert json.loads(got.flag.value.json_value) == json.loads(value.json_value)
        else:
            assert got.flag.value == value


async def test_service_entry_wins_and_global_write_names_overriding_services(stub: Stub) -> None:
    await set_flag(stub, "checkout", "new-ui", boolean(False))
    resp = await set_flag(stub, "global", "new-ui", boolean(True))
    assert list(resp.result.overridden_by) == ["checkout"]

    own = await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="new-ui", effective=True))
    assert own.flag.scope == "checkout"
    assert own.flag.value.bool_value is False
    other = await stub.GetFlag(m.GetFlagRequest(scope="payments", name="new-ui", effective=True))
    assert other.flag.scope == "global"
    assert other.flag.value.bool_value is True
    glob = await stub.GetFlag(m.GetFlagRequest(scope="global", name="new-ui"))
    assert list(glob.overridden_by) == ["checkout"]

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetFlag(m.GetFlagRequest(scope="payments", name="new-ui"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "new-ui" in (info.value.details() or "")


async def test_list_flags_by_scope_and_effective(stub: Stub) -> None:
    await set_flag(stub, "global", "a", boolean(True))
    await set_flag(stub, "global", "b", boolean(True))
    await set_flag(stub, "checkout", "b", boolean(False))
    await set_flag(stub, "payments", "c", boolean(False))

    every = await stub.ListFlags(m.ListFlagsRequest())
    assert sorted((f.scope, f.name) for f in every.flags) == [
        ("checkout", "b"),
        ("global", "a"),
        ("global", "b"),
        ("payments", "c"),
    ]
    own = await stub.ListFlags(m.ListFlagsRequest(scope="checkout"))
    assert [(f.scope, f.name) for f in own.flags] == [("checkout", "b")]
    effective = await stub.ListFlags(m.ListFlagsRequest(scope="checkout", effective=True))
    assert [(f.scope, f.name, f.value.bool_value) for f in effective.flags] == [
        ("global", "a", True),
        ("checkout", "b", False),
    ]
    assert effective.revision > 0


async def test_repeated_write_is_unchanged_with_no_revision_and_no_audit(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    await set_flag(stub, "checkout", "new-ui", boolean(False))
    revision = await raw_etcd.revision()
    audits = await audit_records(raw_etcd, prefix)

    again = await set_flag(stub, "checkout", "new-ui", boolean(False), reason="re-run of runbook")

    assert not again.result.changed
    assert again.result.revision == 0
    assert await raw_etcd.revision() == revision
    assert await audit_records(raw_etcd, prefix) == audits
    shed = m.SetSheddingRequest(service="checkout", percent=20, options=opts())
    assert (await stub.SetShedding(shed)).result.changed
    assert not (await stub.SetShedding(shed)).result.changed
    pin = m.PinVersionRequest(service="checkout", version="v1", options=opts())
    assert (await stub.PinVersion(pin)).result.changed
    assert not (await stub.PinVersion(pin)).result.changed
    # false and 0 are different values (and types): not a no-op, once the type change is
    # meant; refused without it.
    zero = t.FlagValue(number_value=0)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await set_flag(stub, "checkout", "new-ui", zero)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    changed = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="new-ui", value=zero, options=opts(), change_type=True
        )
    )
    assert changed.result.changed


async def test_compare_and_set(stub: Stub, raw_etcd: RawEtcd, prefix: str) -> None:
    created = await set_flag(stub, "checkout", "kill", boolean(True), expected_mod_revision=0)
    assert created.result.changed
    rev = created.result.mod_revision

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await set_flag(stub, "checkout", "kill", boolean(False), expected_mod_revision=0)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert f"current mod revision {rev}" in (info.value.details() or "")
    # grpc.aio gives a Metadata of (key, value) pairs; the type stubs say otherwise.
    trailing: dict[str, Any] = dict(cast(Any, info.value.trailing_metadata()) or ())
    assert trailing.get("current-mod-revision") == str(rev)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await set_flag(stub, "checkout", "kill", boolean(False), expected_mod_revision=rev - 1)
    assert info.value.code() == grpc.StatusCode.ABORTED
    got = await raw_etcd.get(prefix + "flags/checkout/kill")
    assert got is not None and json.loads(got[0])["value"] is True

    ok = await set_flag(stub, "checkout", "kill", boolean(False), expected_mod_revision=rev)
    assert ok.result.changed
    assert ok.previous.value.bool_value is True


async def test_concurrent_writers_without_cas_are_all_applied_and_audited(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    import asyncio

    results = await asyncio.gather(
        *(set_flag(stub, "checkout", "mode", t.FlagValue(number_value=i)) for i in range(20))
    )
    revisions = [r.result.revision for r in results]
    ids = [r.result.audit_id for r in results]
    assert len(set(revisions)) == 20
    audits = await audit_records(raw_etcd, prefix)
    assert len(audits) == 20
    # The audit trail is a chain: in revision order, each change's "before" is the
    # previous change's "after", and the last "after" is what etcd holds.
    revision_of = dict(zip(ids, revisions, strict=True))
    by_revision = sorted(audits, key=lambda a: revision_of[a["id"]])
    for earlier, later in itertools.pairwise(by_revision):
        assert later["before"] == earlier["after"]
    final = await raw_etcd.get(prefix + "flags/checkout/mode")
    assert final is not None
    assert json.loads(final[0]) == by_revision[-1]["after"]


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    (
        "SetFlag",
        m.SetFlagRequest(scope="Checkout", name="x", value=boolean(True), options=opts()),
        "scope",
    ),
    ("SetFlag", m.SetFlagRequest(scope="", name="x", value=boolean(True), options=opts()), "scope"),
    (
        "SetFlag",
        m.SetFlagRequest(scope="global", name="New UI", value=boolean(True), options=opts()),
        "name",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(scope="global", name="x" * 129, value=boolean(True), options=opts()),
        "name",
    ),
    ("SetFlag", m.SetFlagRequest(scope="global", name="x", options=opts()), "value"),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global", name="x", value=boolean(True), options=t.WriteOptions(reason="  ")
        ),
        "options.reason",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global", name="x", value=t.FlagValue(json_value="[1, 2]"), options=opts()
        ),
        "value",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global", name="x", value=t.FlagValue(json_value="{not json"), options=opts()
        ),
        "value",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global", name="x", value=t.FlagValue(number_value=float("nan")), options=opts()
        ),
        "value",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global", name="x", value=t.FlagValue(string_value="y" * 70_000), options=opts()
        ),
        "64 KiB",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global", name="x", value=boolean(True), options=opts(incident="INC 42")
        ),
        "options.incident",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global",
            name="x",
            value=boolean(True),
            options=opts(
                ttl=duration_pb2.Duration(seconds=60),
                expires_at=datetime_to_timestamp(datetime.now(UTC) + timedelta(hours=1)),
            ),
        ),
        "options",
    ),
    (
        "SetFlag",
        m.SetFlagRequest(
            scope="global",
            name="x",
            value=boolean(True),
            options=opts(ttl=duration_pb2.Duration(seconds=-5)),
        ),
        "options.ttl",
    ),
    (
        "SetShedding",
        m.SetSheddingRequest(service="checkout", percent=150, options=opts()),
        "percent",
    ),
    (
        "SetShedding",
        m.SetSheddingRequest(service="checkout", percent=-1, options=opts()),
        "percent",
    ),
    (
        "SetShedding",
        m.SetSheddingRequest(service="checkout", percent=float("inf"), options=opts()),
        "percent",
    ),
    (
        "SetShedding",
        m.SetSheddingRequest(
            service="checkout",
            percent=10,
            tier=9,  # type: ignore[arg-type]
            options=opts(),
        ),
        "tier",
    ),
    ("SetShedding", m.SetSheddingRequest(service="global", percent=10, options=opts()), "service"),
    ("PinVersion", m.PinVersionRequest(service="checkout", version="", options=opts()), "version"),
    (
        "PinVersion",
        m.PinVersionRequest(service="checkout", version="v1 2", options=opts()),
        "version",
    ),
    (
        "MarkKnownGood",
        m.MarkKnownGoodRequest(service="checkout", version="v1", options=t.WriteOptions()),
        "options.reason",
    ),
    (
        "MarkKnownGood",
        m.MarkKnownGoodRequest(
            service="checkout", version="v1", options=opts(ttl=duration_pb2.Duration(seconds=60))
        ),
        "options",
    ),
    ("ListHistory", m.ListHistoryRequest(limit=5000), "limit"),
    ("ListHistory", m.ListHistoryRequest(service="-bad-"), "service"),
]


@pytest.mark.parametrize(("method", "request_msg", "field"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_naming_the_field_and_writes_nothing(
    stub: Stub, raw_etcd: RawEtcd, prefix: str, method: str, request_msg: Any, field: str
) -> None:
    revision = await raw_etcd.revision()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request_msg)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    assert await raw_etcd.revision() == revision
    assert await raw_etcd.get_prefix(prefix) == {}


async def test_dry_run_reports_the_change_and_writes_nothing(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    await set_flag(stub, "checkout", "new-ui", boolean(True))
    revision = await raw_etcd.revision()

    dry = await set_flag(stub, "global", "new-ui", boolean(False), dry_run=True)

    assert dry.result.dry_run and not dry.result.changed
    assert dry.result.summary == "flag new-ui = false (was unset)"
    assert list(dry.result.overridden_by) == ["checkout"]
    assert dry.flag.value.bool_value is False
    assert await raw_etcd.revision() == revision
    assert await raw_etcd.get(prefix + "flags/global/new-ui") is None

    noop = await set_flag(stub, "checkout", "new-ui", boolean(True), dry_run=True)
    assert noop.result.dry_run and not noop.result.would_change
    for dry_write in (
        stub.ClearFlag(
            m.ClearFlagRequest(scope="checkout", name="new-ui", options=opts(dry_run=True))
        ),
        stub.PinVersion(
            m.PinVersionRequest(service="checkout", version="v2", options=opts(dry_run=True))
        ),
        stub.SetShedding(
            m.SetSheddingRequest(service="checkout", percent=10, options=opts(dry_run=True))
        ),
    ):
        result = (await dry_write).result
        assert result.dry_run and result.would_change and not result.changed
    assert await raw_etcd.revision() == revision


async def test_clear_flag(stub: Stub, raw_etcd: RawEtcd, prefix: str) -> None:
    await set_flag(stub, "checkout", "new-ui", boolean(False))
    cleared = await stub.ClearFlag(
        m.ClearFlagRequest(scope="checkout", name="new-ui", options=opts("fixed"))
    )
    assert cleared.result.changed
    assert cleared.removed.value.bool_value is False
    assert cleared.result.summary == "flag new-ui cleared (was false)"
    assert await raw_etcd.get(prefix + "flags/checkout/new-ui") is None
    actions = [a["action"] for a in await audit_records(raw_etcd, prefix)]
    assert actions == ["flag.set", "flag.clear"]

    revision = await raw_etcd.revision()
    again = await stub.ClearFlag(
        m.ClearFlagRequest(scope="checkout", name="new-ui", options=opts("fixed"))
    )
    assert not again.result.changed
    assert await raw_etcd.revision() == revision


async def test_shedding_set_get_list_clear(stub: Stub, raw_etcd: RawEtcd, prefix: str) -> None:
    resp = await stub.SetShedding(
        m.SetSheddingRequest(
            service="checkout", percent=50, tier=t.SHEDDABLE_PLUS, options=opts("overload")
        )
    )
    assert resp.result.summary == "shedding SHEDDABLE_PLUS 50% (was off)"
    raw = await raw_etcd.get(prefix + "shedding/checkout")
    assert raw is not None
    assert json.loads(raw[0])["tier"] == "SHEDDABLE_PLUS"
    assert json.loads(raw[0])["percent"] == 50

    default_tier = await stub.SetShedding(
        m.SetSheddingRequest(service="payments", percent=30, options=opts("overload"))
    )
    assert default_tier.shedding.tier == t.SHEDDABLE

    got = await stub.GetShedding(m.GetSheddingRequest(service="checkout"))
    assert (got.shedding.tier, got.shedding.percent) == (t.SHEDDABLE_PLUS, 50)
    listed = await stub.ListShedding(m.ListSheddingRequest())
    assert sorted(s.service for s in listed.shedding) == ["checkout", "payments"]

    cleared = await stub.ClearShedding(
        m.ClearSheddingRequest(service="checkout", options=opts("recovered"))
    )
    assert cleared.removed.percent == 50
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetShedding(m.GetSheddingRequest(service="checkout"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_pins_record_the_previous_pin_and_clear_says_what_it_was(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    first = await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1.4.2", options=opts("bad deploy"))
    )
    assert not first.pin.HasField("previous")
    second = await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1.4.1", options=opts("worse"))
    )
    assert second.pin.previous.version == "v1.4.2"
    assert second.pin.previous.reason == "bad deploy"
    raw = await raw_etcd.get(prefix + "pins/checkout")
    assert raw is not None and json.loads(raw[0])["previous"]["version"] == "v1.4.2"

    listed = await stub.ListPins(m.ListPinsRequest())
    assert [(p.service, p.version) for p in listed.pins] == [("checkout", "v1.4.1")]
    cleared = await stub.UnpinVersion(
        m.UnpinVersionRequest(service="checkout", options=opts("fixed"))
    )
    assert cleared.removed.version == "v1.4.1"
    assert not cleared.HasField("restored")
    assert cleared.result.summary == "pin cleared (was v1.4.1)"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetPin(m.GetPinRequest(service="checkout"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_known_good_marks_and_rollback(stub: Stub) -> None:
    for version in ("v1.3.0", "v1.4.0", "v1.5.0"):
        await stub.MarkKnownGood(
            m.MarkKnownGoodRequest(service="checkout", version=version, options=opts("verified"))
        )
    again = await stub.MarkKnownGood(
        m.MarkKnownGoodRequest(service="checkout", version="v1.5.0", options=opts("verified"))
    )
    assert not again.result.changed
    listed = await stub.ListKnownGood(m.ListKnownGoodRequest(service="checkout"))
    assert [k.version for k in listed.known_good] == ["v1.5.0", "v1.4.0", "v1.3.0"]

    # No pin and no current version named: a clear error.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Rollback(m.RollbackRequest(service="checkout", options=opts("bad deploy")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "current_version" in (info.value.details() or "")

    rolled = await stub.Rollback(
        m.RollbackRequest(service="checkout", current_version="v1.5.0", options=opts("bad"))
    )
    assert rolled.pin.version == "v1.4.0"
    assert rolled.from_version == "v1.5.0"
    # Now pinned to v1.4.0: the next rollback goes further back, never forward to the
    # version just rolled back from.
    rolled = await stub.Rollback(m.RollbackRequest(service="checkout", options=opts("bad")))
    assert (rolled.from_version, rolled.pin.version) == ("v1.4.0", "v1.3.0")
    assert rolled.pin.previous.version == "v1.4.0"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Rollback(m.RollbackRequest(service="checkout", options=opts("bad")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "marked before it" in (info.value.details() or "")

    # v1.3.0 turns out bad too: unmarked, the newest known-good other than it qualifies.
    await stub.UnmarkKnownGood(
        m.UnmarkKnownGoodRequest(service="checkout", version="v1.3.0", options=opts("bad"))
    )
    rolled = await stub.Rollback(m.RollbackRequest(service="checkout", options=opts("bad")))
    assert rolled.pin.version == "v1.5.0"
    for version in ("v1.4.0", "v1.5.0"):
        await stub.UnmarkKnownGood(
            m.UnmarkKnownGoodRequest(service="checkout", version=version, options=opts("bad"))
        )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Rollback(m.RollbackRequest(service="checkout", options=opts("bad")))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing to roll back to" in (info.value.details() or "")


async def test_history_filters(stub: Stub) -> None:
    await set_flag(stub, "checkout", "a", boolean(False), incident="INC-42")
    await set_flag(stub, "global", "b", boolean(False), incident="INC-42")
    await set_flag(stub, "payments", "c", boolean(False), incident="INC-7")
    await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1", options=opts(incident="INC-42"))
    )

    inc = await stub.ListHistory(m.ListHistoryRequest(incident="INC-42"))
    assert [(e.kind, e.scope, e.name) for e in inc.entries] == [
        ("pin", "checkout", ""),
        ("flag", "global", "b"),
        ("flag", "checkout", "a"),
    ]
    assert all(e.revision > 0 for e in inc.entries)
    svc = await stub.ListHistory(m.ListHistoryRequest(service="payments"))
    assert [(e.scope, e.name) for e in svc.entries] == [("payments", "c"), ("global", "b")]
    limited = await stub.ListHistory(m.ListHistoryRequest(limit=2))
    assert len(limited.entries) == 2
    future = datetime_to_timestamp(datetime.now(UTC) + timedelta(hours=1))
    assert not (await stub.ListHistory(m.ListHistoryRequest(since=future))).entries
    past = datetime_to_timestamp(datetime.now(UTC) - timedelta(hours=1))
    assert not (await stub.ListHistory(m.ListHistoryRequest(until=past))).entries
    assert len((await stub.ListHistory(m.ListHistoryRequest(since=past))).entries) == 4
    entry = inc.entries[-1]
    assert json.loads(entry.after_json)["value"] is False
    assert entry.before_json == ""


async def test_history_pages_past_one_etcd_range(
    stub: Stub, raw_etcd: RawEtcd, prefix: str, server: ControlServer
) -> None:
    # More matching records than one page of the store's range reads.
    for i in range(600):
        await raw_etcd.put(
            f"{prefix}audit/{1_700_000_000_000_000_000 + i:020d}-0000abcd",
            json.dumps(
                {
                    "kind": "audit",
                    "id": f"{i}",
                    "time": "2023-11-14T22:13:20Z",
                    "actor": "x",
                    "action": "flag.set",
                    "record_kind": "flag",
                    "scope": "checkout" if i % 2 else "payments",
                    "name": "n",
                    "key": "k",
                    "reason": "r",
                    "incident": "INC-1",
                }
            ).encode(),
        )
    got = await stub.ListHistory(m.ListHistoryRequest(service="checkout", limit=1000))
    assert len(got.entries) == 300
    assert [e.id for e in got.entries][:2] == ["599", "597"]


@pytest.fixture
async def elsewhere(server: ControlServer, prefix: str) -> AsyncIterator[Stub]:
    """A client of a second replica on the same etcd and prefix."""
    from prometheus_client import CollectorRegistry

    from tests.integration.conftest import server_config

    other = ControlServer(
        server_config(server.etcd_endpoints[0], prefix), registry=CollectorRegistry()
    )
    await other.start()
    try:
        async with grpc.aio.insecure_channel(other.address) as channel:
            yield mitigation_pb2_grpc.MitigationServiceStub(channel)
    finally:
        await other.stop(grace=0)


async def test_a_replica_never_decides_on_what_another_replica_changed_since(
    stub: Stub, elsewhere: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    """A server writes on the key as it last saw it (no read first); another replica's
    write in between must neither be overwritten blindly nor taken for "no change"."""
    first = await set_flag(stub, "checkout", "mode", t.FlagValue(string_value="a"))
    assert first.result.changed
    # The other replica changes it; this one still knows "a".
    await set_flag(elsewhere, "checkout", "mode", t.FlagValue(string_value="b"))
    # Setting "a" again is a change (etcd holds "b"), not "unchanged".
    again = await set_flag(stub, "checkout", "mode", t.FlagValue(string_value="a"))
    assert again.result.changed
    assert again.previous.value.string_value == "b"
    # And a different value replaces "c" over "b", with "c" as what it replaced.
    await set_flag(elsewhere, "checkout", "mode", t.FlagValue(string_value="c"))
    third = await set_flag(stub, "checkout", "mode", t.FlagValue(string_value="d"))
    assert third.previous.value.string_value == "c"
    audits = [a for a in await audit_records(raw_etcd, prefix) if a["name"] == "mode"]
    befores = [(a["before"] or {}).get("value") for a in audits]
    afters = [a["after"]["value"] for a in audits]
    assert afters == ["a", "b", "a", "c", "d"]
    assert befores == [None, "a", "b", "a", "c"]


async def test_a_refusal_is_never_decided_on_what_another_replica_changed_since(
    stub: Stub, elsewhere: Stub
) -> None:
    """This server last saw a full stack of time-boxed layers; another replica cleared
    one since. Adding a layer here is then allowed, as etcd's state says."""
    from controlplane.semantics import MAX_LAYERS

    ttl = duration_pb2.Duration(seconds=3600)
    await set_flag(stub, "checkout", "layers", t.FlagValue(number_value=0))
    for n in range(1, MAX_LAYERS):
        await set_flag(stub, "checkout", "layers", t.FlagValue(number_value=n), ttl=ttl)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await set_flag(stub, "checkout", "layers", t.FlagValue(number_value=99), ttl=ttl)
    assert full.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await elsewhere.ClearFlag(m.ClearFlagRequest(scope="checkout", name="layers", options=opts()))
    added = await set_flag(stub, "checkout", "layers", t.FlagValue(number_value=99), ttl=ttl)
    assert added.result.changed
    assert added.previous.value.number_value == MAX_LAYERS - 2


async def test_writes_that_come_while_one_is_at_etcd_share_one_transaction(
    server: ControlServer, stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    """Group commit: each write is applied, audited and answered with the revision
    that holds it; the writes that waited for the first one went together."""
    import asyncio

    from controlplane.model import WriteOptions

    store = server.store
    assert store is not None
    names = [f"mode-{i}" for i in range(10)]
    for name in names:  # the server now knows each key: no read before the writes
        await set_flag(stub, "checkout", name, boolean(False))
    outcomes = await asyncio.gather(
        *(
            store.set_flag("checkout", name, True, WriteOptions(reason="drill", actor="oncall"))
            for name in names
        )
    )
    revisions = [outcome.revision for outcome in outcomes]
    assert all(outcome.changed for outcome in outcomes)
    # The first went alone; the nine that came while it was at etcd, in one transaction.
    assert revisions[1:] == [revisions[1]] * 9 and revisions[0] < revisions[1]
    batches = server.registry.get_sample_value("controlplane_write_batch_size_count")
    assert batches == 1
    audits = {a["id"]: a for a in await audit_records(raw_etcd, prefix)}
    for name, outcome in zip(names, outcomes, strict=True):
        raw = await raw_etcd.get(prefix + f"flags/checkout/{name}")
        assert raw is not None and raw[1] == outcome.revision
        assert json.loads(raw[0])["value"] is True
        audit = audits[outcome.audit_id]
        assert (audit["name"], audit["before"]["value"], audit["after"]["value"]) == (
            name,
            False,
            True,
        )


async def test_a_shared_transaction_failing_one_compare_makes_each_write_on_its_own(
    server: ControlServer, stub: Stub, elsewhere: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    """Another replica changed one key since this server last saw it: the shared
    transaction fails, each write is made again alone, and the stale one on a read."""
    import asyncio

    from controlplane.model import WriteOptions

    store = server.store
    assert store is not None
    names = [f"tier-{i}" for i in range(6)]
    for name in names:
        await set_flag(stub, "checkout", name, t.FlagValue(string_value="a"))
    await set_flag(elsewhere, "checkout", names[3], t.FlagValue(string_value="other"))
    outcomes = await asyncio.gather(
        *(
            store.set_flag("checkout", name, "b", WriteOptions(reason="drill", actor="oncall"))
            for name in names
        )
    )
    assert all(outcome.changed for outcome in outcomes)
    previous = [o.previous.value if o.previous is not None else None for o in outcomes]
    assert previous == ["a", "a", "a", "other", "a", "a"]
    # One shared transaction was sent (the five behind the first) and failed: each
    # write then has a revision of its own.
    assert server.registry.get_sample_value("controlplane_write_batch_size_count") == 1
    assert len({outcome.revision for outcome in outcomes}) == len(names)
    audits = {a["id"]: a for a in await audit_records(raw_etcd, prefix)}
    for name, outcome, before in zip(names, outcomes, previous, strict=True):
        raw = await raw_etcd.get(prefix + f"flags/checkout/{name}")
        assert raw is not None and raw[1] == outcome.revision
        assert json.loads(raw[0])["value"] == "b"
        assert audits[outcome.audit_id]["before"]["value"] == before


async def test_a_caller_giving_up_in_a_shared_transaction_fails_alone(
    fresh_etcd: EmbeddedEtcd,
) -> None:
    """A writer whose own deadline runs out while it waits for the shared transaction
    gets DEADLINE_EXCEEDED; the writes with it go through, and etcd is not said to be
    down for it."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from controlplane.errors import DeadlineExceededError
    from controlplane.metrics import ServerMetrics
    from controlplane.model import WriteOptions
    from controlplane.store import Store

    registry = CollectorRegistry()
    store = Store([fresh_etcd.endpoint], metrics=ServerMetrics(registry), etcd_timeout=5.0)
    await store.connect()
    try:
        drill = WriteOptions(reason="drill", actor="oncall")
        for name in ("first", "patient", "hasty"):
            await store.set_flag("checkout", name, False, drill)

        async def hasty() -> None:
            with store.budget(0.3, caller_deadline=True):
                await store.set_flag("checkout", "hasty", True, drill)

        fresh_etcd.pause()  # etcd answers late (within the 5 s timeout), not never
        try:
            first = asyncio.create_task(store.set_flag("checkout", "first", True, drill))
            await asyncio.sleep(0)  # the first write is at etcd; the next two queue behind it
            patient = asyncio.create_task(store.set_flag("checkout", "patient", True, drill))
            quick = asyncio.create_task(hasty())
            with pytest.raises(DeadlineExceededError):
                await quick
        finally:
            fresh_etcd.resume()
        assert (await first).changed and (await patient).changed
        assert registry.get_sample_value("controlplane_etcd_up") == 1
        flags = {f.record.name: f.record.value for f in (await store.list_flags("checkout"))[0]}
        assert flags == {"first": True, "patient": True, "hasty": False}
    finally:
        await store.close()
