"""What on-call engineers watch: the age of mitigations without expiry, and changes not
applied by every connected agent."""

from __future__ import annotations

from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.server import ControlServer
from tests.helpers.raw_agent import RawAgent
from tests.integration.test_cli_e2e import connected

Stub = mitigation_pb2_grpc.MitigationServiceStub
AGE = "controlplane_mitigation_age_seconds"
UNAPPLIED = "controlplane_change_unapplied_seconds"


def opts(ttl: timedelta | None = None) -> t.WriteOptions:
    options = t.WriteOptions(reason="test", actor="oncall")
    if ttl is not None:
        options.ttl.CopyFrom(Duration(seconds=int(ttl.total_seconds())))
    return options


def set_at(meta: t.Meta) -> float:
    return meta.set_at.seconds + meta.set_at.nanos / 1e9


async def mirrored(server: ControlServer, revision: int) -> None:
    """Until the server's mirror (what the metric reads) has ``revision``."""
    assert server.hub is not None
    assert await server.hub.wait_for_revision(revision, 10.0)


async def test_mitigation_age_covers_every_record_in_force_without_expiry(
    server: ControlServer, stub: Stub
) -> None:
    old = await stub.SetFlag(
        m.SetFlagRequest(
            scope="global", name="old-ui", value=t.FlagValue(bool_value=False), options=opts()
        )
    )
    boxed = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout",
            name="new-ui",
            value=t.FlagValue(bool_value=False),
            options=opts(ttl=timedelta(hours=1)),
        )
    )
    shed = await stub.SetShedding(
        m.SetSheddingRequest(service="checkout", percent=30, options=opts())
    )
    pin = await stub.PinVersion(
        m.PinVersionRequest(service="checkout", version="v1.4.2", options=opts())
    )
    await mirrored(server, pin.result.revision)
    ages = server.metrics.mitigation_ages
    now = set_at(old.flag.meta) + 3600.0
    ages.clock = lambda: now
    registry = server.registry

    def age(kind: str, service: str, name: str = "") -> float | None:
        labels = {"kind": kind, "service": service, "name": name}
        return registry.get_sample_value(AGE, labels)

    assert age("flag", "global", "old-ui") == pytest.approx(3600.0)
    assert age("shedding", "checkout") == pytest.approx(now - set_at(shed.shedding.meta))
    assert age("pin", "checkout") == pytest.approx(now - set_at(pin.pin.meta))
    # A time-boxed change ends by itself: no age.
    assert boxed.flag.meta.HasField("expires_at")
    assert age("flag", "checkout", "new-ui") is None
    samples = [s for f in registry.collect() if f.name == AGE for s in f.samples]
    assert len(samples) == 3

    # A record that goes away takes its series with it.
    cleared = await stub.ClearFlag(
        m.ClearFlagRequest(scope="global", name="old-ui", options=opts())
    )
    await mirrored(server, cleared.result.revision)
    assert age("flag", "global", "old-ui") is None
    # A time-boxed layer over a record without expiry: what is in force ends by itself.
    layered = await stub.SetShedding(
        m.SetSheddingRequest(
            service="checkout", percent=50, options=opts(ttl=timedelta(minutes=30))
        )
    )
    await mirrored(server, layered.result.revision)
    assert age("shedding", "checkout") is None
    assert age("pin", "checkout") is not None


async def test_unapplied_change_gauge_counts_while_an_agent_is_behind(
    server: ControlServer, stub: Stub
) -> None:
    assert server.presence is not None
    presence = server.presence
    registry = server.registry
    async with (
        RawAgent(server.address, "checkout", "fast") as fast,
        RawAgent(server.address, "checkout", "slow", auto_ack=False) as slow,
    ):
        await connected(fast)
        await connected(slow)
        written = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False), options=opts()
            )
        )
        revision = written.result.revision
        await fast.until_revision(revision)
        await slow.until_revision(revision)
        presence.refresh_metrics()
        behind = registry.get_sample_value(UNAPPLIED, {"service": "checkout"})
        assert behind is not None and behind > 0

        # Every instance applied it: back to 0.
        await slow.ack(revision)
        while any(i.applied < revision for i in presence.local("checkout")):
            await presence.changed("checkout")  # set once every instance here applied it
        presence.refresh_metrics()
        assert registry.get_sample_value(UNAPPLIED, {"service": "checkout"}) == 0


async def test_an_agent_resuming_at_the_latest_change_is_not_behind(
    server: ControlServer, stub: Stub
) -> None:
    assert server.presence is not None
    presence = server.presence
    async with RawAgent(server.address, "checkout", "first") as first:
        await connected(first)
        written = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False), options=opts()
            )
        )
        revision = written.result.revision
        await first.until_revision(revision)
        # Its ack in: every instance here applied the change.
        while presence.local("checkout")[0].applied < revision:
            await presence.changed("checkout")
        # An agent that already has the change resumes from it: nothing to send, nothing
        # to ack; it must count as having applied it.
        async with RawAgent(server.address, "checkout", "second", last_applied=revision) as second:
            resumed = await second.next()
            assert resumed.WhichOneof("message") == "resume"
            presence.refresh_metrics()
            assert server.registry.get_sample_value(UNAPPLIED, {"service": "checkout"}) in (
                None,
                0,
            )
