"""The agent SDK against real control servers on the session etcd.

In-process where only the agent's own behaviour is at stake (a flip, acks, the
cache, failover, AsyncAgent); in processes of their own where it depends on it:
a server killed with SIGKILL and restarted on the same port, an expiry while the
server is down, and gunicorn workers forked with the agent already running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client import CollectorRegistry

from agents import Agent, AgentState, AsyncAgent, StateChange
from agents._cache import snapshot_from_cache
from agents._filewatch import FileWatch
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from controlplane.server import ControlServer
from tests.helpers.agent_process import ROOT, AgentProcess
from tests.helpers.agent_sync import cached_revision
from tests.helpers.agent_waits import serving
from tests.helpers.server_process import ServerProcess

Stub = mitigation_pb2_grpc.MitigationServiceStub


# ---------------------------------------------------------------- helpers


def flag_value(value: bool | str) -> t.FlagValue:
    if isinstance(value, bool):
        return t.FlagValue(bool_value=value)
    return t.FlagValue(string_value=value)


def write_options(ttl: float | None = None) -> t.WriteOptions:
    opts = t.WriteOptions(reason="agent test", actor="oncall")
    if ttl is not None:
        opts.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl), nanos=int(ttl % 1 * 1e9)))
    return opts


def set_flag_blocking(
    address: str, name: str, value: bool | str, *, scope: str = "checkout", ttl: float | None = None
) -> m.SetFlagResponse:
    """SetFlag over a short-lived blocking channel (for tests without a loop)."""
    with grpc.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response: m.SetFlagResponse = stub.SetFlag(
            m.SetFlagRequest(
                scope=scope, name=name, value=flag_value(value), options=write_options(ttl)
            ),
            timeout=10,
            wait_for_ready=True,
        )
    assert response.result.changed
    return response


def wait_applied_blocking(address: str, service: str, revision: int) -> m.WaitAppliedResponse:
    with grpc.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response: m.WaitAppliedResponse = stub.WaitApplied(
            m.WaitAppliedRequest(
                service=service, revision=revision, timeout=duration_pb2.Duration(seconds=10)
            ),
            timeout=15,
            wait_for_ready=True,
        )
    return response


class Launcher:
    """Starts server and agent processes and cleans up whatever is left."""

    def __init__(self, etcd: EmbeddedEtcd, prefix: str) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.servers: list[ServerProcess] = []
        self.agents: list[AgentProcess] = []

    def server(self, port: int = 0) -> ServerProcess:
        server = ServerProcess(self.etcd.endpoint, self.prefix, port)
        self.servers.append(server)
        return server

    def agent(self, servers: list[str], flags: list[str], **kwargs: Any) -> AgentProcess:
        agent = AgentProcess("checkout", servers, flags, **kwargs)
        self.agents.append(agent)
        agent.wait_for(lambda line: line["event"] == "started", what="started")
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.close()
        for server in self.servers:
            server.kill()


@pytest.fixture
def launch(etcd: EmbeddedEtcd, prefix: str) -> Iterator[Launcher]:
    launcher = Launcher(etcd, prefix)
    yield launcher
    launcher.close()


def dead_address() -> str:
    """A loopback address nothing listens on (free a moment ago)."""
    return f"127.0.0.1:{free_port()}"


def is_update(**expected: Any) -> Any:
    """A check for agent-process lines: an update with these fields and flags."""
    flags = expected.pop("flags", {})

    def check(line: dict[str, Any]) -> bool:
        return (
            line["event"] == "update"
            and all(line[k] == v for k, v in expected.items())
            and all(line["flags"].get(k) == v for k, v in flags.items())
        )

    return check


def timestamp(ts: Any) -> float:
    value: datetime = ts.ToDatetime(tzinfo=UTC)
    return value.timestamp()


# ---------------------------------------------------------------- in process


async def test_an_agent_sees_a_set_flag_within_a_second_and_acks_it(
    server: ControlServer, stub: Stub
) -> None:
    registry = CollectorRegistry()
    loop = asyncio.get_running_loop()
    seen: asyncio.Queue[tuple[float, StateChange]] = asyncio.Queue()

    def on_change(change: StateChange) -> None:
        loop.call_soon_threadsafe(seen.put_nowait, (time.monotonic(), change))

    agent = Agent(
        "checkout", [server.address], version="v1.5.0", registry=registry, on_change=on_change
    )
    states = [agent.state]
    agent.start()
    try:
        assert await asyncio.to_thread(agent.wait_ready, 10)
        states.append(agent.state)
        assert states == [AgentState.CONNECTING, "READY"]
        assert agent.enabled("new-ui", default=True) is True  # not set: the default

        start = time.monotonic()
        response = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="new-ui", value=flag_value(False), options=write_options()
            )
        )
        revision = response.result.revision
        arrived, change = await asyncio.wait_for(seen.get(), 5)
        assert change.revision == revision
        assert change.flags == {"new-ui": (None, False)}
        assert arrived - start < 1.0
        assert agent.enabled("new-ui", default=True) is False
        assert agent.revision == revision

        waited = await stub.WaitApplied(
            m.WaitAppliedRequest(
                service="checkout", revision=revision, timeout=duration_pb2.Duration(seconds=5)
            )
        )
        assert waited.all_applied
        assert (waited.connected, waited.applied) == (1, 1)
        status = await stub.GetStatus(m.GetStatusRequest(service="checkout"))
        [instance] = status.instances
        assert instance.instance_id == agent.instance_id
        assert instance.running_version == "v1.5.0"
        assert instance.applied_revision == revision

        labels = {"service": "checkout"}
        assert registry.get_sample_value("controlplane_agent_applied_revision", labels) == revision
        assert (
            registry.get_sample_value("controlplane_agent_state", {**labels, "state": "READY"}) == 1
        )
        assert (
            registry.get_sample_value("controlplane_agent_state", {**labels, "state": "STALE"}) == 0
        )
        assert (
            registry.get_sample_value("controlplane_agent_since_last_contact_seconds", labels) == 0
        )
    finally:
        await asyncio.to_thread(agent.close)
    states.append(agent.state)
    assert states[-1] is AgentState.STALE
    assert agent.enabled("new-ui", default=True) is False  # closed: still the last state
    assert registry.get_sample_value("controlplane_agent_state", {**labels, "state": "STALE"}) == 1


async def test_an_agent_boots_from_its_cache_when_no_server_answers(
    server: ControlServer, stub: Stub, tmp_path: Path
) -> None:
    cache = tmp_path / "cache" / "checkout.json"
    await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="mode", value=flag_value("read-only"), options=write_options()
        )
    )
    last = await stub.SetFlag(
        m.SetFlagRequest(
            scope="global", name="new-ui", value=flag_value(False), options=write_options()
        )
    )
    revision = last.result.revision
    with Agent("checkout", [server.address], cache_path=cache) as agent:
        assert await asyncio.to_thread(agent.wait_ready, 10)
        await serving(agent, revision)
        assert agent.revision == revision
    # close() wrote the last state; read it back independently of the agent.
    doc = json.loads(cache.read_bytes())
    assert (doc["service"], doc["revision"]) == ("checkout", revision)
    cached = snapshot_from_cache(cache.read_bytes(), "checkout", datetime.now(UTC))
    assert dict(cached.flags) == {"mode": "read-only", "new-ui": False}
    # No temp files left; the writers' lock file stays (it is never removed).
    assert sorted(p.name for p in cache.parent.iterdir()) == ["checkout.json", "checkout.json.lock"]

    seen: list[StateChange] = []
    booted = Agent("checkout", [dead_address()], cache_path=cache, on_change=seen.append)
    booted.start()
    try:
        # Served from the cache at once, and said so.
        assert booted.state is AgentState.STALE
        assert booted.value("mode", "full") == "read-only"
        assert booted.enabled("new-ui", default=True) is False
        assert booted.revision == revision
        assert not await asyncio.to_thread(booted.wait_ready, 0.5)
        assert booted.state is AgentState.STALE
    finally:
        await asyncio.to_thread(booted.close)
    # The callbacks heard of the loaded state (from the agent's thread).
    assert [c.flags for c in seen] == [{"mode": (None, "read-only"), "new-ui": (None, False)}]


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": 1, "service": "checkout", "revision": 12, "rec',
        b'{"format": 1}',
        b"\x00\xff",
        b'{"format": 1, "service": "checkout", "revision": 9223372036854775808, "records": {}}',
    ],
    ids=["truncated", "incomplete", "binary", "revision-beyond-int64"],
)
async def test_a_corrupt_cache_is_ignored_with_a_warning(
    server: ControlServer,
    stub: Stub,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    cache = tmp_path / "cache.json"
    cache.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="agents")
    agent = Agent("checkout", [dead_address()], cache_path=cache)
    agent.start()
    try:
        assert agent.state is AgentState.CONNECTING
        assert agent.value("mode", "full") == "full"
        assert agent.revision == 0
    finally:
        await asyncio.to_thread(agent.close)
    warnings = [r.getMessage() for r in caplog.records if "agent_cache_corrupt" in r.getMessage()]
    assert len(warnings) == 1
    assert str(cache) in warnings[0]
    # An agent that reaches a server replaces the corrupt cache with a good one.
    with Agent("checkout", [server.address], cache_path=cache) as agent:
        assert await asyncio.to_thread(agent.wait_ready, 10)
    assert json.loads(cache.read_bytes())["revision"] == agent.revision > 0


async def test_a_cache_of_another_service_is_not_used(
    server: ControlServer, stub: Stub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache.json"
    await stub.SetFlag(
        m.SetFlagRequest(
            scope="payments", name="mode", value=flag_value("off"), options=write_options()
        )
    )
    with Agent("payments", [server.address], cache_path=cache) as agent:
        assert await asyncio.to_thread(agent.wait_ready, 10)
    caplog.set_level(logging.WARNING, logger="agents")
    other = Agent("checkout", [dead_address()], cache_path=cache)
    other.start()
    try:
        assert other.state is AgentState.CONNECTING
        assert other.value("mode") is None
    finally:
        await asyncio.to_thread(other.close)
    assert any("agent_cache_corrupt" in r.getMessage() for r in caplog.records)


async def test_the_first_server_down_the_agent_connects_to_the_second(
    server: ControlServer, stub: Stub
) -> None:
    response = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout", name="mode", value=flag_value("lite"), options=write_options()
        )
    )
    with Agent("checkout", [dead_address(), server.address]) as agent:
        assert await asyncio.to_thread(agent.wait_ready, 10)
        assert agent.server == server.address
        await serving(agent, response.result.revision)
        assert agent.value("mode") == "lite"


async def test_a_snapshot_larger_than_the_stream_window_arrives_whole(
    server: ControlServer, stub: Stub
) -> None:
    """The agents' stream window is a fixed 256 KiB (no bandwidth probing): a 720 KB
    snapshot takes three windows and more, and arrives whole; changes follow."""
    big = "x" * 60_000
    last = 0
    for i in range(12):
        written = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name=f"blob-{i}", value=flag_value(f"{i}{big}"),
                options=write_options(),
            )
        )  # fmt: skip
        last = written.result.revision
    async with AsyncAgent("checkout", [server.address]) as agent:
        assert await agent.wait_ready(10)
        await serving(agent, last)
        assert [agent.value(f"blob-{i}") for i in range(12)] == [f"{i}{big}" for i in range(12)]
        flipped = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="blob-0", value=flag_value(f"new{big}"),
                options=write_options(),
            )
        )  # fmt: skip
        await serving(agent, flipped.result.revision)
        assert agent.value("blob-0") == f"new{big}"


async def test_async_agent_reads_and_sees_a_flip(server: ControlServer, stub: Stub) -> None:
    first = await stub.SetFlag(
        m.SetFlagRequest(
            scope="global", name="new-ui", value=flag_value(True), options=write_options()
        )
    )
    flipped = asyncio.Event()
    changes: list[StateChange] = []

    def on_change(change: StateChange) -> None:
        changes.append(change)
        if change.flags.get("new-ui", (None, None))[1] is False:
            flipped.set()

    async with AsyncAgent("checkout", [server.address], version="v2") as agent:
        assert await agent.wait_ready(10)
        assert agent.state is AgentState.READY
        await serving(agent, first.result.revision)
        assert agent.enabled("new-ui") is True
        assert agent.value("missing", "dflt") == "dflt"
        assert agent.should_shed("SHEDDABLE") is False
        assert agent.pinned_version is None

        agent.on_change(on_change)
        await stub.SetShedding(
            m.SetSheddingRequest(service="checkout", percent=100, options=write_options())
        )
        await stub.PinVersion(
            m.PinVersionRequest(service="checkout", version="v1.4.2", options=write_options())
        )
        response = await stub.SetFlag(
            m.SetFlagRequest(
                scope="checkout", name="new-ui", value=flag_value(False), options=write_options()
            )
        )
        await asyncio.wait_for(flipped.wait(), 5)
        assert agent.revision == response.result.revision
        assert agent.enabled("new-ui", default=True) is False  # the service's own entry wins
        assert agent.should_shed("SHEDDABLE") is True
        assert agent.should_shed("CRITICAL") is False
        pinned = agent.pinned_version
        assert pinned is not None and pinned.version == "v1.4.2"
        assert all(change.revision > 0 for change in changes)
    assert agent.state is AgentState.STALE


# ---------------------------------------------------------------- in processes


def test_server_killed_and_restarted_on_the_same_port(launch: Launcher, tmp_path: Path) -> None:
    port = free_port()
    server = launch.server(port)
    first = set_flag_blocking(server.address, "mode", "degraded").result.revision
    agent = launch.agent([server.address], ["mode"], cache_path=tmp_path / "cache.json")
    ready = agent.wait_for(
        is_update(state="READY", revision=first, flags={"mode": "degraded"}), what="ready"
    )

    after_ready = agent.mark()
    server.kill()
    stale = agent.wait_for(is_update(state="STALE"), start=after_ready, what="STALE")
    assert stale["flags"] == {"mode": "degraded"}
    assert stale["revision"] == first

    # A write while the agent's server is down, through another replica.
    other = launch.server()
    second = set_flag_blocking(other.address, "mode", "read-only").result.revision
    other.stop()
    mark = agent.mark()

    restarted = launch.server(port)
    assert restarted.address == server.address
    back = agent.wait_for(is_update(state="READY"), start=mark, what="READY again")
    assert back["flags"] == {"mode": "read-only"}
    assert back["revision"] >= second
    # Fail static: from one mitigation to the next, never through "unset", never back.
    updates = agent.updates
    modes = [u["flags"]["mode"] for u in updates[updates.index(ready) :]]
    assert modes == sorted(modes, key=["degraded", "read-only"].index)
    assert set(modes) == {"degraded", "read-only"}


def test_an_agent_killed_mid_burst_leaves_a_whole_cache_of_a_state_it_applied(
    launch: Launcher, tmp_path: Path
) -> None:
    """The cache's durability policy: written once a burst went by, so kill -9 in a
    burst leaves the file of an earlier state it applied, whole, never a part."""
    server = launch.server()
    cache = tmp_path / "cache.json"
    values = {set_flag_blocking(server.address, "mode", "m0").result.revision: "m0"}
    agent = launch.agent([server.address], ["mode"], cache_path=cache)
    first = max(values)
    agent.wait_for(is_update(state="READY", revision=first), what="ready")
    asyncio.run(_cached(cache, first))
    for index in range(1, 6):
        value = f"m{index}"
        values[set_flag_blocking(server.address, "mode", value).result.revision] = value
    last = max(values)
    agent.wait_for(is_update(revision=last, flags={"mode": "m5"}), what="the burst applied")
    agent.proc.kill()
    agent.proc.wait()
    booted = snapshot_from_cache(cache.read_bytes(), "checkout", datetime.now(UTC))
    # A state the agent applied, with that state's value: whole, never mixed.
    assert booted.revision in values
    assert booted.flags["mode"] == values[booted.revision]


async def _cached(path: Path, revision: int) -> None:
    """Wait until the cache file at ``path`` holds ``revision``."""
    with FileWatch(path) as watch:
        async with asyncio.timeout(10):
            while not path.exists() or cached_revision(path) < revision:  # noqa: ASYNC240
                await watch.wait()


def test_a_frozen_server_is_noticed_within_seconds(launch: Launcher) -> None:
    server = launch.server()
    revision = set_flag_blocking(server.address, "mode", "degraded").result.revision
    agent = launch.agent([server.address], ["mode"])
    agent.wait_for(is_update(state="READY", revision=revision), what="ready")
    mark = agent.mark()
    # SIGSTOP: the connection stays open (the kernel still answers TCP), nothing
    # replies: only the agent's keepalive pings can tell.
    server.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.time()
    try:
        stale = agent.wait_for(is_update(state="STALE"), timeout=20, what="STALE", start=mark)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    # A ping after 6 s idle, unanswered for 2 s: 8 s nominal; the rest is slack for a
    # busy machine (the point: seconds, not the minutes of TCP's own timeouts).
    assert stale["t"] - frozen_at < 15.0
    assert stale["flags"] == {"mode": "degraded"}
    back = agent.wait_for(is_update(state="READY"), what="READY again", start=agent.mark())
    assert back["flags"] == {"mode": "degraded"}


def test_a_time_boxed_change_expires_in_the_agent_while_the_server_is_down(
    launch: Launcher,
) -> None:
    server = launch.server()
    agent = launch.agent([server.address], ["new-ui"])
    agent.wait_for(is_update(state="READY"), what="ready")
    set_flag_blocking(server.address, "new-ui", True)
    # Long enough for the agent to get the box and notice the kill before it expires,
    # also on a busy machine (checked below: the test means nothing otherwise).
    boxed = set_flag_blocking(server.address, "new-ui", False, ttl=8)
    expires_at = timestamp(boxed.flag.meta.expires_at)
    boxed_line = agent.wait_for(
        is_update(revision=boxed.result.revision, flags={"new-ui": False}), what="the box"
    )

    server.kill()
    stale = agent.wait_for(
        is_update(state="STALE"), what="stale", start=agent.lines.index(boxed_line)
    )
    assert stale["flags"] == {"new-ui": False}
    assert stale["t"] < expires_at, "the server died too late for this test to mean anything"

    restored = agent.wait_for(
        is_update(flags={"new-ui": True}),
        timeout=expires_at - time.time() + 10,
        what="expired",
        start=agent.mark(),
    )
    assert restored["state"] == "STALE"
    assert restored["revision"] == boxed.result.revision  # the agent's own switch, no server
    # On time: the agent switches by itself at expires_at; the rest is the observer's
    # polling and a busy machine's scheduling slack.
    assert expires_at <= restored["t"] < expires_at + 1.5


# ---------------------------------------------------------------- gunicorn --preload


def http_get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback http)
            body: dict[str, Any] = json.loads(response.read())
            return body
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.parametrize("instance_id", [None, "web"], ids=["default-id", "given-id"])
def test_gunicorn_preload_workers_see_a_flip(
    launch: Launcher, tmp_path: Path, instance_id: str | None
) -> None:
    workers = 3
    server = launch.server()
    set_flag_blocking(server.address, "mode", "full")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
    env.update(
        CONTROLPLANE_SERVICE="checkout",
        CONTROLPLANE_SERVERS=server.address,
        CONTROLPLANE_VERSION="v-gunicorn",
        PYTHONUNBUFFERED="1",
        # Newer gunicorn opens a control socket under $HOME/.gunicorn: keep it in the test's.
        HOME=str(tmp_path),
    )
    if instance_id is not None:
        # One id for the master and every worker: each worker appends its pid.
        env["CONTROLPLANE_INSTANCE_ID"] = instance_id
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--preload",
                "--workers",
                str(workers),
                "--bind",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "5",
                "tests.helpers.agent_wsgi_app:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}/"

        def poll_workers(mode: str, within: float) -> dict[int, dict[str, Any]]:
            """Ask until ``workers`` distinct pids answered READY with ``mode``."""
            good: dict[int, dict[str, Any]] = {}
            deadline = time.monotonic() + within
            while len(good) < workers:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(
                        f"workers with mode {mode!r}: {sorted(good)} of {workers}\n"
                        + log_path.read_text()[-5000:]
                    )
                answer = http_get(url)
                if answer is None:  # not listening yet: poll gunicorn again shortly
                    time.sleep(0.02)
                    continue
                if answer["state"] == "READY" and answer["mode"] == mode:
                    good[answer["pid"]] = answer
                else:
                    good.pop(answer["pid"], None)
            return good

        before = poll_workers("full", 30)
        # Every worker has an agent (and an instance id) of its own, and so does the master.
        assert len({a["instance_id"] for a in before.values()}) == workers
        if instance_id is not None:
            assert {a["instance_id"] for a in before.values()} == {
                f"{instance_id}-{pid}" for pid in before
            }
        flip = set_flag_blocking(server.address, "mode", "degraded")
        after = poll_workers("degraded", 15)
        assert set(after) == set(before)  # the same workers, none restarted
        assert all(a["revision"] >= flip.result.revision for a in after.values())
        applied = wait_applied_blocking(server.address, "checkout", flip.result.revision)
        assert applied.all_applied
        assert applied.connected == workers + 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
