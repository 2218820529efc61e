"""The post-mortem timeline of an incident: every change, who, why, when applied everywhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from google.protobuf import duration_pb2

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.server import ControlServer
from tests.helpers.raw_agent import RawAgent

Stub = mitigation_pb2_grpc.MitigationServiceStub
CPCTL = Path(sys.executable).parent / "cpctl"


def opts(incident: str = "", ttl_ms: int = 0) -> t.WriteOptions:
    options = t.WriteOptions(reason="mitigate", actor="oncall", incident=incident)
    if ttl_ms:
        options.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_ms // 1000))
    return options


async def test_timeline_of_an_incident_with_an_expiry_a_revert_and_a_clear(
    server: ControlServer, stub: Stub
) -> None:
    async with RawAgent(server.address, "checkout", "i-1") as agent:
        await agent.next()
        flag = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="new-ui", value=t.FlagValue(bool_value=False),
                options=opts("INC-7"),
            )
        )  # fmt: skip
        await agent.until_revision(flag.result.revision)
        await stub.SetShedding(
            m.SetSheddingRequest(service="checkout", percent=30, options=opts("INC-7", 1000))
        )
        bundle = await stub.ApplyBundle(
            m.ApplyBundleRequest(
                name="pin-it",
                changes=[
                    m.BundleChange(
                        pin_version=m.PinVersionRequest(service="checkout", version="v1")
                    )
                ],
                options=opts("INC-7"),
            )
        )
        await stub.RevertBundle(
            m.RevertBundleRequest(bundle_id=bundle.bundle.id, options=opts())  # no incident
        )
        await stub.ClearFlag(
            m.ClearFlagRequest(scope="checkout", name="new-ui", options=opts())  # no incident
        )
        await stub.SetFlag(
            m.SetFlagRequest(
                scope="global", name="other", value=t.FlagValue(bool_value=True),
                options=opts("INC-8"),
            )
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            got = await stub.GetTimeline(m.GetTimelineRequest(incident="INC-7"))
            actions = [e.change.action for e in got.entries]
            if "shedding.expire" in actions:
                break
            assert time.monotonic() < deadline, f"no expiry in the timeline: {actions}"
            await asyncio.sleep(0.05)

    assert actions == [
        "flag.set", "shedding.set", "pin.set", "pin.revert", "flag.clear", "shedding.expire",
    ] or actions == [
        "flag.set", "shedding.set", "pin.set", "pin.revert", "shedding.expire", "flag.clear",
    ]  # fmt: skip
    times = [e.change.time.ToDatetime() for e in got.entries]
    assert times == sorted(times)
    first = got.entries[0]
    assert [(a.service, a.instances) for a in first.applied] == [("checkout", 1)]
    assert first.applied[0].applied_at.ToDatetime() >= first.change.time.ToDatetime()

    proc = await asyncio.create_subprocess_exec(
        str(CPCTL), "--server", server.address, "timeline", "--incident", "INC-7",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    text = stdout.decode()
    assert text.startswith("# Timeline of INC-7")
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 6
    assert "checkout: 1 at" in rows[0]
    assert "INC-8" not in text and "other" not in text
