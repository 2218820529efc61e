"""The agents' Sync stream on a real server and etcd, with bare gRPC clients."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from controlplane import model
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from tests.helpers.raw_agent import RawAgent
from tests.integration.conftest import server_config

Stub = mitigation_pb2_grpc.MitigationServiceStub


def opts() -> t.WriteOptions:
    return t.WriteOptions(reason="test", actor="oncall")


async def set_flag(stub: Stub, scope: str, name: str, value: bool) -> int:
    resp = await stub.SetFlag(
        m.SetFlagRequest(
            scope=scope, name=name, value=t.FlagValue(bool_value=value), options=opts()
        )
    )
    return int(resp.result.revision)


async def test_snapshot_then_changes_in_revision_order(server: ControlServer, stub: Stub) -> None:
    await set_flag(stub, "global", "a", True)
    await set_flag(stub, "checkout", "b", False)
    written = await set_flag(stub, "payments", "c", False)  # another service's: not sent
    # The snapshot is the hub's view: let its watch see the writes first.
    assert server.hub is not None
    assert await server.hub.wait_for_revision(written, 10)
    async with RawAgent(server.address, "checkout", "i-1") as agent:
        first = await agent.next()
        assert first.WhichOneof("message") == "snapshot"
        names = sorted((f.scope, f.name) for f in first.snapshot.flags)
        assert names == [("checkout", "b"), ("global", "a")]
        revisions = []
        for i in range(5):
            revisions.append(await set_flag(stub, "checkout", "b", i % 2 == 0))
        await set_flag(stub, "payments", "c", True)
        seen: list[int] = []
        while not seen or seen[-1] < revisions[-1]:
            response = await agent.next()
            assert response.WhichOneof("message") == "change"
            assert [f.name for f in response.change.flags_set] == ["b"]
            seen.append(response.change.revision)
        assert seen == sorted(seen)
        assert set(seen) <= set(revisions)
        assert seen[-1] == revisions[-1]


async def test_a_bundle_reaches_an_agent_as_one_change(server: ControlServer, stub: Stub) -> None:
    async with RawAgent(server.address, "checkout", "i-1") as agent:
        await agent.next()
        resp = await stub.ApplyBundle(
            m.ApplyBundleRequest(
                name="degrade",
                changes=[
                    m.BundleChange(
                        set_flag=m.SetFlagRequest(
                            scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False)
                        )
                    ),
                    m.BundleChange(
                        set_shedding=m.SetSheddingRequest(service="checkout", percent=30)
                    ),
                    m.BundleChange(
                        pin_version=m.PinVersionRequest(service="checkout", version="v1")
                    ),
                ],
                options=opts(),
            )
        )
        change = (await agent.next()).change
        assert change.revision == resp.result.revision
        assert [f.name for f in change.flags_set] == ["new-ui"]
        assert change.shedding.percent == 30
        assert change.pin.version == "v1"


async def test_resume_sends_only_what_was_missed(server: ControlServer, stub: Stub) -> None:
    async with RawAgent(server.address, "checkout", "i-1") as agent:
        snapshot = (await agent.next()).snapshot
    await set_flag(stub, "checkout", "x", True)
    last = await set_flag(stub, "global", "y", True)
    async with RawAgent(server.address, "checkout", "i-1", last_applied=snapshot.revision) as agent:
        resume = await agent.next()
        assert resume.WhichOneof("message") == "resume"
        assert resume.resume.revision == snapshot.revision
        change = (await agent.next()).change
        assert change.revision == last
        assert sorted(f.name for f in change.flags_set) == ["x", "y"]


async def test_a_revision_the_server_cannot_serve_gets_a_snapshot(
    etcd: EmbeddedEtcd, prefix: str, server: ControlServer, stub: Stub
) -> None:
    early = await set_flag(stub, "checkout", "x", True)
    await set_flag(stub, "checkout", "x", False)
    # A new server process has no history before its start: a snapshot, never a gap.
    other = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await other.start()
    try:
        async with RawAgent(other.address, "checkout", "i-1", last_applied=early) as agent:
            first = await agent.next()
            assert first.WhichOneof("message") == "snapshot"
            assert first.snapshot.revision > early
            assert [f.value.bool_value for f in first.snapshot.flags] == [False]
    finally:
        await other.stop(grace=0)


async def test_bad_hello_is_refused(server: ControlServer) -> None:
    async with RawAgent(server.address, "Not A Service", "i-1") as agent:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent.next()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.service" in (info.value.details() or "")


async def test_status_and_wait(server: ControlServer, stub: Stub) -> None:
    await stub.PinVersion(m.PinVersionRequest(service="checkout", version="v1", options=opts()))
    zero = await stub.WaitApplied(
        m.WaitAppliedRequest(
            service="checkout", revision=1, timeout=duration_pb2.Duration(seconds=1)
        )
    )
    assert zero.connected == 0 and not zero.all_applied

    async with (
        RawAgent(server.address, "checkout", "i-1", version="v1") as one,
        RawAgent(server.address, "checkout", "i-2", version="v2", auto_ack=False) as two,
    ):
        await one.next()
        await two.next()
        revision = await set_flag(stub, "checkout", "kill", True)
        await one.until_revision(revision)
        await two.until_revision(revision)

        waited = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout",
                revision=revision,
                timeout=duration_pb2.Duration(nanos=300_000_000),
            )
        )
        assert not waited.all_applied
        assert (waited.connected, waited.applied) == (2, 1)
        assert [p.instance_id for p in waited.pending] == ["i-2"]

        await two.ack(revision, rejected="cannot parse")
        nacked = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout", revision=revision, timeout=duration_pb2.Duration(seconds=5)
            )
        )
        assert dict(nacked.nacks) == {"i-2": "cannot parse"}

        later = await set_flag(stub, "checkout", "kill", False)
        await two.until_revision(later)
        await two.ack(later)
        done = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout", revision=later, timeout=duration_pb2.Duration(seconds=5)
            )
        )
        assert done.all_applied and done.applied == 2
        registry = server.registry
        assert (
            registry.get_sample_value("controlplane_agents_connected", {"service": "checkout"}) == 2
        )
        # The first stream of the server is one of the timed ones.
        acks = registry.get_sample_value("controlplane_ack_lag_seconds_count")
        assert acks is not None and acks >= 1
        writes = registry.get_sample_value("controlplane_stream_write_delay_seconds_count")
        assert writes is not None and writes >= 1

        status = await stub.GetStatus(m.GetStatusRequest(service="checkout"))
        assert sorted(i.instance_id for i in status.instances) == ["i-1", "i-2"]
        assert all(i.applied_revision == later for i in status.instances)
        assert all(i.lag == 0 for i in status.instances)
        assert status.pin.version == "v1"
        assert dict(status.drift) == {"v2": 1}
        assert [f.name for f in status.flags] == ["kill"]

    import asyncio
    import time

    deadline = time.monotonic() + 10
    while (await stub.GetStatus(m.GetStatusRequest(service="checkout"))).instances:
        assert time.monotonic() < deadline, "disconnected agents still listed"
        await asyncio.sleep(0.05)


async def test_a_paused_agent_does_not_delay_the_others_and_catches_up(
    server: ControlServer, stub: Stub
) -> None:
    import asyncio
    import json
    import os
    import signal
    import sys
    import time

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.sync_printer", server.address, "checkout", "paused",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert first["kind"] == "snapshot"
        os.kill(proc.pid, signal.SIGSTOP)
        async with RawAgent(server.address, "checkout", "live") as live:
            await live.next()
            big = "x" * 30_000
            worst = 0.0
            for i in range(120):
                start = time.monotonic()
                resp = await stub.SetFlag(
                    m.SetFlagRequest(
                        scope="checkout", name="blob", options=opts(),
                        value=t.FlagValue(string_value=f"{i:04d}{big}"),
                    )
                )  # fmt: skip
                await live.until_revision(resp.result.revision)
                worst = max(worst, time.monotonic() - start)
            final = resp.result.revision
            # Each flip reached the live agent (write + delivery) within a second while
            # the paused one's stream was full.
            assert worst < 1.0
        os.kill(proc.pid, signal.SIGCONT)
        lines: list[dict[str, Any]] = []
        while not lines or lines[-1]["revision"] < final:
            lines.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)))
        assert lines[-1]["flags"]["blob"].startswith("0119")
        revisions = [line["revision"] for line in lines]
        assert revisions == sorted(revisions)
        assert len(set(revisions)) == len(revisions)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            await proc.wait()


async def test_compaction_behind_the_watch_forces_a_resync_with_a_snapshot(
    server: ControlServer, stub: Stub, raw_etcd: Any
) -> None:
    async with RawAgent(server.address, "checkout", "i-1") as agent:
        await agent.next()
        hub = server.hub
        assert hub is not None
        # The watch falls behind (as when its etcd member goes away for a while) ...
        await hub.stop()
        await set_flag(stub, "checkout", "x", True)
        last = await set_flag(stub, "global", "y", False)
        # ... and etcd compacts the history it would resume from.
        await raw_etcd.compact(await raw_etcd.revision())
        await hub.start()
        response = await agent.until_revision(last)
        assert response.WhichOneof("message") == "snapshot"
        assert sorted(f.name for f in response.snapshot.flags) == ["x", "y"]
    resyncs = server.registry.get_sample_value(
        "controlplane_resyncs_total", {"reason": "compacted"}
    )
    assert resyncs == 1


async def test_two_replicas_status_and_wait_see_the_agents_of_both(
    etcd: EmbeddedEtcd, prefix: str, server: ControlServer, stub: Stub
) -> None:
    import asyncio
    import time

    other = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await other.start()
    try:
        async with (
            RawAgent(server.address, "checkout", "on-first") as first,
            RawAgent(other.address, "checkout", "on-second") as second,
        ):
            await first.next()
            await second.next()
            revision = await set_flag(stub, "checkout", "kill", True)
            await first.until_revision(revision)
            await second.until_revision(revision)
            # Waiting through the first replica covers the second's agent too.
            done = await stub.WaitApplied(
                m.WaitAppliedRequest(
                    service="checkout", revision=revision, timeout=duration_pb2.Duration(seconds=10)
                )
            )
            assert done.all_applied
            assert (done.connected, done.applied) == (2, 2)
            status = await stub.GetStatus(m.GetStatusRequest(service="checkout"))
            by_id = {i.instance_id: i for i in status.instances}
            assert set(by_id) == {"on-first", "on-second"}
            assert by_id["on-first"].server_id != by_id["on-second"].server_id
            assert by_id["on-second"].applied_revision == revision
        # Agents gone from the second replica disappear from the first's status.
        deadline = time.monotonic() + 10
        while (await stub.GetStatus(m.GetStatusRequest(service="checkout"))).instances:
            assert time.monotonic() < deadline, "disconnected agents still listed"
            await asyncio.sleep(0.05)
    finally:
        await other.stop(grace=0)


async def test_when_all_instances_applied_a_change_is_recorded_and_pruned_with_the_audit(
    server: ControlServer, stub: Stub, raw_etcd: Any, prefix: str
) -> None:
    import asyncio
    import json
    import time

    presence = prefix.rstrip("/") + "-presence/"
    async with (
        RawAgent(server.address, "checkout", "i-1") as one,
        RawAgent(server.address, "checkout", "i-2") as two,
    ):
        await one.next()
        await two.next()
        revision = await set_flag(stub, "checkout", "kill", True)
        key = f"{presence}applied/{revision:020d}/checkout/{server.server_id}"
        deadline = time.monotonic() + 10
        while (got := await raw_etcd.get(key)) is None:
            assert time.monotonic() < deadline, "no applied record"
            await asyncio.sleep(0.05)
        record = json.loads(got[0])
        assert record["instances"] == 2
        assert record["all_acked_at"].endswith("Z")
        # A wait reports when the last instance applied it, not when it was asked.
        waited = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout", revision=revision, timeout=duration_pb2.Duration(seconds=5)
            )
        )
        assert waited.all_applied
        assert model.timestamp_to_datetime(waited.applied_at) == model.parse_time(
            record["all_acked_at"]
        )
    assert server.presence is not None
    assert await server.presence.prune_applied(revision + 1) == 1
    assert await raw_etcd.get(key) is None


async def test_a_lagging_replica_never_sends_an_agent_back_in_time(
    etcd: EmbeddedEtcd, prefix: str, server: ControlServer, stub: Stub, monkeypatch: Any
) -> None:
    from controlplane.server import _agent_service

    monkeypatch.setattr(_agent_service, "CATCH_UP_TIMEOUT", 0.5)
    lagging = ControlServer(server_config(etcd.endpoint, prefix), registry=CollectorRegistry())
    await lagging.start()
    try:
        assert lagging.hub is not None
        await lagging.hub.ready.wait()
        await lagging.hub.stop()  # its watch falls behind
        revision = await set_flag(stub, "checkout", "kill", True)
        async with RawAgent(lagging.address, "checkout", "i-1", last_applied=revision) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.next()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "behind etcd" in (info.value.details() or "")
    finally:
        await lagging.stop(grace=0)


async def test_acks_beyond_what_was_sent_are_ignored_and_coalesced_nacks_count(
    server: ControlServer, stub: Stub
) -> None:
    async with RawAgent(server.address, "checkout", "i-1", auto_ack=False) as agent:
        snapshot = (await agent.next()).snapshot
        await agent.ack(10**12)  # a claim it cannot have earned
        waited = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout", revision=snapshot.revision,
                timeout=duration_pb2.Duration(nanos=300_000_000),
            )
        )  # fmt: skip
        assert not waited.all_applied
        assert [p.instance_id for p in waited.pending] == ["i-1"]
        await agent.ack(snapshot.revision)
    first = await set_flag(stub, "checkout", "a", True)
    last = await set_flag(stub, "checkout", "b", True)
    # Resuming from the snapshot: the two changes arrive coalesced, as ``last``.
    async with RawAgent(
        server.address, "checkout", "i-1", last_applied=snapshot.revision, auto_ack=False
    ) as agent:
        assert (await agent.next()).WhichOneof("message") == "resume"
        change = (await agent.next()).change
        assert change.revision == last
        await agent.ack(last, rejected="cannot apply b")
        waited = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout", revision=first, timeout=duration_pb2.Duration(seconds=5)
            )
        )
        assert dict(waited.nacks) == {"i-1": "cannot apply b"}


async def test_a_break_glass_override_shows_in_status_and_is_audited_once(
    server: ControlServer, stub: Stub
) -> None:
    import asyncio
    import json
    import time

    from controlplane.api.v1 import agent_pb2

    content = json.dumps({"flags": {"new-ui": False}})
    override = agent_pb2.Override(
        active=True, reason="control plane down, errors on /pay", actor="sre@host-7",
        content_json=content, digest="d1",
    )  # fmt: skip
    agent = RawAgent(server.address, "checkout", "host-7")
    agent.hello.override.CopyFrom(override)
    async with agent:
        await agent.next()

        async def audited(action: str) -> list[Any]:
            history = await stub.ListHistory(m.ListHistoryRequest(service="checkout"))
            return [e for e in history.entries if e.action == action]

        deadline = time.monotonic() + 10
        while not (applied := await audited("override.applied")):
            assert time.monotonic() < deadline, "the override was not audited"
            await asyncio.sleep(0.05)
        assert applied[0].name == "host-7"
        assert applied[0].actor == "sre@host-7"
        assert json.loads(applied[0].after_json) == {"flags": {"new-ui": False}}
        status = await stub.GetStatus(m.GetStatusRequest(service="checkout"))
        assert [i.override_active for i in status.instances] == [True]
        # Reported again (same digest): not audited twice. Then removed: audited once.
        await agent.send(agent_pb2.SyncRequest(override=override))
        await agent.send(
            agent_pb2.SyncRequest(override=agent_pb2.Override(active=False, digest="d1"))
        )
        while not await audited("override.cleared"):
            assert time.monotonic() < deadline, "the cleared override was not audited"
            await asyncio.sleep(0.05)
        assert len(await audited("override.applied")) == 1
        status = await stub.GetStatus(m.GetStatusRequest(service="checkout"))
        assert [i.override_active for i in status.instances] == [False]
