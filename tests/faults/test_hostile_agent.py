"""Attacks on the audit trail, each written as the attack and asserting the refusal.

A server process with authentication on; the attacker holds an agent token for
``checkout`` (what any host of that service has), or write access to etcd for the
records too large to show.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane import model
from controlplane.api.v1 import agent_pb2, mitigation_pb2_grpc
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server._reports import MAX_REPORT_BYTES, REPORT_BURST, REPORT_EVERY
from controlplane.server.auth import hash_token
from controlplane.store import new_audit_id
from tests.helpers.raw_agent import RawAgent
from tests.helpers.raw_etcd import RawEtcd
from tests.helpers.server_process import ServerProcess

AGENT = "agent-token-0123456789"
VIEWER = "viewer-token-0123456789"
# gRPC's default: what a client that sets nothing accepts in one answer.
DEFAULT_RECEIVE = 4 * 1024 * 1024


@pytest.fixture
def guarded(etcd: EmbeddedEtcd, prefix: str, tmp_path: Path) -> Iterator[ServerProcess]:
    auth = tmp_path / "auth.json"
    auth.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "checkout-agents",
                        "role": "agent",
                        "services": ["checkout"],
                        "token_sha256": hash_token(AGENT),
                    },
                    {"name": "dashboard", "role": "viewer", "token_sha256": hash_token(VIEWER)},
                ]
            }
        )
    )
    auth.chmod(0o600)
    server = ServerProcess(etcd.endpoint, prefix, extra_args=["--auth-file", str(auth)])
    yield server
    server.stop()


def _viewer(address: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)  # nothing set: gRPC's 4 MiB per answer
    return channel, mitigation_pb2_grpc.MitigationServiceStub(channel)


def _auth() -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {VIEWER}"),)


async def _audit_records(raw_etcd: RawEtcd, prefix: str) -> dict[str, bytes]:
    return await raw_etcd.get_prefix(prefix + "audit/")


async def test_an_agent_flooding_override_reports_gets_few_small_audit_records(
    guarded: ServerProcess, raw_etcd: RawEtcd, prefix: str
) -> None:
    # The attack: 40 reports of 100 KB from one agent token, each with other content
    # and a made-up digest, to fill the audit trail and break history for everyone.
    started = time.monotonic()
    async with RawAgent(guarded.address, "checkout", "web-1", token=AGENT) as agent:
        await agent.next()  # the snapshot: the stream is accepted
        for i in range(40):
            content = json.dumps({"flags": {"new-ui": True}, "padding": f"{i}-" + "x" * 100_000})
            report = agent_pb2.Override(
                active=True,
                reason=f"flood {i}",
                actor="mallory",
                content_json=content,
                digest=secrets.token_hex(16),
            )
            await agent.send(agent_pb2.SyncRequest(override=report))
        # The server reads a stream's messages in order: once it warns of this ack,
        # every report before it was handled.
        await agent.ack(10**12)
        await asyncio.to_thread(guarded.wait_output, "agent_ack_beyond_sent")
    elapsed = time.monotonic() - started
    records = await _audit_records(raw_etcd, prefix)
    # At most the burst, and what the budget earned back while the attack ran.
    assert 1 <= len(records) <= REPORT_BURST + math.ceil(elapsed / REPORT_EVERY)
    dropped = sum("override_report_dropped" in line for line in guarded.output)
    assert dropped == 40 - len(records)
    for raw in records.values():
        assert len(raw) < 4 * MAX_REPORT_BYTES
        after = json.loads(raw)["after"]
        assert after["too_large"] is True
        assert after["bytes"] > 100_000
    # History still answers everyone, within gRPC's default answer size.
    channel, stub = _viewer(guarded.address)
    with channel:
        history = stub.ListHistory(m.ListHistoryRequest(service="checkout"), metadata=_auth())
        assert len(history.entries) == len(records)
        assert stub.ListHistory(m.ListHistoryRequest(service="payments"), metadata=_auth())


async def test_the_same_report_again_is_audited_once_whatever_digest_the_agent_sends(
    guarded: ServerProcess, raw_etcd: RawEtcd, prefix: str
) -> None:
    content = json.dumps({"flags": {"new-ui": False}})
    async with RawAgent(guarded.address, "checkout", "web-2", token=AGENT) as agent:
        await agent.next()
        for _ in range(5):
            report = agent_pb2.Override(
                active=True, reason="db down", content_json=content, digest=secrets.token_hex(16)
            )
            await agent.send(agent_pb2.SyncRequest(override=report))
        await agent.ack(10**12)
        await asyncio.to_thread(guarded.wait_output, "agent_ack_beyond_sent")
    records = await _audit_records(raw_etcd, prefix)
    assert len(records) == 1
    assert json.loads(next(iter(records.values())))["after"] == {"flags": {"new-ui": False}}


async def test_text_an_agent_reports_reaches_the_audit_trail_without_escape_sequences(
    guarded: ServerProcess, raw_etcd: RawEtcd, prefix: str
) -> None:
    # The attack: terminal escape sequences and a bidi override in what operators read.
    evil = "\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE \u202eeuqinu"
    async with RawAgent(guarded.address, "checkout", "web-3", token=AGENT) as agent:
        await agent.next()
        report = agent_pb2.Override(active=True, reason=evil, actor=evil, content_json="{}")
        await agent.send(agent_pb2.SyncRequest(override=report))
        await agent.ack(10**12)
        await asyncio.to_thread(guarded.wait_output, "agent_ack_beyond_sent")
    [raw] = (await _audit_records(raw_etcd, prefix)).values()
    record = json.loads(raw)
    for text in (record["reason"], record["actor"]):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\u001b]0;pwned" in record["reason"]


async def test_records_too_large_to_show_are_shown_truncated_never_an_error(
    guarded: ServerProcess, raw_etcd: RawEtcd, prefix: str
) -> None:
    # The attack (or an older version's records): audit records of over 1 MB each,
    # written straight into etcd, more of them than fit one answer of the store.
    now = datetime.now(UTC)
    for i in range(16):
        entry = model.AuditEntry(
            id=new_audit_id(now),
            time=now,
            actor="mallory",
            actor_authenticated=False,
            action="flag.set",
            kind="flag",
            scope="checkout",
            name=f"big-{i}",
            key=f"{prefix}flags/checkout/big-{i}",
            reason="padding",
            incident="INC-BIG",
            before=None,
            after={"padding": "x" * 1_200_000},
        )
        await raw_etcd.put(prefix + "audit/" + entry.id, json.dumps(entry.to_record()).encode())
    channel, stub = _viewer(guarded.address)
    with channel:
        for request in (
            m.ListHistoryRequest(),
            m.ListHistoryRequest(service="checkout"),
            m.ListHistoryRequest(incident="INC-BIG", limit=1000),
        ):
            history = stub.ListHistory(request, metadata=_auth())
            assert len(history.entries) == 16
            for shown in history.entries:
                after = json.loads(shown.after_json)
                assert after["truncated"] is True
                assert after["bytes"] > 1_200_000
            assert history.ByteSize() < DEFAULT_RECEIVE
        timeline = stub.GetTimeline(m.GetTimelineRequest(incident="INC-BIG"), metadata=_auth())
        assert len(timeline.entries) == 16
        assert timeline.ByteSize() < DEFAULT_RECEIVE


async def test_a_viewer_token_cannot_open_streams_without_end(guarded: ServerProcess) -> None:
    # The attack: one viewer token opens WatchChanges streams until the server gives out.
    # No limit is configured: the default for a viewer holds.
    async with grpc.aio.insecure_channel(guarded.address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        calls = []
        try:
            for _ in range(100):
                call = stub.WatchChanges(m.WatchChangesRequest(), metadata=_auth())
                await call.read()  # the first answer: the stream is open
                calls.append(call)
            refused = stub.WatchChanges(m.WatchChangesRequest(), metadata=_auth())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refused.read()
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == (
                "dashboard already has 100 open streams, its limit (max_streams in the auth "
                "file, else --max-streams-per-identity, else 100 for the viewer role)"
            )
        finally:
            for call in calls:
                call.cancel()


async def test_a_second_stream_with_an_instances_id_replaces_the_first_and_is_logged(
    guarded: ServerProcess,
) -> None:
    # The attack: a rogue agent takes a real instance's id, to hide it from status.
    async with RawAgent(
        guarded.address, "checkout", "web-1", token=AGENT, version="v1.5.0"
    ) as real:
        await real.next()
        start = len(guarded.output)
        async with RawAgent(
            guarded.address, "checkout", "web-1", token=AGENT, version="\x1b[2Jv6.6.6"
        ) as rogue:
            await rogue.next()
            replaced = await asyncio.to_thread(
                guarded.wait_output, "agent_stream_replaced", 15.0, start
            )
            assert "old_peer" in replaced.string and "new_peer" in replaced.string
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await real.next()  # the real one's stream ended: it would reconnect
            assert info.value.code() is grpc.StatusCode.ABORTED
            assert "replaced this one: two agents share an instance id" in str(info.value.details())
            channel, stub = _viewer(guarded.address)
            with channel:
                status = stub.GetStatus(m.GetStatusRequest(service="checkout"), metadata=_auth())
            [shown] = status.instances
            # What the rogue wrote is shown, never acted on by a terminal.
            assert shown.running_version == "\\u001b[2Jv6.6.6"
