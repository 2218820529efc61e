"""Pure tests of the hub's feeds and coalescing (no etcd)."""

from __future__ import annotations

import asyncio

from controlplane.api.v1 import agent_pb2
from controlplane.api.v1 import types_pb2 as pb
from controlplane.server.hub import Feed, coalesce


def flag(scope: str, name: str, value: bool) -> pb.Flag:
    return pb.Flag(scope=scope, name=name, value=pb.FlagValue(bool_value=value))


def test_coalesce_keeps_the_net_effect_at_the_newest_revision() -> None:
    changes = [
        agent_pb2.Change(revision=5, flags_set=[flag("global", "a", True)]),
        agent_pb2.Change(
            revision=7,
            flags_removed=[agent_pb2.FlagRef(scope="global", name="a")],
            shedding=pb.Shedding(service="s", percent=10),
        ),
        agent_pb2.Change(
            revision=9,
            flags_set=[flag("s", "b", False)],
            shedding_removed=True,
            pin=pb.Pin(service="s", version="v2"),
        ),
    ]
    merged = coalesce(changes)
    assert merged.revision == 9
    assert [(r.scope, r.name) for r in merged.flags_removed] == [("global", "a")]
    assert [(f.scope, f.name) for f in merged.flags_set] == [("s", "b")]
    assert merged.shedding_removed and not merged.HasField("shedding")
    assert merged.pin.version == "v2"
    assert not merged.pin_removed
    # A removal then a set of the same flag: the set wins.
    again = coalesce(
        [
            agent_pb2.Change(revision=1, flags_removed=[agent_pb2.FlagRef(scope="g", name="x")]),
            agent_pb2.Change(revision=2, flags_set=[flag("g", "x", True)]),
        ]
    )
    assert [f.name for f in again.flags_set] == ["x"]
    assert not again.flags_removed


def test_feed_window_and_resume() -> None:
    feed = Feed("s", revision=10, window=3)
    assert feed.since(10) == []
    assert feed.since(9) is None  # before the feed existed: unknown, snapshot
    for revision in (11, 12, 13, 14):
        feed.append(agent_pb2.Change(revision=revision))
    assert [c.revision for c in feed.since(12) or []] == [13, 14]
    assert feed.since(10) is None  # 11 fell out of the window
    assert [c.revision for c in feed.since(11) or []] == [12, 13, 14]
    feed.reset(20)
    assert feed.since(14) is None
    assert feed.since(20) == []


async def test_waiters_wake_on_append_and_reset() -> None:
    feed = Feed("s", revision=1, window=10)
    waiter = asyncio.create_task(feed.wait_past(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    feed.append(agent_pb2.Change(revision=2))
    await asyncio.wait_for(waiter, 1)
    behind = asyncio.create_task(feed.wait_past(2))
    await asyncio.sleep(0)
    feed.reset(1)  # a resync: the floor moves, streams must look again
    feed.reset(5)
    await asyncio.wait_for(behind, 1)


def test_a_full_window_keeps_the_newest_and_lookups_stay_exact() -> None:
    feed = Feed("s", revision=0, window=4)
    for revision in range(1, 20):
        feed.append(agent_pb2.Change(revision=revision * 2))
    assert [c.revision for c in feed.changes] == [32, 34, 36, 38]
    assert feed.floor == 30
    assert feed.since(29) is None
    assert [c.revision for c in feed.since(33) or []] == [34, 36, 38]
    assert feed.count_since(30) == 4
    assert feed.count_since(38) == 0
    assert agent_pb2.SyncResponse.FromString(feed.serialized(36)).change.revision == 36


def test_audit_feed_says_when_records_were_dropped() -> None:
    from controlplane.server.hub import AuditFeed

    history = AuditFeed(window=2)
    for revision in (5, 9, 12):
        history.append(revision, [revision])
    kept, dropped = history.since(6)
    assert [r for r, _ in kept] == [9, 12] and not dropped
    kept, dropped = history.since(4)
    assert dropped  # revision 5 fell out of the window
    _, dropped = history.since(7)
    assert not dropped  # sparse revisions are not a gap


async def test_snapshot_bytes_carry_the_current_revision_and_the_state() -> None:
    from typing import Any

    from prometheus_client import CollectorRegistry

    from controlplane.metrics import ServerMetrics
    from controlplane.server.hub import Hub

    hub = Hub(Any, ServerMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    hub._put("flags/global/a", flag("global", "a", True), 3)
    hub._put("flags/s/b", flag("s", "b", False), 4)
    hub._put("flags/other/c", flag("other", "c", True), 5)
    hub._put("pins/s", pb.Pin(service="s", version="v1"), 6)
    hub.revision = 7
    first = agent_pb2.SyncResponse.FromString(hub.snapshot_response("s")).snapshot
    assert first.revision == 7
    assert sorted((f.scope, f.name) for f in first.flags) == [("global", "a"), ("s", "b")]
    assert first.pin.version == "v1"
    hub.revision = 300  # relabelled without rebuilding (a multi-byte varint too)
    assert agent_pb2.SyncResponse.FromString(hub.snapshot_response("s")).snapshot == (
        agent_pb2.Snapshot(revision=300, flags=first.flags, pin=first.pin)
    )
