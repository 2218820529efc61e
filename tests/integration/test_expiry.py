"""Time-boxed changes on real servers and etcd: they restore what they replaced, on time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.model import parse_time, utcnow
from controlplane.server import ControlServer
from tests.helpers.raw_etcd import RawEtcd
from tests.helpers.scrape import scraped_sum
from tests.integration.conftest import server_config

Stub = mitigation_pb2_grpc.MitigationServiceStub


def opts(ttl_ms: int = 0, **kw: Any) -> t.WriteOptions:
    options = t.WriteOptions(reason="mitigate", actor="oncall", incident="INC-9", **kw)
    if ttl_ms:
        options.ttl.CopyFrom(
            duration_pb2.Duration(seconds=ttl_ms // 1000, nanos=ttl_ms % 1000 * 1_000_000)
        )
    return options


def flag(value: bool) -> t.FlagValue:
    return t.FlagValue(bool_value=value)


async def wait_for(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll until ``check`` holds; return when (monotonic). Fails after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def record(raw: RawEtcd, key: str) -> dict[str, Any] | None:
    got = await raw.get(key)
    return json.loads(got[0]) if got else None


async def audits(raw: RawEtcd, prefix: str, action: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(v) for _, v in sorted((await raw.get_prefix(prefix + "audit/")).items())]
    return [a for a in rows if action is None or a["action"] == action]


async def test_flag_expiry_restores_the_value_it_replaced_on_time(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    key = prefix + "flags/global/new-ui"
    await stub.SetFlag(
        m.SetFlagRequest(scope="global", name="new-ui", value=flag(True), options=opts())
    )
    resp = await stub.SetFlag(
        m.SetFlagRequest(
            scope="global", name="new-ui", value=flag(False), options=opts(ttl_ms=1200)
        )
    )
    stored = await record(raw_etcd, key)
    assert stored is not None
    assert stored["value"] is False
    assert stored["replaced"]["value"] is True
    expires_at = parse_time(stored["meta"]["expires_at"])
    assert resp.flag.meta.HasField("expires_at")

    async def restored() -> bool:
        now = await record(raw_etcd, key)
        return now is not None and now["value"] is True

    await wait_for(restored, 10, "the flag to be true again")
    final = await record(raw_etcd, key)
    assert final is not None and final["replaced"] is None and final["meta"]["expires_at"] is None
    [expiry] = await audits(raw_etcd, prefix, "flag.expire")
    assert expiry["before"]["value"] is False
    assert expiry["after"]["value"] is True
    assert expiry["incident"] == "INC-9"
    assert expiry["actor"] == "controlplane:expiry"
    lateness = parse_time(expiry["time"]) - expires_at
    assert timedelta(0) <= lateness <= timedelta(seconds=1)
    # The expiry index is empty again.
    assert await raw_etcd.get_prefix(prefix + "expiries/") == {}


async def test_shedding_and_pin_expiry_restore_and_a_change_over_nothing_goes_away(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    await stub.PinVersion(m.PinVersionRequest(service="checkout", version="v1", options=opts()))
    await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v2", options=opts(ttl_ms=800))
    )
    await stub.SetShedding(
        m.SetSheddingRequest(service="checkout", percent=40, options=opts(ttl_ms=800))
    )

    async def both_expired() -> bool:
        pin = await record(raw_etcd, prefix + "pins/checkout")
        shed = await record(raw_etcd, prefix + "shedding/checkout")
        return pin is not None and pin["version"] == "v1" and shed is None

    await wait_for(both_expired, 10, "the pin back on v1 and shedding gone")
    assert len(await audits(raw_etcd, prefix, "pin.expire")) == 1
    assert len(await audits(raw_etcd, prefix, "shedding.expire")) == 1


async def test_a_chain_of_two_time_boxed_changes_unwinds_in_order(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    key = prefix + "flags/checkout/mode"

    def set_mode(value: str, ttl_ms: int = 0) -> Any:
        return stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="mode", value=t.FlagValue(string_value=value),
                options=opts(ttl_ms=ttl_ms),
            )
        )  # fmt: skip

    await set_mode("full")
    await set_mode("degraded", ttl_ms=2500)
    await set_mode("read-only", ttl_ms=1000)
    seen: list[Any] = []

    async def back_to_full() -> bool:
        now = await record(raw_etcd, key)
        value = now["value"] if now else None
        if not seen or seen[-1] != value:
            seen.append(value)
        return value == "full"

    await wait_for(back_to_full, 15, "the base value")
    assert seen == ["read-only", "degraded", "full"]
    expiries = await audits(raw_etcd, prefix, "flag.expire")
    assert [(a["before"]["value"], a["after"]["value"]) for a in expiries] == [
        ("read-only", "degraded"),
        ("degraded", "full"),
    ]


async def test_early_clear_restores_and_all_layers_removes_the_chain(
    stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    key = prefix + "flags/checkout/x"
    for value, ttl in ((True, 0), (False, 600_000), (True, 300_000)):
        await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="x", value=flag(value), options=opts(ttl_ms=ttl)
            )
        )
    cleared = await stub.ClearFlag(m.ClearFlagRequest(scope="checkout", name="x", options=opts()))
    assert cleared.restored.value.bool_value is False
    assert cleared.restored.meta.HasField("expires_at")
    stored = await record(raw_etcd, key)
    assert stored is not None and stored["value"] is False
    # One index entry: the restored layer's expiry.
    assert len(await raw_etcd.get_prefix(prefix + "expiries/")) == 1

    wiped = await stub.ClearFlag(
        m.ClearFlagRequest(scope="checkout", name="x", options=opts(), all_layers=True)
    )
    assert wiped.result.changed
    assert not wiped.HasField("restored")
    assert await raw_etcd.get(key) is None
    assert await raw_etcd.get_prefix(prefix + "expiries/") == {}


async def test_extending_and_making_permanent(stub: Stub, raw_etcd: RawEtcd, prefix: str) -> None:
    key = prefix + "flags/checkout/x"
    await stub.SetFlag(
        m.SetFlagRequest(scope="checkout", name="x", value=flag(True), options=opts())
    )
    await stub.SetFlag(
        m.SetFlagRequest(scope="checkout", name="x", value=flag(False), options=opts(ttl_ms=60_000))
    )
    extended = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="x", value=flag(False), options=opts(ttl_ms=120_000)
        )
    )
    assert extended.result.changed
    stored = await record(raw_etcd, key)
    assert stored is not None
    assert stored["replaced"]["value"] is True
    index = await raw_etcd.get_prefix(prefix + "expiries/")
    assert len(index) == 1
    assert (await audits(raw_etcd, prefix))[-1]["action"] == "flag.extend"

    permanent = await stub.SetFlag(
        m.SetFlagRequest(scope="checkout", name="x", value=flag(False), options=opts())
    )
    assert permanent.result.changed
    stored = await record(raw_etcd, key)
    assert (
        stored is not None and stored["replaced"] is None and stored["meta"]["expires_at"] is None
    )
    assert await raw_etcd.get_prefix(prefix + "expiries/") == {}


@pytest.fixture
async def make_server(
    etcd: EmbeddedEtcd, prefix: str
) -> AsyncIterator[Callable[[], Awaitable[ControlServer]]]:
    servers: list[ControlServer] = []

    async def make() -> ControlServer:
        srv = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
        await srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        await srv.stop(grace=0)


async def test_expiry_while_the_server_is_down_is_restored_at_start_once(
    make_server: Callable[[], Awaitable[ControlServer]], raw_etcd: RawEtcd, prefix: str
) -> None:
    first = await make_server()
    async with grpc.aio.insecure_channel(first.address) as ch:
        stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
        await stub.SetFlag(
            m.SetFlagRequest(scope="global", name="x", value=flag(True), options=opts())
        )
        resp = await stub.SetFlag(
            m.SetFlagRequest(scope="global", name="x", value=flag(False), options=opts(ttl_ms=2000))
        )
    await first.stop(grace=0)
    expires_at = resp.flag.meta.expires_at.ToDatetime().replace(tzinfo=utcnow().tzinfo)

    async def past_expiry() -> bool:
        return bool(utcnow() > expires_at + timedelta(milliseconds=200))

    await wait_for(past_expiry, 5, "the expiry time to pass")
    # Nobody restored it while no server ran.
    stored = await record(raw_etcd, prefix + "flags/global/x")
    assert stored is not None and stored["value"] is False

    await make_server()

    async def restored() -> bool:
        now = await record(raw_etcd, prefix + "flags/global/x")
        return now is not None and now["value"] is True

    await wait_for(restored, 10, "the restore at start")
    assert len(await audits(raw_etcd, prefix, "flag.expire")) == 1


def keep_alives(etcd: EmbeddedEtcd) -> float:
    """How many lease keep-alive streams etcd has served, from its own metrics."""
    return scraped_sum(
        etcd.endpoint, "grpc_server_started_total", having='grpc_method="LeaseKeepAlive"'
    )


async def test_an_idle_server_reads_nothing_and_restores_another_replicas_change_on_time(
    etcd: EmbeddedEtcd, raw_etcd: RawEtcd, prefix: str
) -> None:
    """No look at the expiry index while nothing is written (no health pings here
    either); a change written through another replica that then goes away is restored
    on time, woken by the write, not at the next look (``expiry_interval``, 30 s)."""
    quiet = ControlServer(
        server_config(etcd.endpoint, prefix, health_interval=3600.0), registry=CollectorRegistry()
    )
    await quiet.start()
    other = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    try:

        def reads() -> float:
            labels = {"operation": "range", "outcome": "ok"}
            name = "controlplane_etcd_operation_duration_seconds_count"
            return quiet.registry.get_sample_value(name, labels) or 0.0

        async def a_still_second() -> bool:
            before = reads()
            await asyncio.sleep(1.0)  # the window watched, not a wait for something
            return reads() == before

        await wait_for(a_still_second, 10, "a second without reads")
        # Its presence records' lease is kept alive every LEASE_REFRESH (3.3 s), as etcd
        # itself counts: not at every flush (twice a second).
        before = await asyncio.to_thread(keep_alives, etcd)
        await asyncio.sleep(4.0)  # the window watched
        assert await asyncio.to_thread(keep_alives, etcd) - before <= 2
        await other.start()
        async with grpc.aio.insecure_channel(other.address) as ch:
            stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
            resp = await stub.SetFlag(
                m.SetFlagRequest(
                    scope="global", name="y", value=flag(False), options=opts(ttl_ms=1500)
                )
            )
        await other.stop(grace=0)
        expires_at = resp.flag.meta.expires_at.ToDatetime().replace(tzinfo=utcnow().tzinfo)

        async def gone() -> bool:
            return await record(raw_etcd, prefix + "flags/global/y") is None

        await wait_for(gone, 10, "the restore by the server left")
        [expiry] = await audits(raw_etcd, prefix, "flag.expire")
        assert parse_time(expiry["time"]) - expires_at <= timedelta(seconds=1), expiry["time"]
    finally:
        await other.stop(grace=0)
        await quiet.stop(grace=0)


async def test_two_replicas_racing_on_the_same_expiries_write_each_restore_once(
    make_server: Callable[[], Awaitable[ControlServer]], raw_etcd: RawEtcd, prefix: str
) -> None:
    first = await make_server()
    await make_server()
    async with grpc.aio.insecure_channel(first.address) as ch:
        stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
        for i in range(10):
            await stub.SetFlag(
                m.SetFlagRequest(
                    scope="global", name=f"f{i}", value=flag(False), options=opts(ttl_ms=1000)
                )
            )

    async def all_gone() -> bool:
        return not await raw_etcd.get_prefix(prefix + "flags/")

    await wait_for(all_gone, 10, "every time-boxed flag to expire")
    expiries = await audits(raw_etcd, prefix, "flag.expire")
    assert sorted(a["name"] for a in expiries) == sorted(f"f{i}" for i in range(10))


async def test_bad_expiries_are_refused(stub: Stub, raw_etcd: RawEtcd, prefix: str) -> None:
    past = t.WriteOptions(reason="r")
    past.expires_at.FromDatetime(datetime(2020, 1, 1))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SetFlag(
            m.SetFlagRequest(scope="global", name="x", value=flag(True), options=past)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "2020-01-01T00:00:00Z is in the past: it is now " in details and "ttl" in details
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ClearFlag(
            m.ClearFlagRequest(scope="global", name="x", options=opts(ttl_ms=5000))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await raw_etcd.get_prefix(prefix) == {}


async def test_a_bad_index_entry_does_not_stop_expiry_and_missing_entries_are_rebuilt(
    make_server: Callable[[], Awaitable[ControlServer]], raw_etcd: RawEtcd, prefix: str
) -> None:
    await raw_etcd.put(prefix + "expiries/-1/flags/global/x", b"hand-written")
    # A short stamp sorts after every real one: never due, it must not look due forever.
    await raw_etcd.put(prefix + "expiries/5/flags/global/z", b"hand-written")
    # A time-boxed record written by hand, with no index entry.
    soon = utcnow() + timedelta(seconds=1)
    record = {
        "kind": "flag", "scope": "global", "name": "y", "value": False,
        "meta": {"actor": "a", "reason": "r", "set_at": "2026-01-01T00:00:00Z",
                 "expires_at": soon.strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
        "replaced": {"kind": "flag", "scope": "global", "name": "y", "value": True,
                     "meta": {"actor": "a", "reason": "r", "set_at": "2026-01-01T00:00:00Z"}},
    }  # fmt: skip
    await raw_etcd.put(prefix + "flags/global/y", json.dumps(record).encode())
    await make_server()

    async def restored() -> bool:
        now = await record_of(raw_etcd, prefix + "flags/global/y")
        return now is not None and now["value"] is True

    await wait_for(restored, 10, "the hand-written time-boxed flag to expire")
    assert await raw_etcd.get(prefix + "expiries/-1/flags/global/x") is None

    async def short_stamp_gone() -> bool:
        # Removed by the look that follows the restore (not by the restore itself).
        return await raw_etcd.get(prefix + "expiries/5/flags/global/z") is None

    await wait_for(short_stamp_gone, 10, "the short-stamp index key to be removed")
    assert await raw_etcd.get_prefix(prefix + "expiries/") == {}


async def record_of(raw: RawEtcd, key: str) -> dict[str, Any] | None:
    return await record(raw, key)
