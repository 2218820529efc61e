"""What on-call engineers watch: the age of mitigations without expiry (metric and
`cpctl status`), and changes not applied by every connected agent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from tests.helpers.cpctl import Run
from tests.helpers.raw_agent import RawAgent
from tests.helpers.server_process import ServerProcess
from tests.integration.conftest import server_config
from tests.integration.test_cli_e2e import connected

Stub = mitigation_pb2_grpc.MitigationServiceStub
AGE = "controlplane_mitigation_age_seconds"
UNAPPLIED = "controlplane_change_unapplied_seconds"
STALE_AFTER = timedelta(milliseconds=1)
"""This module's servers call a mitigation stale 1 ms after it was set: already stale
by the time any other process asks (waiting on nothing)."""


@pytest.fixture
async def server(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[ControlServer]:
    config = server_config(etcd.endpoint, prefix, stale_after=STALE_AFTER)
    srv = ControlServer(config, registry=CollectorRegistry())
    await srv.start()
    yield srv
    await srv.stop(grace=0)


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


async def test_status_warns_of_a_mitigation_in_force_without_expiry_past_stale_after(
    server: ControlServer, cpctl: Run
) -> None:
    for args in (
        ("flag", "set", "checkout", "new-ui", "false", "--reason", "errors"),
        ("flag", "set", "checkout", "dark-mode", "false", "--reason", "r", "--ttl", "1h"),
        ("pin", "set", "checkout", "v1.4.2", "--reason", "bad deploy"),
    ):
        written = await cpctl(*args)
        assert written.returncode == 0, written.stderr

    status = await cpctl("status", "checkout")
    assert status.returncode == 0, status.stderr
    warnings = [line for line in status.stderr.splitlines() if "in force for" in line]
    assert len(warnings) == 2, status.stderr
    assert warnings[0].startswith("warning: flag new-ui has been in force for ")
    assert warnings[0].endswith(
        " with no expiry (stale after 0s): clear it once its incident is over "
        "(cpctl flag clear checkout new-ui --reason ...)"
    )
    assert warnings[1].startswith("warning: pin v1.4.2 has been in force for ")
    assert "dark-mode" not in status.stderr  # time-boxed: it ends by itself

    doc = json.loads((await cpctl("--json", "status", "checkout")).stdout)
    assert doc["stale_after"] == STALE_AFTER.total_seconds()
    assert [(s["kind"], s["scope"], s["name"]) for s in doc["stale"]] == [
        ("flag", "checkout", "new-ui"),
        ("pin", "checkout", "v1.4.2"),
    ]
    assert all(s["age"] > 0 for s in doc["stale"])

    cleared = await cpctl("flag", "clear", "checkout", "new-ui", "--reason", "over")
    assert cleared.returncode == 0, cleared.stderr
    status = await cpctl("status", "checkout")
    assert "new-ui" not in status.stderr
    assert "warning: pin v1.4.2 has been in force for " in status.stderr


async def test_serve_stale_after_is_the_threshold_status_answers_with(
    etcd: EmbeddedEtcd, prefix: str, cpctl: Run
) -> None:
    args = ["--stale-after", "90m"]
    process = await asyncio.to_thread(ServerProcess, etcd.endpoint, prefix, extra_args=args)
    try:
        status = await cpctl("--json", "status", "checkout", server_list=process.address)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["stale_after"] == 90 * 60
    finally:
        await asyncio.to_thread(process.stop)


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
