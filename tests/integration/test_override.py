"""Break-glass overrides against a real control server on the session etcd.

An :class:`agents.AsyncAgent` runs in the test's loop (the server does too) and
watches an override file in the test's directory. What the server makes of the
agent's reports is read through its public API: ``GetStatus`` for the instance's
``override_active`` and ``ListHistory`` for the audit entries, polled with a
timeout since the server writes them on its own time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

import agents._filewatch
from agents import AsyncAgent, StateChange
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from controlplane.server import ControlServer
from tests.helpers.agent_log import AgentLog
from tests.integration.conftest import server_config

Stub = mitigation_pb2_grpc.MitigationServiceStub
SERVICE = "checkout"


# ---------------------------------------------------------------- helpers


def override_doc(**changes: Any) -> dict[str, Any]:
    """An override file's content, expiring in an hour unless told otherwise."""
    doc: dict[str, Any] = {
        "reason": "control plane down, errors on /pay",
        "actor": "sre@host-7",
        "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "flags": {"new-ui": False, "checkout.mode": "read-only"},
        "shedding": {"tier": "SHEDDABLE_PLUS", "percent": 50},
        "pin": "v1.4.2",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def write(path: Path, content: dict[str, Any] | str) -> None:
    """Write the override file as documented: a temporary file, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content if isinstance(content, str) else json.dumps(content))
    os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove the override file (a local file: no need to leave the loop for it)."""
    path.unlink()


def present(path: Path) -> bool:
    return path.exists()


def value(v: bool | str) -> t.FlagValue:
    return t.FlagValue(bool_value=v) if isinstance(v, bool) else t.FlagValue(string_value=v)


async def set_flag(stub: Stub, name: str, v: bool | str) -> int:
    response = await stub.SetFlag(
        m.SetFlagRequest(
            scope=SERVICE,
            name=name,
            value=value(v),
            options=t.WriteOptions(reason="server side", actor="oncall"),
        )
    )
    return int(response.result.revision)


class Changes:
    """The agent's on_change callback, for a test to wait on."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, StateChange]] = []
        self._arrived = asyncio.Event()

    def __call__(self, change: StateChange) -> None:
        self.seen.append((time.monotonic(), change))
        self._arrived.set()

    def mark(self) -> int:
        return len(self.seen)

    async def wait(
        self, check: Callable[[StateChange], bool], within: float, what: str, *, start: int = 0
    ) -> tuple[float, StateChange]:
        """The first change from index ``start`` on for which ``check`` holds, and
        when it came (monotonic)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    for at, change in self.seen[start:]:
                        if check(change):
                            return at, change
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no change {what} within {within}s: {self.seen}") from None


def override_applied(change: StateChange) -> bool:
    return change.override is not None and change.override[1] is not None


def override_gone(change: StateChange) -> bool:
    return change.override is not None and change.override[1] is None


async def poll(check: Callable[[], Awaitable[Any]], what: str, within: float = 10.0) -> Any:
    """Ask the server until ``check`` gives something truthy; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not show {what} within {within}s")
        await asyncio.sleep(0.05)


async def audited(stub: Stub, action: str) -> list[t.AuditEntry]:
    history = await stub.ListHistory(m.ListHistoryRequest(service=SERVICE, limit=1000))
    return [e for e in history.entries if e.action == action]


async def override_shown(stub: Stub, instance_id: str) -> bool | None:
    """The instance's ``override_active`` in status (None: not connected)."""
    status = await stub.GetStatus(m.GetStatusRequest(service=SERVICE))
    found = [i.override_active for i in status.instances if i.instance_id == instance_id]
    return found[0] if found else None


WITHIN = 5.0
"""Seconds a file's change gets to apply: only the file's watch can be that quick, as
the look where it cannot watch is made once a minute here (``no_looking``)."""


@pytest.fixture(autouse=True)
def no_looking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agents._filewatch, "FALLBACK_INTERVAL", 60.0)


@pytest.fixture
def override_path(tmp_path: Path) -> Path:
    return tmp_path / "checkout.override.json"


# ---------------------------------------------------------------- tests


async def test_an_override_file_applies_above_the_server_and_is_reported_and_audited_once(
    server: ControlServer, stub: Stub, override_path: Path
) -> None:
    await set_flag(stub, "new-ui", True)
    written = await set_flag(stub, "checkout.mode", "normal")
    assert server.hub is not None and await server.hub.wait_for_revision(written, 10)
    changes = Changes()
    registry = CollectorRegistry()
    agent = AsyncAgent(
        SERVICE,
        [server.address],
        version="v1.5.0",
        override_path=override_path,
        registry=registry,
        on_change=changes,
    )
    await agent.start()
    try:
        assert await agent.wait_ready(10)
        assert agent.value("checkout.mode") == "normal"
        assert agent.override_active is False
        assert await override_shown(stub, agent.instance_id) is False

        doc = override_doc()
        start = changes.mark()
        write(override_path, doc)
        _, applied = await changes.wait(override_applied, WITHIN, "applying it", start=start)
        assert applied.flags == {
            "new-ui": (True, False),
            "checkout.mode": ("normal", "read-only"),
        }
        assert agent.override_active is True
        assert agent.state == "READY"  # the override is above the state, not instead of it
        assert agent.enabled("new-ui", default=True) is False
        assert agent.value("checkout.mode") == "read-only"
        assert agent.should_shed("SHEDDABLE") is True
        assert agent.should_shed("CRITICAL") is False
        assert agent.pinned_version is not None
        assert agent.pinned_version.version == "v1.4.2"
        assert "override=active" in repr(agent)
        labels = {"service": SERVICE}
        assert registry.get_sample_value("controlplane_agent_override_active", labels) == 1

        # The server shows it in status and audits it once.
        assert await poll(
            lambda: override_shown(stub, agent.instance_id), "override_active in status"
        )
        [entry] = await poll(lambda: audited(stub, "override.applied"), "override.applied")
        assert entry.name == agent.instance_id
        assert (entry.actor, entry.reason) == ("sre@host-7", "control plane down, errors on /pay")
        assert json.loads(entry.after_json) == {
            "flags": {"checkout.mode": "read-only", "new-ui": False},
            "shedding": {"percent": 50, "tier": "SHEDDABLE_PLUS"},
            "pin": "v1.4.2",
        }
        assert entry.expires_at.ToDatetime(tzinfo=UTC) == datetime.fromisoformat(doc["expires_at"])

        # The server's state keeps changing underneath: an overridden flag does
        # not change the read, another one does, and the agent acks both.
        start = changes.mark()
        overridden = await set_flag(stub, "checkout.mode", "degraded")
        other = await set_flag(stub, "beta", True)
        await changes.wait(lambda c: "beta" in c.flags, 5, "the server's change", start=start)
        assert agent.revision >= other > overridden
        assert agent.value("checkout.mode") == "read-only"
        assert agent.enabled("beta") is True
        assert all("checkout.mode" not in c.flags for _, c in changes.seen[start:])
        waited = await stub.WaitApplied(m.WaitAppliedRequest(service=SERVICE, revision=other))
        assert waited.all_applied

        # The file goes: the server's latest applies again, and the server hears of it.
        start = changes.mark()
        remove(override_path)
        _, cleared = await changes.wait(override_gone, WITHIN, "removing it", start=start)
        assert cleared.flags["checkout.mode"] == ("read-only", "degraded")
        assert agent.override_active is False
        assert agent.value("checkout.mode") == "degraded"
        assert agent.enabled("new-ui") is True
        assert agent.pinned_version is None
        assert agent.should_shed("SHEDDABLE") is False
        [gone] = await poll(lambda: audited(stub, "override.cleared"), "override.cleared")
        assert gone.name == agent.instance_id
        assert "the override file was removed" in gone.reason
        assert await override_shown(stub, agent.instance_id) is False
        assert len(await audited(stub, "override.applied")) == 1
        assert registry.get_sample_value("controlplane_agent_override_active", labels) == 0
    finally:
        await agent.close()


async def test_a_malformed_override_file_is_rejected_logged_and_never_reported(
    server: ControlServer, stub: Stub, override_path: Path, agent_log: AgentLog
) -> None:
    written = await set_flag(stub, "new-ui", True)
    assert server.hub is not None and await server.hub.wait_for_revision(written, 10)
    changes = Changes()
    agent = AsyncAgent(SERVICE, [server.address], override_path=override_path, on_change=changes)
    await agent.start()
    try:
        assert await agent.wait_ready(10)
        start = changes.mark()
        # Every flag is valid but one: nothing of the file applies.
        bad = override_doc(flags={"new-ui": False, "Beta Flag": True}, shedding=None, pin=None)
        write(override_path, bad)
        record = await agent_log.wait("agent_override_rejected", str(override_path))
        assert record.levelno == logging.ERROR
        assert "'Beta Flag' is not a flag name" in record.getMessage()
        assert agent.override_active is False
        assert agent.enabled("new-ui") is True
        assert changes.seen[start:] == []
        # A valid file next: it is the first and only override the server hears of.
        good = override_doc(flags={"new-ui": False}, shedding=None, pin=None)
        write(override_path, good)
        await changes.wait(override_applied, WITHIN, "applying the valid file", start=start)
        assert agent.enabled("new-ui", default=True) is False
        [entry] = await poll(lambda: audited(stub, "override.applied"), "override.applied")
        assert json.loads(entry.after_json) == {"flags": {"new-ui": False}}
        # Malformed again while one is in force: the one in force stays.
        write(override_path, "{'flags': 'not json'}")
        await agent_log.wait("agent_override_rejected", "not valid JSON")
        assert agent.override_active is True
        assert agent.enabled("new-ui", default=True) is False
        assert await override_shown(stub, agent.instance_id) is True
    finally:
        await agent.close()


async def test_an_override_with_a_short_expiry_drops_by_itself(
    server: ControlServer, stub: Stub, override_path: Path
) -> None:
    written = await set_flag(stub, "new-ui", True)
    assert server.hub is not None and await server.hub.wait_for_revision(written, 10)
    changes = Changes()
    agent = AsyncAgent(SERVICE, [server.address], override_path=override_path, on_change=changes)
    await agent.start()
    try:
        assert await agent.wait_ready(10)
        expires_at = datetime.now(UTC) + timedelta(seconds=2)
        write(
            override_path,
            override_doc(expires_at=expires_at.isoformat(), flags={"new-ui": False}, pin=None),
        )
        await changes.wait(override_applied, WITHIN, "applying it")
        assert datetime.now(UTC) < expires_at, "applied after its expiry: nothing tested"
        assert agent.enabled("new-ui", default=True) is False
        assert agent.should_shed("SHEDDABLE") is True
        await poll(lambda: audited(stub, "override.applied"), "override.applied")

        _, dropped = await changes.wait(override_gone, 5, "expiring it")
        assert datetime.now(UTC) >= expires_at
        assert dropped.flags == {"new-ui": (False, True)}
        assert agent.override_active is False
        assert agent.enabled("new-ui") is True
        assert agent.should_shed("SHEDDABLE") is False
        assert present(override_path)  # the file stays; its time is over
        [gone] = await poll(lambda: audited(stub, "override.cleared"), "override.cleared")
        assert gone.reason.startswith("expired")
        assert await override_shown(stub, agent.instance_id) is False
    finally:
        await agent.close()


async def test_an_override_applies_while_the_server_is_unreachable_and_is_reported_when_back(
    etcd: EmbeddedEtcd, prefix: str, override_path: Path
) -> None:
    port = free_port()  # nothing listens there: the control plane is down
    changes = Changes()
    agent = AsyncAgent(
        SERVICE,
        [f"127.0.0.1:{port}"],
        override_path=override_path,
        instance_id="host-7",
        on_change=changes,
    )
    await agent.start()
    srv: ControlServer | None = None
    try:
        assert agent.state == "CONNECTING"
        # One override comes and goes while no server answers; another one stays.
        first = override_doc(flags={"new-ui": False}, shedding=None, pin=None)
        write(override_path, first)
        await changes.wait(override_applied, WITHIN, "applying it")
        assert agent.override_active is True
        assert agent.state == "CONNECTING"
        assert agent.enabled("new-ui", default=True) is False
        start = changes.mark()
        remove(override_path)
        await changes.wait(override_gone, WITHIN, "removing it", start=start)
        second = override_doc(reason="still down", flags=None, shedding=None)
        write(override_path, second)
        await changes.wait(override_applied, WITHIN, "applying the second", start=start)
        assert agent.pinned_version is not None and agent.pinned_version.version == "v1.4.2"
        assert agent.enabled("new-ui", default=True) is True

        # The control plane is back: the server hears of both, in order.
        srv = ControlServer(
            server_config(etcd.endpoint, prefix, listen=f"127.0.0.1:{port}"),
            registry=CollectorRegistry(),
        )
        await srv.start()
        assert await agent.wait_ready(15)
        assert agent.override_active is True
        async with srv_stub(srv) as stub:
            assert await poll(lambda: override_shown(stub, "host-7"), "override_active")
            applied = await poll(
                lambda: _at_least(audited(stub, "override.applied"), 2), "both overrides"
            )
            cleared = await audited(stub, "override.cleared")
            # Newest first.
            assert [e.reason for e in applied] == ["still down", first["reason"]]
            assert [json.loads(e.after_json) for e in applied] == [
                {"pin": "v1.4.2"},
                {"flags": {"new-ui": False}},
            ]
            assert len(cleared) == 1 and "removed" in cleared[0].reason
            assert applied[1].time.ToDatetime() <= cleared[0].time.ToDatetime()
            assert cleared[0].time.ToDatetime() <= applied[0].time.ToDatetime()
    finally:
        await agent.close()
        if srv is not None:
            await srv.stop(grace=0)


async def _at_least(entries: Awaitable[list[t.AuditEntry]], count: int) -> list[t.AuditEntry]:
    found = await entries
    return found if len(found) >= count else []


@contextlib.asynccontextmanager
async def srv_stub(srv: ControlServer) -> AsyncIterator[Stub]:
    """A MitigationService client for ``srv``."""
    async with grpc.aio.insecure_channel(srv.address) as channel:
        yield mitigation_pb2_grpc.MitigationServiceStub(channel)
