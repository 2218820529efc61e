"""The agent's client without etcd: the protocol paths a real server never takes.

A scripted Sync server on loopback (tests/helpers/agent_sync.py) stands in for
the control server: it sends what a test tells it to (malformed records, stale
revisions, an older snapshot, a dropped stream) and records the hellos and acks
it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

import agents._agent
import agents._client
import agents._client_state
import controlplane
from agents import Agent, AgentState, AsyncAgent, Backoff, StateChange
from agents._atomic import write_atomic
from agents._cache import CacheWriter, lock_path, snapshot_to_cache
from agents._filewatch import FileWatch
from controlplane.api.v1 import agent_pb2
from tests.helpers.agent_sync import (
    Gate,
    ScriptedSync,
    Step,
    WaitAck,
    cached_revision,
    change_msg,
    flag,
    now,
    record_states,
    running,
    serve,
    snapshot_msg,
    state,
)


class LogEvents(logging.Handler):
    """Lets a test wait for the agent's log events (from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self.loop = loop
        self.messages: list[str] = []
        self._arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.loop.call_soon_threadsafe(self._add, record.getMessage())

    def _add(self, message: str) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(self, event: str, within: float = 10.0) -> str:
        async with asyncio.timeout(within):
            while True:
                for message in self.messages:
                    if message.startswith(event):
                        return message
                self._arrived.clear()
                await self._arrived.wait()

    async def wait_count(self, event: str, count: int, within: float = 10.0) -> None:
        """Until ``count`` messages have started with ``event``."""
        async with asyncio.timeout(within):
            while sum(message.startswith(event) for message in self.messages) < count:
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
async def log_events() -> AsyncIterator[LogEvents]:
    handler = LogEvents(asyncio.get_running_loop())
    logger = logging.getLogger("agents")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_a_malformed_change_is_nacked_and_the_agent_resyncs_from_a_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    first_connection: list[Step] = [
        snapshot_msg(10, flag("a", True)),
        # Revision 11 sets "d" and carries another service's record: rejected whole.
        change_msg(11, flag("d", "valid part"), flag("a", False, scope="payments")),
        # Sent before the server read the nack: never applied on top of 10.
        change_msg(12, flag("b", "x")),
    ]
    second_connection: list[Step] = [
        snapshot_msg(12, flag("a", True), flag("d", "valid part"), flag("b", "x")),
        change_msg(9, flag("a", False)),  # older than the state: dropped, no ack
        change_msg(13, flag("c", "y")),
    ]
    servicer = ScriptedSync(first_connection, second_connection)
    states: list[AgentState] = []
    changes: list[StateChange] = []
    at_13 = asyncio.Event()

    def on_change(change: StateChange) -> None:
        changes.append(change)
        if change.revision == 13:
            at_13.set()

    async with running(servicer, record_states(states), on_change=on_change) as agent:
        await asyncio.wait_for(at_13.wait(), 10)
        await servicer.wait_ack(13)
        assert (agent.value("d"), agent.value("b"), agent.value("c")) == ("valid part", "x", "y")
        assert agent.enabled("a") is True
        assert agent.revision == 13
    (ack10, nack11), second = servicer.connection_acks
    assert ack10 == (10, "")
    assert nack11[0] == 11 and "scope 'payments'" in nack11[1]
    assert second == [(12, ""), (13, "")]
    # The second stream asked for a full snapshot, not a resume from 10.
    assert [hello.last_applied_revision for hello in servicer.hellos] == [0, 0]
    # Served: 10, then (no state without revision 11's valid parts) 12 and 13.
    assert [c.revision for c in changes] == [10, 12, 13]
    assert changes[1].flags == {"d": (None, "valid part"), "b": (None, "x")}
    # READY, lost, READY again on the snapshot, STALE once closed.
    assert states == [AgentState.READY, AgentState.STALE, AgentState.READY, AgentState.STALE]
    assert any("agent_change_rejected" in r.getMessage() for r in caplog.records)


async def test_a_malformed_snapshot_is_nacked_the_state_kept_and_the_agent_resyncs() -> None:
    gate = Gate()
    servicer = ScriptedSync(
        [
            snapshot_msg(10, flag("a", True)),
            WaitAck(10),
            snapshot_msg(11, flag("a", False), flag("z", "x", scope="payments")),
        ],
        [gate, snapshot_msg(12, flag("a", False))],
    )
    async with running(servicer) as agent:
        _, reason = await servicer.wait_ack(11)
        assert "scope 'payments'" in reason
        await servicer.wait_hellos(2)
        # Reconnected (the old state served meanwhile), asking for a snapshot.
        assert (agent.revision, agent.enabled("a")) == (10, True)
        assert agent.state is AgentState.STALE
        assert servicer.hellos[1].last_applied_revision == 0
        gate.open()
        assert await agent.wait_ready(10)
        await servicer.wait_ack(12)
        assert (agent.revision, agent.enabled("a", default=True)) == (12, False)
    assert servicer.connection_acks[0] == [(10, ""), (11, reason)]


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
async def test_an_agent_whose_first_snapshot_is_rejected_is_not_ready(
    tmp_path: Path, cached: bool
) -> None:
    kwargs: dict[str, Any] = {}
    if cached:
        kwargs["cache_path"] = tmp_path / "cache.json"
        write_atomic(kwargs["cache_path"], snapshot_to_cache(state(3, flag("mode", "cached"))))
    gate = Gate()
    servicer = ScriptedSync(
        [snapshot_msg(5, flag("mode", "x", scope="payments"))],
        [gate, snapshot_msg(6, flag("mode", "server"))],
    )
    states: list[AgentState] = []
    async with running(servicer, record_states(states), **kwargs) as agent:
        await servicer.wait_ack(5)
        await servicer.wait_hellos(2)
        # Never READY on a rejected snapshot: the defaults (or the cache) are served.
        waiting = AgentState.STALE if cached else AgentState.CONNECTING
        assert agent.state is waiting
        assert not agent._ready.is_set()
        assert states == ([AgentState.STALE] if cached else [])
        assert agent.value("mode") == ("cached" if cached else None)
        assert [h.last_applied_revision for h in servicer.hellos] == [3 if cached else 0, 0]
        gate.open()
        assert await agent.wait_ready(10)
        assert (agent.value("mode"), agent.revision) == ("server", 6)
    assert states[-2:] == [AgentState.READY, AgentState.STALE]  # STALE: closed
    assert AgentState.READY not in states[:-2]


async def test_a_change_before_the_first_snapshot_or_a_wrong_resume_is_not_ready() -> None:
    gate = Gate()
    servicer = ScriptedSync(
        [change_msg(4, flag("a", True))],
        [agent_pb2.SyncResponse(resume=agent_pb2.Resume(revision=3, server_revision=4))],
        [gate, snapshot_msg(5, flag("a", True))],
    )
    states: list[AgentState] = []
    async with running(servicer, record_states(states)) as agent:
        await servicer.wait_hellos(3)
        assert states == [] and agent.revision == 0
        assert [h.last_applied_revision for h in servicer.hellos] == [0, 0, 0]
        gate.open()
        assert await agent.wait_ready(10)
        assert agent.enabled("a") is True
        await servicer.wait_ack(5)
    assert [rev for rev, _ in servicer.acks] == [5]  # nothing acked before the snapshot


async def test_an_older_snapshot_replaces_the_cache_too(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    servicer = ScriptedSync(
        [snapshot_msg(20, flag("a", True)), WaitAck(20), "abort"],
        [snapshot_msg(15, flag("b", "x"))],
    )
    async with running(servicer, cache_path=cache):
        await servicer.wait_ack(15)
    # Closed: the last applied state is written, though the file held 20.
    assert cached_revision(cache) == 15


@pytest.mark.parametrize(("stable", "attempts"), [(None, 5), (0.0, 1)], ids=["default", "0s"])
async def test_the_backoff_restarts_only_after_a_session_that_stayed_up(
    monkeypatch: pytest.MonkeyPatch, stable: float | None, attempts: int
) -> None:
    if stable is None:
        assert agents._client.STABLE_SESSION == 5.0
    else:
        monkeypatch.setattr(agents._client, "STABLE_SESSION", stable)
    # A server that accepts each stream, answers, and drops it.
    drops: list[list[Step]] = [
        [snapshot_msg(5 + i, flag("a", True)), WaitAck(5 + i), "abort"] for i in range(5)
    ]
    servicer = ScriptedSync(*drops)
    backoff = Backoff(rand=lambda: 0.0)  # the delays: 0, so that the test is quick

    def setup(agent: AsyncAgent) -> None:
        agent._client.backoff = backoff

    async with running(servicer, setup):
        await servicer.wait_hellos(6)
        # Five sessions that answered and dropped at once: the bound kept growing
        # (0.05, 0.1, ... 1.6 s), unless a session counts as stable at once.
        assert backoff.attempt == attempts
    assert [rev for rev, _ in servicer.acks] == [5, 6, 7, 8, 9]


async def test_an_older_snapshot_replaces_the_state_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    servicer = ScriptedSync([snapshot_msg(20, flag("a", True)), snapshot_msg(15, flag("b", "x"))])
    async with running(servicer) as agent:
        await servicer.wait_ack(15)
        assert agent.revision == 15
        assert (agent.value("a"), agent.value("b")) == (None, "x")
    [warning] = [r for r in caplog.records if "agent_snapshot_older" in r.getMessage()]
    assert "revision=15 applied=20" in warning.getMessage()


async def test_callbacks_run_after_the_swap_and_a_failing_one_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = ScriptedSync(
        [snapshot_msg(3, flag("a", True)), WaitAck(3), change_msg(4, flag("a", False))]
    )
    seen: list[tuple[StateChange, object]] = []
    awaited: list[int] = []
    done = asyncio.Event()

    async def later(change: StateChange) -> None:
        awaited.append(change.revision)
        if change.revision == 4:
            done.set()

    removers = []

    def setup(agent: AsyncAgent) -> None:
        agent.on_change(lambda c: seen.append((c, agent.value("a"))))
        removers.append(agent.on_change(later))

    async with running(servicer, setup, on_change=lambda c: 1 / 0):
        await servicer.wait_ack(4)
        await asyncio.wait_for(done.wait(), 10)
        assert awaited == [3, 4]
        removers[0]()
        removers[0]()  # twice: harmless
    (first, a_then), (second, a_later) = seen
    assert (first.revision, first.flags) == (3, {"a": (None, True)})
    assert (second.revision, second.flags) == (4, {"a": (True, False)})
    # The new state is served by the time callbacks run.
    assert (a_then, a_later) == (True, False)
    assert any("agent_callback_failed" in r.getMessage() for r in caplog.records)


async def test_a_dropped_stream_keeps_the_state_and_resumes_from_the_last_revision() -> None:
    first_connection: list[Step] = [
        snapshot_msg(5, flag("mode", "degraded")),
        change_msg(6, flag("x", True)),
        WaitAck(6),
        "abort",
    ]
    servicer = ScriptedSync(
        first_connection,
        [
            agent_pb2.SyncResponse(resume=agent_pb2.Resume(revision=6, server_revision=7)),
            change_msg(7, flag("mode", "read-only")),
        ],
    )
    async with running(servicer) as agent:
        await servicer.wait_ack(7)
        assert agent.state is AgentState.READY
        assert agent.revision == 7
    first, second = servicer.hellos
    assert (first.service, first.instance_id, first.running_version) == ("checkout", "i-1", "v9")
    assert first.agent_version == controlplane.__version__
    assert first.last_applied_revision == 0
    assert second.last_applied_revision == 6
    assert [ack for ack, _ in servicer.acks] == [5, 6, 7]  # a Resume is not acked
    assert agent.value("mode") == "read-only" and agent.enabled("x") is True


async def test_a_lost_server_leaves_the_agent_stale_with_its_state(
    log_events: LogEvents,
) -> None:
    servicer = ScriptedSync([snapshot_msg(5, flag("mode", "degraded"))])
    server, address = await serve(servicer)
    agent = AsyncAgent("checkout", [address])
    await agent.start()
    try:
        await servicer.wait_ack(5)
        states = [agent.state]
        await server.stop(0)
        await log_events.wait_for("agent_disconnected")
        states.append(agent.state)
        assert states == [AgentState.READY, AgentState.STALE]
        assert agent.value("mode") == "degraded"
        assert agent.revision == 5
        assert not await agent.wait_ready(0.2)
    finally:
        await agent.close()


@contextlib.asynccontextmanager
async def agent_of_a_down_server(
    log_events: LogEvents,
) -> AsyncIterator[tuple[AsyncAgent, str, socket.socket]]:
    """An agent whose one server is a loopback port bound but not listening
    (connections refused, and no one else takes the port until the socket closes),
    once its first attempt failed. Closed at the end."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{holder.getsockname()[1]}"
        agent = AsyncAgent("checkout", [target])
        await agent.start()
        try:
            await log_events.wait_count("agent_connect_failed", 1)
            yield agent, target, holder
        finally:
            await agent.close()


async def test_a_server_that_is_down_is_retried_on_one_kept_channel(
    log_events: LogEvents,
) -> None:
    async with agent_of_a_down_server(log_events) as (agent, target, holder):
        client = agent._client
        kept = client._spares[target].channel
        await log_events.wait_count("agent_connect_failed", 4)
        # gRPC retried it in the background; no channel was made anew.
        assert client._spares[target].channel is kept
        failures = [m for m in log_events.messages if m.startswith("agent_connect_failed")]
        assert all("Connection refused" in message for message in failures), failures
        assert agent.state is AgentState.CONNECTING
        holder.close()  # the server comes up on that port
        servicer = ScriptedSync([snapshot_msg(5, flag("mode", "degraded"))])
        server, _ = await serve(servicer, target)
        try:
            await servicer.wait_ack(5)
            # The stream went over the kept channel, which is no spare any more.
            assert client._spares == {}
            assert kept.get_state() is grpc.ChannelConnectivity.READY
            assert agent.value("mode") == "degraded"
        finally:
            await server.stop(0)


async def test_a_kept_channel_is_made_anew_after_spare_max_age_and_closed_at_the_end(
    log_events: LogEvents, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents._client, "SPARE_MAX_AGE", 0.0)
    async with agent_of_a_down_server(log_events) as (agent, target, _holder):
        client = agent._client
        first = client._spares[target].channel
        await log_events.wait_count("agent_connect_failed", 3)
        assert client._spares[target].channel is not first
        assert first.get_state() is grpc.ChannelConnectivity.SHUTDOWN
        last = client._spares[target].channel
    assert client._spares == {} and client.closing_channels == []
    assert last.get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def test_a_time_boxed_flag_expires_in_the_agent_on_time() -> None:
    boxed = flag("mode", "degraded", expires_in=3.0)
    boxed.replaced.CopyFrom(flag("mode", "full"))
    expires_at = boxed.meta.expires_at.ToDatetime(tzinfo=UTC)
    servicer = ScriptedSync([snapshot_msg(8, boxed)])
    switched: list[tuple[datetime, StateChange]] = []
    expired_event = asyncio.Event()

    def on_change(change: StateChange) -> None:
        switched.append((now(), change))
        if change.flags.get("mode", (None, None))[1] == "full":
            expired_event.set()

    async with running(servicer, on_change=on_change) as agent:
        await servicer.wait_ack(8)
        assert now() < expires_at, "the snapshot arrived after its expiry: nothing tested"
        assert agent.value("mode") == "degraded"
        await asyncio.wait_for(expired_event.wait(), 15)
        assert agent.value("mode") == "full"
        assert agent.revision == 8  # the agent's own switch: no new revision
    (_, loaded), (at, expired) = switched
    assert loaded.flags == {"mode": (None, "degraded")}
    assert expired.flags == {"mode": ("degraded", "full")}
    # The agent switches by itself at expires_at; the slack is the loop's, on a busy machine.
    assert expires_at <= at < expires_at + timedelta(seconds=1.5)


async def test_the_threaded_agent_applies_and_closes_from_a_callback() -> None:
    servicer = ScriptedSync([snapshot_msg(3, flag("a", True)), change_msg(4, flag("a", False))])
    server, address = await serve(servicer)
    closed = asyncio.Event()
    acked = threading.Event()
    loop = asyncio.get_running_loop()
    agent = Agent("checkout", [address])

    def close_at_4(change: StateChange) -> None:
        if change.revision == 4:
            # Callbacks run after the ack: the server reads it while this one waits
            # (a close cancels the stream, which could drop an ack still unread).
            acked.wait(10)
            agent.close()  # from the agent's own thread: must not deadlock
            loop.call_soon_threadsafe(closed.set)

    agent.on_change(close_at_4)
    try:
        agent.start()
        await servicer.wait_ack(4)
        acked.set()
        await asyncio.wait_for(closed.wait(), 10)
        assert agent.enabled("a", default=True) is False
        with pytest.raises(RuntimeError, match="closed"):
            agent.start()
    finally:
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    assert [rev for rev, _ in servicer.acks] == [3, 4]


# ---------------------------------------------------------------- the cache writer


async def test_a_burst_of_changes_is_one_cache_write(tmp_path: Path) -> None:
    """A snapshot and ten changes in a burst: the cache is written once, with the
    newest state, after the burst."""
    cache = tmp_path / "cache.json"
    burst: list[Step] = [snapshot_msg(10, flag("a", True))]
    burst += [change_msg(revision, flag("a", revision % 2 == 0)) for revision in range(11, 21)]
    servicer = ScriptedSync(burst)
    async with running(servicer, cache_path=cache) as agent:
        await servicer.wait_ack(20)
        with FileWatch(cache) as watch:
            async with asyncio.timeout(10):
                while not cache.exists() or cached_revision(cache) != 20:
                    await watch.wait()
        writer = agent._client._cache
        assert writer is not None
        assert writer.writes == 1
    assert cached_revision(cache) == 20


async def test_the_cache_is_written_off_the_ack_path_and_at_once_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents._client_state, "CACHE_WRITE_DELAY", 30.0)
    cache = tmp_path / "cache.json"
    servicer = ScriptedSync([snapshot_msg(10, flag("a", True)), change_msg(11, flag("a", False))])
    async with running(servicer, cache_path=cache) as agent:
        await servicer.wait_ack(11)
        # Acknowledged and served, not yet written: the write waits for the burst.
        assert agent.enabled("a", default=True) is False
        assert not cache.exists()
    # Closing writes the last state at once.
    assert cached_revision(cache) == 11


def test_a_cache_writer_reads_back_only_a_file_it_did_not_write(tmp_path: Path) -> None:
    """Its own file's revision is known; another process's write is read back and
    a newer revision there is kept."""
    path = tmp_path / "cache.json"
    mine, other = CacheWriter(path), CacheWriter(path)
    assert mine.write(state(5, flag("a", True)), 1)
    assert mine.write(state(6, flag("a", False)), 2)
    assert mine.writes == 2
    assert other.write(state(9, flag("a", True)), 1)
    # The file is not the one `mine` left: read back, 9 is newer than 7.
    assert not mine.write(state(7, flag("a", True)), 3)
    assert cached_revision(path) == 9
    assert mine.writes == 2


def _open_paths() -> set[str]:
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_a_closed_agent_keeps_no_descriptor_of_its_cache_lock(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    servicer = ScriptedSync([snapshot_msg(10, flag("a", True))])
    async with running(servicer, cache_path=cache):
        await servicer.wait_ack(10)
    assert cached_revision(cache) == 10  # written (under the lock) at close
    assert str(lock_path(cache)) not in _open_paths()
