"""Operating the server: bad records, retention, etcd outages, health, reflection, metrics."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd, etcd_version, free_port
from controlplane.server import ControlServer
from controlplane.store import etcd_version_risk, new_audit_id
from tests.helpers.raw_etcd import RawEtcd
from tests.integration.conftest import server_config

Stub = mitigation_pb2_grpc.MitigationServiceStub


def opts(reason: str = "test") -> t.WriteOptions:
    return t.WriteOptions(reason=reason, actor="oncall")


async def wait_until(predicate: Any, within: float = 10.0, what: str = "condition") -> None:
    """Poll an async predicate until it holds (an external process's state)."""
    deadline = time.monotonic() + within
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_corrupt_record_keeps_last_good_value_logs_and_counts(
    server: ControlServer, stub: Stub, raw_etcd: RawEtcd, prefix: str
) -> None:
    await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False), options=opts()
        )
    )
    await raw_etcd.put(prefix + "flags/checkout/new-ui", b'{"kind": "flag", "value": tru')
    # Never had a good value: treated as absent.
    await raw_etcd.put(prefix + "flags/checkout/typo", b"not json at all")
    # Valid JSON that breaks a rule (percent over 100).
    bad_shed = {
        "kind": "shedding",
        "service": "checkout",
        "tier": "SHEDDABLE",
        "percent": 150,
        "meta": {"actor": "x", "reason": "y", "set_at": "2026-01-01T00:00:00Z"},
    }
    await raw_etcd.put(prefix + "shedding/checkout", json.dumps(bad_shed).encode())

    with structlog.testing.capture_logs() as logs:
        got = await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="new-ui"))
        listed = await stub.ListFlags(m.ListFlagsRequest(scope="checkout"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetShedding(m.GetSheddingRequest(service="checkout"))

    # A kill switch must not turn a feature back on because of a typo.
    assert got.flag.value.bool_value is False
    assert [f.name for f in listed.flags] == ["new-ui"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    invalid = [e for e in logs if e["event"] == "record_invalid"]
    assert {e["key"].rsplit("/", 1)[-1] for e in invalid} >= {"new-ui", "typo", "checkout"}
    assert all(e["log_level"] == "error" for e in invalid)
    registry = server.registry
    # Counted on every read (the hub's watch reads them too).
    flag_count = registry.get_sample_value("controlplane_invalid_records_total", {"kind": "flag"})
    shed_count = registry.get_sample_value(
        "controlplane_invalid_records_total", {"kind": "shedding"}
    )
    assert flag_count is not None and flag_count >= 3
    assert shed_count is not None and shed_count >= 1

    # Fixing the record heals it.
    fixed = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="typo", value=t.FlagValue(string_value="ok"), options=opts()
        )
    )
    assert fixed.result.changed
    got = await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="typo"))
    assert got.flag.value.string_value == "ok"


async def test_a_write_repairs_a_corrupt_record_and_restarts_recover_the_last_good_value(
    etcd: EmbeddedEtcd, prefix: str, raw_etcd: RawEtcd
) -> None:
    key = prefix + "flags/checkout/new-ui"
    first = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await first.start()
    try:
        async with grpc.aio.insecure_channel(first.address) as ch:
            stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
            request = m.SetFlagRequest(
                scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False),
                options=opts(),
            )  # fmt: skip
            await stub.SetFlag(request)
    finally:
        await first.stop(grace=0)
    await raw_etcd.put(key, b"{oops")

    # A replica that never saw the good value (here: a restarted one) finds it in the
    # audit trail: the service keeps its own false, not the global default.
    second = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await second.start()
    try:
        async with grpc.aio.insecure_channel(second.address) as ch:
            stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
            got = await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="new-ui"))
            assert got.flag.value.bool_value is False
            # Setting the value in force over the corrupt bytes repairs them.
            repaired = await stub.SetFlag(request)
            assert repaired.result.changed
            raw = await raw_etcd.get(key)
            assert raw is not None and json.loads(raw[0])["value"] is False
            audits = [
                json.loads(v) for v in (await raw_etcd.get_prefix(prefix + "audit/")).values()
            ]
            repair = max(audits, key=lambda a: a["id"])
            assert repair["before"] == {"invalid_record": "{oops"}
            # Clearing a corrupt key that never had a good value deletes it.
            await raw_etcd.put(prefix + "flags/checkout/typo", b"garbage")
            cleared = await stub.ClearFlag(
                m.ClearFlagRequest(scope="checkout", name="typo", options=opts())
            )
            assert cleared.result.changed
            assert await raw_etcd.get(prefix + "flags/checkout/typo") is None
    finally:
        await second.stop(grace=0)


async def test_retention_removes_old_audit_records_only(
    etcd: EmbeddedEtcd, prefix: str, raw_etcd: RawEtcd
) -> None:
    old = datetime.now(UTC) - timedelta(days=31)
    old_key = f"{prefix}audit/{new_audit_id(old)}"
    await raw_etcd.put(old_key, b'{"kind": "audit"}')
    config = server_config(
        etcd.endpoint, prefix, audit_retention=timedelta(days=30), maintenance_interval=0.2
    )
    srv = ControlServer(config, registry=CollectorRegistry())
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
            resp = await stub.SetFlag(
                m.SetFlagRequest(
                    scope="global", name="x", value=t.FlagValue(bool_value=True), options=opts()
                )
            )

        async def old_gone() -> bool:
            return await raw_etcd.get(old_key) is None

        await wait_until(old_gone, what="the old audit record to be removed")
        assert await raw_etcd.get(f"{prefix}audit/{resp.result.audit_id}") is not None
        assert srv.registry.get_sample_value("controlplane_audit_records_deleted_total") == 1

        async def gauge_counts_the_flag() -> bool:
            value = srv.registry.get_sample_value(
                "controlplane_active_mitigations", {"kind": "flag"}
            )
            return value == 1

        await wait_until(gauge_counts_the_flag, what="the active-mitigations gauge")
    finally:
        await srv.stop(grace=0)


@pytest.fixture
async def fragile_server(fresh_etcd: EmbeddedEtcd) -> AsyncIterator[ControlServer]:
    config = server_config(fresh_etcd.endpoint, "/controlplane/v1/", etcd_timeout=1.0)
    srv = ControlServer(config, registry=CollectorRegistry())
    await srv.start()
    yield srv
    await srv.stop(grace=0)


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(resp.status)


@pytest.mark.etcd_fault
async def test_etcd_down_gives_unavailable_fast_not_serving_then_recovers(
    fragile_server: ControlServer, fresh_etcd: EmbeddedEtcd
) -> None:
    async with grpc.aio.insecure_channel(fragile_server.address) as ch:
        stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
        request = m.SetFlagRequest(
            scope="checkout", name="kill", value=t.FlagValue(bool_value=True), options=opts()
        )
        await stub.SetFlag(request)

        async def serving() -> bool:
            return bool(await health_status(ch) == health_pb2.HealthCheckResponse.SERVING)

        async def not_serving() -> bool:
            return bool(await health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING)

        await wait_until(serving, what="SERVING")

        fresh_etcd.stop()
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SetFlag(request, timeout=10)
        elapsed = time.monotonic() - start
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "etcd is unreachable" in (info.value.details() or "")
        # The server gives etcd at most --etcd-timeout (1 s here), with room for a busy VM.
        assert elapsed < 3.0
        # A call deadline shorter than --etcd-timeout wins.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="kill"), timeout=0.3)
        assert info.value.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        await wait_until(not_serving, what="NOT_SERVING")
        svc_status = await health_status(ch, "controlplane.api.v1.MitigationService")
        assert svc_status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert fragile_server.registry.get_sample_value("controlplane_etcd_up") == 0

        fresh_etcd.restart()
        await wait_until(serving, what="SERVING again after etcd restart")
        got = await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="kill"), timeout=5)
        assert got.flag.value.bool_value is True


@pytest.mark.etcd_fault
async def test_hung_etcd_gives_unavailable_after_the_etcd_timeout(
    fragile_server: ControlServer, fresh_etcd: EmbeddedEtcd
) -> None:
    async with grpc.aio.insecure_channel(fragile_server.address) as ch:
        stub = mitigation_pb2_grpc.MitigationServiceStub(ch)

        async def serving() -> bool:
            return bool(await health_status(ch) == health_pb2.HealthCheckResponse.SERVING)

        async def not_serving() -> bool:
            return bool(await health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING)

        await wait_until(serving, what="SERVING")
        fresh_etcd.pause()
        try:
            # The caller's deadline (0.3 s) is shorter than --etcd-timeout (1 s): the
            # server answers DEADLINE_EXCEEDED itself, within that deadline.
            with structlog.testing.capture_logs() as logs:
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="x"), timeout=0.3)
                await wait_until(
                    _logged_rpc(logs, "GetFlag"), what="the server's rpc event for GetFlag"
                )
            event = next(e for e in logs if e["event"] == "rpc" and e["method"] == "GetFlag")
            # The server gave up with the caller (its own answer, or the cancellation
            # when the caller's deadline passed), not after the 1 s etcd timeout.
            assert event["code"] in ("DEADLINE_EXCEEDED", "CANCELLED")
            assert event["duration_ms"] < 600

            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout", name="x", value=t.FlagValue(bool_value=True),
                        options=opts(),
                    ),
                    timeout=10,
                )  # fmt: skip
            elapsed = time.monotonic() - start
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no answer within" in (info.value.details() or "")
            assert 0.8 < elapsed < 3.0
            await wait_until(not_serving, what="NOT_SERVING while etcd hangs")
        finally:
            fresh_etcd.resume()
        await wait_until(serving, what="SERVING after etcd resumes")


def _logged_rpc(logs: list[MutableMapping[str, Any]], method: str) -> Any:
    async def seen() -> bool:
        return any(e["event"] == "rpc" and e.get("method") == method for e in logs)

    return seen


@pytest.mark.etcd_fault
async def test_a_hung_etcd_endpoint_is_left_for_the_next(
    fresh_etcd: EmbeddedEtcd, etcd: EmbeddedEtcd, prefix: str, raw_etcd: RawEtcd
) -> None:
    config = server_config(fresh_etcd.endpoint, prefix, etcd_timeout=1.0)
    config.etcd = [fresh_etcd.endpoint, etcd.endpoint]
    srv = ControlServer(config, registry=CollectorRegistry())
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
            await stub.ListFlags(m.ListFlagsRequest(), timeout=10)  # talking to the first
            fresh_etcd.pause()
            try:
                resp = await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="global", name="kill", value=t.FlagValue(bool_value=True),
                        options=opts(),
                    ),
                    timeout=10,
                )  # fmt: skip
            finally:
                fresh_etcd.resume()
        assert resp.result.changed
        assert await raw_etcd.get(prefix + "flags/global/kill") is not None
    finally:
        await srv.stop(grace=0)


async def test_several_etcd_endpoints_fail_over_to_a_live_member(
    etcd: EmbeddedEtcd, prefix: str, raw_etcd: RawEtcd
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    srv = ControlServer(server_config(dead, prefix), registry=CollectorRegistry())
    srv.config.etcd = [dead, etcd.endpoint]
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = mitigation_pb2_grpc.MitigationServiceStub(ch)
            resp = await stub.SetFlag(
                m.SetFlagRequest(
                    scope="global", name="kill", value=t.FlagValue(bool_value=True), options=opts()
                ),
                timeout=10,
            )
        assert resp.result.changed
        assert await raw_etcd.get(prefix + "flags/global/kill") is not None
    finally:
        await srv.stop(grace=0)


async def test_start_logs_each_etcd_version_and_warns_of_a_release_that_loses_writes(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    assert etcd.binary is not None
    version = "{}.{}.{}".format(*etcd_version(etcd.binary))
    dead = f"127.0.0.1:{free_port()}"
    srv = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    srv.config.etcd = [etcd.endpoint, dead]
    with structlog.testing.capture_logs() as logs:
        await srv.start()
    await srv.stop(grace=0)
    told = {
        e["endpoint"]: e for e in logs if e["event"] in ("etcd_version", "etcd_version_unknown")
    }
    assert told[etcd.endpoint]["event"] == "etcd_version"
    assert told[etcd.endpoint]["version"] == version
    assert told[dead]["event"] == "etcd_version_unknown"
    assert told[dead]["log_level"] == "warning"
    # The suite runs on etcd 3.4 and 3.5.1: whichever this is, the warning follows the rule.
    unsafe = [e for e in logs if e["event"] == "etcd_version_unsafe"]
    risk = etcd_version_risk(version)
    if risk is None:
        assert unsafe == []
    else:
        assert [(e["endpoint"], e["message"]) for e in unsafe] == [(etcd.endpoint, risk)]
        assert unsafe[0]["log_level"] == "warning"


async def test_reflection_lists_the_services(
    server: ControlServer, channel: grpc.aio.Channel
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for resp in stub.ServerReflectionInfo(requests()):
        names |= {s.name for s in resp.list_services_response.service}
    assert {
        "controlplane.api.v1.MitigationService",
        "controlplane.api.v1.AgentService",
        "grpc.health.v1.Health",
    } <= names


async def test_rpc_metrics_and_one_log_event_per_rpc(server: ControlServer, stub: Stub) -> None:
    with structlog.testing.capture_logs() as logs:
        await stub.SetFlag(
            m.SetFlagRequest(
                scope="global", name="x", value=t.FlagValue(bool_value=True), options=opts()
            )
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SetShedding(m.SetSheddingRequest(service="c", percent=150, options=opts()))
    rpc_events = [e for e in logs if e["event"] == "rpc"]
    assert [(e["method"], e["code"], e["actor"]) for e in rpc_events] == [
        ("SetFlag", "OK", "oncall"),
        ("SetShedding", "INVALID_ARGUMENT", "oncall"),
    ]
    assert all(e["duration_ms"] >= 0 for e in rpc_events)
    changes = [e for e in logs if e["event"] == "change_written"]
    assert [c["action"] for c in changes] == ["flag.set"]
    reg = server.registry
    assert reg.get_sample_value("controlplane_rpcs_total", {"method": "SetFlag", "code": "OK"}) == 1
    assert (
        reg.get_sample_value(
            "controlplane_rpcs_total", {"method": "SetShedding", "code": "INVALID_ARGUMENT"}
        )
        == 1
    )
    assert (
        reg.get_sample_value("controlplane_rpc_duration_seconds_count", {"method": "SetFlag"}) == 1
    )
    assert (
        reg.get_sample_value(
            "controlplane_etcd_operation_duration_seconds_count",
            {"operation": "txn", "outcome": "ok"},
        )
        == 1
    )


async def test_watch_streams_each_change_of_a_service_as_it_is_written(
    server: ControlServer, stub: Stub
) -> None:
    call = stub.WatchChanges(m.WatchChangesRequest(service="checkout"))
    stream = call.__aiter__()
    live = await asyncio.wait_for(anext(stream), 10)
    assert not live.changes and live.revision > 0
    first = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="a", value=t.FlagValue(bool_value=True), options=opts()
        )
    )
    got = await asyncio.wait_for(anext(stream), 10)
    assert got.revision == first.result.revision
    assert [(c.action, c.scope, c.name) for c in got.changes] == [("flag.set", "checkout", "a")]
    for scope in ("payments", "global"):
        await stub.SetFlag(
            m.SetFlagRequest(
                scope=scope, name="b", value=t.FlagValue(bool_value=True), options=opts()
            )
        )
    got = await asyncio.wait_for(anext(stream), 10)
    # payments' change is not checkout's business; the global one is.
    assert [(c.scope, c.name) for c in got.changes] == [("global", "b")]
    bundle = await stub.ApplyBundle(
        m.ApplyBundleRequest(
            name="two",
            changes=[
                m.BundleChange(pin_version=m.PinVersionRequest(service="checkout", version="v1")),
                m.BundleChange(set_shedding=m.SetSheddingRequest(service="checkout", percent=5)),
            ],
            options=opts(),
        )
    )
    got = await asyncio.wait_for(anext(stream), 10)
    assert got.revision == bundle.result.revision
    assert sorted(c.action for c in got.changes) == ["pin.set", "shedding.set"]
    call.cancel()


async def test_watch_rejects_a_bad_service_name(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchChanges(m.WatchChangesRequest(service="Bad")):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
