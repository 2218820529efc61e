"""etcd's space quota: retention keeps a long run of writes under it; NOSPACE anyway is clear.

etcd runs with a small ``--quota-backend-bytes``. The servers run in this process (port 0)
so that the audit retention can be seconds rather than the command line's one-hour floor.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from agents import AsyncAgent
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from tests.faults.harness import RESULTS, scaled
from tests.integration.conftest import server_config

QUOTA = 16 * 1024 * 1024


def opts() -> t.WriteOptions:
    return t.WriteOptions(reason="space test", actor="fault-suite")


async def db_size(endpoint: str) -> tuple[int, list[Any]]:
    """etcd's backend size (bytes) and its alarms."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        maintenance: Any = rpc.MaintenanceStub(channel)
        status = await maintenance.Status(rpc.StatusRequest(), timeout=5)
        alarms = await maintenance.Alarm(rpc.AlarmRequest(action=rpc.AlarmRequest.GET), timeout=5)
    return int(status.dbSize), list(alarms.alarms)


async def test_audit_retention_keeps_a_long_run_of_writes_under_the_quota(
    tmp_path: Path,
) -> None:
    """Writes of ~25 KB (value, audit record with before and after) at a paced 100/s until
    two (full run: four) quotas' worth went through: with audit retention and etcd's
    compaction the backend stays under the quota; without them it would fill it twice."""
    etcd = EmbeddedEtcd(
        tmp_path / "etcd",
        name="cp-quota",
        quota_backend_bytes=QUOTA,
        auto_compaction_retention="1s",
    )
    etcd.start()
    config = server_config(
        etcd.endpoint,
        "/space/",
        audit_retention=timedelta(seconds=1),
        maintenance_interval=0.25,
    )
    server = ControlServer(config, registry=CollectorRegistry())
    await server.start()
    value = "v" * 8000
    per_write = 3 * len(value)  # the record, and the audit record's before and after
    goal = int(scaled(2, 4)) * QUOTA
    callers, rate = 4, 100.0
    written = 0
    failures: list[str] = []
    largest = 0
    started = time.monotonic()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)

            def going() -> bool:
                return written * per_write < goal and time.monotonic() - started < 120

            async def caller(index: int) -> None:
                nonlocal written
                n = 0
                next_at = time.monotonic()
                while going() and not failures:
                    try:
                        await stub.SetFlag(
                            m.SetFlagRequest(
                                scope="checkout",
                                name=f"f{index}",
                                value=t.FlagValue(string_value=f"{n}-{value}"),
                                options=opts(),
                            ),
                            timeout=5,
                        )
                        written += 1
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"{exc.code().name}: {exc.details()}")
                        return
                    n += 1
                    # Pacing (a steady 100 writes/s in all), not synchronisation.
                    next_at += callers / rate
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))

            async def watch_size() -> None:
                nonlocal largest
                while going() and not failures:
                    size, _ = await db_size(etcd.endpoint)
                    largest = max(largest, size)
                    await asyncio.sleep(0.25)  # sampling the size, not synchronising

            await asyncio.gather(watch_size(), *(caller(i) for i in range(callers)))
        size, alarms = await db_size(etcd.endpoint)
        largest = max(largest, size)
    finally:
        await server.stop(grace=0)
        etcd.stop()
    seconds = time.monotonic() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "space-retention.json").write_text(
        f'{{"name": "space-retention", "seconds": {seconds:.1f}, "writes": {written}, '
        f'"bytes_written": {written * per_write}, "quota_bytes": {QUOTA}, '
        f'"largest_db_bytes": {largest}, "failures": {len(failures)}}}\n'
    )
    assert not failures, failures[:3]
    assert not alarms
    assert written * per_write >= goal, f"only {written} writes in {seconds:.0f} s"
    assert largest < QUOTA


async def test_nospace_fails_writes_clearly_while_reads_and_agents_keep_working(
    tmp_path: Path,
) -> None:
    etcd = EmbeddedEtcd(
        tmp_path / "etcd",
        name="cp-nospace",
        quota_backend_bytes=2 * 1024 * 1024,
        auto_compaction_retention="0",  # off: nothing frees space by itself
    )
    etcd.start()
    server = ControlServer(server_config(etcd.endpoint, "/nospace/"), CollectorRegistry())
    await server.start()
    agent = AsyncAgent("checkout", [server.address], instance_id="nospace-agent")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            await stub.SetFlag(
                m.SetFlagRequest(
                    scope="checkout",
                    name="kill",
                    value=t.FlagValue(bool_value=True),
                    options=opts(),
                ),
                timeout=5,
            )
            changed = asyncio.Event()
            agent.on_change(lambda _: changed.set())
            await agent.start()
            assert await agent.wait_ready(10)
            # The first snapshot may trail the write by the server's watch latency.
            async with asyncio.timeout(5):
                while not agent.enabled("kill"):
                    changed.clear()
                    await changed.wait()
            big = "x" * 30_000
            refused: grpc.aio.AioRpcError | None = None
            for n in range(2000):
                try:
                    await stub.SetFlag(
                        m.SetFlagRequest(
                            scope="checkout",
                            name=f"fill{n % 20}",
                            value=t.FlagValue(string_value=f"{n}{big}"),
                            options=opts(),
                        ),
                        timeout=5,
                    )
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
            assert refused is not None, "etcd never ran out of space"
            assert refused.code() == grpc.StatusCode.UNAVAILABLE
            assert "space quota is full" in (refused.details() or "")
            # A write now fails the same way, fast; nothing is half-written.
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout", name="kill", value=t.FlagValue(bool_value=False),
                        options=opts(),
                    ),
                    timeout=5,
                )  # fmt: skip
            assert "space quota is full" in (again.value.details() or "")
            assert time.monotonic() - started < 1.0
            # Reads work, health stays SERVING (etcd answers), the agent keeps its state.
            flag = await stub.GetFlag(m.GetFlagRequest(scope="checkout", name="kill"), timeout=5)
            assert flag.flag.value.bool_value is True
            await stub.ListFlags(m.ListFlagsRequest(scope="checkout"), timeout=5)
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert agent.enabled("kill")
            assert agent.state == "READY"
    finally:
        await agent.close()
        await server.stop(grace=0)
        etcd.stop()
