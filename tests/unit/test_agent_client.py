"""The agent's client without etcd: backoff, configuration, the cache file, and the
protocol paths a real server never takes.

For the last, a scripted Sync server on loopback stands in for the control
server (our own protocol, hand-written): it sends what a test tells it to
(malformed records, stale revisions, an older snapshot, a dropped stream) and
records the hellos and acks it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

import controlplane
from agents import Agent, AgentConfigError, AgentState, AsyncAgent, Backoff, StateChange
from agents._cache import CacheWriter, read_cache, write_atomic
from agents._config import default_instance_id, resolve_config
from agents._state import snapshot_from_proto, snapshot_to_cache
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.api.v1 import types_pb2 as t

# ---------------------------------------------------------------- backoff


def test_backoff_bounds_grow_from_50_ms_and_are_capped_at_2_s() -> None:
    highest = Backoff(rand=lambda: 0.999999)
    delays = [highest.next() for _ in range(10)]
    bounds = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 2.0]
    for delay, bound in zip(delays, bounds, strict=True):
        assert bound * 0.9999 < delay < bound
    lowest = Backoff(rand=lambda: 0.0)
    assert [lowest.next() for _ in range(10)] == [0.0] * 10


def test_backoff_is_full_jitter_within_its_bounds_and_resets() -> None:
    rng = random.Random(7)
    backoff = Backoff(rand=rng.random)
    delays = [backoff.next() for _ in range(2000)]
    assert all(0 <= d < min(2.0, 0.05 * 2 ** min(i, 10)) for i, d in enumerate(delays))
    capped = delays[10:]
    # Full jitter: spread over the whole range, not clustered near the bound.
    assert min(capped) < 0.1 and max(capped) > 1.9
    assert 0.9 < sum(capped) / len(capped) < 1.1
    backoff.reset()
    assert backoff.bound() == 0.05
    assert backoff.next() < 0.05
    assert Backoff(rand=rng.random).bound() == 0.05
    assert huge_attempt_bound() == 2.0


def huge_attempt_bound() -> float:
    backoff = Backoff()
    backoff.attempt = 10_000
    return backoff.bound()


# ---------------------------------------------------------------- configuration

ENV = {
    "CONTROLPLANE_SERVICE": "from-env",
    "CONTROLPLANE_SERVERS": "10.0.0.5:50051, 10.0.0.6:50051",
    "CONTROLPLANE_VERSION": "v-env",
    "CONTROLPLANE_INSTANCE_ID": "env-instance",
    "CONTROLPLANE_CACHE_PATH": "/var/cache/env.json",
}


def test_configuration_comes_from_arguments_before_the_environment() -> None:
    config = resolve_config(
        service="checkout",
        servers=["127.0.0.1:1"],
        version="v-arg",
        instance_id="arg-instance",
        cache_path="/tmp/arg.json",
        environ=ENV,
    )
    assert config.service == "checkout"
    assert config.servers == ("127.0.0.1:1",)
    assert config.version == "v-arg"
    assert config.instance_id == "arg-instance"
    assert config.cache_path == Path("/tmp/arg.json")
    assert config.instance_id_generated is False


def test_configuration_falls_back_to_the_environment_then_defaults() -> None:
    config = resolve_config(environ=ENV)
    assert config.service == "from-env"
    assert config.servers == ("10.0.0.5:50051", "10.0.0.6:50051")
    assert config.version == "v-env"
    assert config.instance_id == "env-instance"
    assert config.cache_path == Path("/var/cache/env.json")

    minimal = {"CONTROLPLANE_SERVICE": "checkout", "CONTROLPLANE_SERVERS": "h:1"}
    config = resolve_config(environ={**minimal, "CONTROLPLANE_VERSION": "  "})
    assert config.version == ""  # an empty variable is unset: the default
    assert config.cache_path is None
    assert config.instance_id_generated is True
    assert f"-{os.getpid()}-" in config.instance_id


def test_the_agent_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    agent = Agent(version="v-arg")
    assert (agent.service, agent.instance_id) == ("from-env", "env-instance")
    assert agent._client.config.version == "v-arg"
    assert agent.state is AgentState.CONNECTING
    assert agent.value("anything", 3) == 3
    agent.close()  # never started: harmless


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"servers": ["h:1"]}, "no service: pass service=... or set CONTROLPLANE_SERVICE"),
        ({"service": "checkout"}, "no servers: pass servers=[...] or set CONTROLPLANE_SERVERS"),
        ({"service": "checkout", "servers": [" ", ""]}, "servers is empty"),
        ({"service": "Check_out", "servers": ["h:1"]}, "is not a DNS label"),
        ({"service": "checkout", "servers": ["h"]}, "'h' is not host:port"),
        ({"service": "checkout", "servers": ["h:99999"]}, "is not host:port"),
        ({"service": "c", "servers": ["h:1"], "instance_id": "-x"}, "instance_id '-x' is invalid"),
    ],
)
def test_a_missing_or_invalid_setting_is_a_clear_error(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(AgentConfigError, match=re.escape(message)):
        resolve_config(environ={}, **kwargs)


def test_server_targets_may_be_grpc_uris() -> None:
    config = resolve_config(service="c", servers="dns:///cp.internal:50051,unix:/run/cp.sock")
    assert config.servers == ("dns:///cp.internal:50051", "unix:/run/cp.sock")


def test_default_instance_ids_are_valid_and_distinct() -> None:
    ids = {default_instance_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", i) for i in ids)


# ---------------------------------------------------------------- cache


def now() -> datetime:
    return datetime.now(UTC)


def meta(expires_in: float | None = None, **kw: Any) -> t.Meta:
    msg = t.Meta(actor="oncall", reason="test", **kw)
    msg.set_at.FromDatetime(now())
    if expires_in is not None:
        msg.expires_at.FromDatetime(now() + timedelta(seconds=expires_in))
    return msg


def flag(name: str, value: Any, *, scope: str = "checkout", **kw: Any) -> t.Flag:
    if isinstance(value, bool):
        v = t.FlagValue(bool_value=value)
    else:
        v = t.FlagValue(string_value=value)
    return t.Flag(scope=scope, name=name, value=v, meta=meta(**kw))


def snapshot_msg(revision: int, *flags: t.Flag) -> agent_pb2.SyncResponse:
    return agent_pb2.SyncResponse(snapshot=agent_pb2.Snapshot(revision=revision, flags=flags))


def change_msg(revision: int, *flags: t.Flag) -> agent_pb2.SyncResponse:
    return agent_pb2.SyncResponse(change=agent_pb2.Change(revision=revision, flags_set=flags))


def test_a_cache_write_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "cache.json"
    write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    inode = path.stat().st_ino
    with path.open("rb") as reader:
        write_atomic(path, b"second, longer")
        # A reader of the old file still sees all of it: a new file was renamed over it.
        assert reader.read() == b"first"
    assert path.read_bytes() == b"second, longer"
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


def test_a_failed_cache_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    target.mkdir()  # os.replace of a file over a directory fails after the write
    with pytest.raises(IsADirectoryError):
        write_atomic(target, b"data")
    assert target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]


def test_the_cache_writer_never_goes_back_and_logs_failures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    writer = CacheWriter(path)
    older = snapshot_from_proto("checkout", snapshot_msg(5, flag("a", True)).snapshot, now())
    newer = snapshot_from_proto("checkout", snapshot_msg(3, flag("a", False)).snapshot, now())
    assert writer.write(older, 1)
    assert writer.write(newer, 2)  # a lower revision, but applied later: written
    assert not writer.write(older, 1)  # a write that lost the race: skipped
    cached = read_cache(path, "checkout", now())
    assert cached is not None and cached.revision == 3 and cached.flags == {"a": False}

    caplog.set_level(logging.WARNING, logger="agents")
    broken = CacheWriter(tmp_path)  # a directory: cannot be replaced by a file
    assert not broken.write(newer, 1)
    assert any("agent_cache_write_failed" in r.getMessage() for r in caplog.records)


def test_reading_a_cache_missing_corrupt_or_for_another_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    path = tmp_path / "cache.json"
    assert read_cache(path, "checkout", now()) is None
    assert caplog.records == []  # no cache yet is normal: no warning

    path.write_bytes(b'{"format": 1, "serv')
    assert read_cache(path, "checkout", now()) is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "agent_cache_corrupt" in record.getMessage() and "not JSON" in record.getMessage()

    snap = snapshot_from_proto(
        "checkout",
        snapshot_msg(9, flag("mode", "lite"), flag("new-ui", True, scope="global")).snapshot,
        now(),
    )
    path.write_bytes(snapshot_to_cache(snap))
    assert read_cache(path, "payments", now()) is None
    assert "for service 'checkout'" in caplog.records[-1].getMessage()
    loaded = read_cache(path, "checkout", now())
    assert loaded is not None
    assert (loaded.revision, dict(loaded.flags)) == (9, {"mode": "lite", "new-ui": True})


def test_a_cached_time_boxed_change_expires_when_the_cache_is_read(tmp_path: Path) -> None:
    boxed = flag("mode", "degraded", expires_in=0.2)
    boxed.replaced.CopyFrom(flag("mode", "full"))
    snap = snapshot_from_proto("checkout", snapshot_msg(4, boxed).snapshot, now())
    path = tmp_path / "cache.json"
    path.write_bytes(snapshot_to_cache(snap))
    early = read_cache(path, "checkout", now())
    late = read_cache(path, "checkout", now() + timedelta(seconds=1))
    assert early is not None and early.flags["mode"] == "degraded"
    assert late is not None and late.flags["mode"] == "full"


# ---------------------------------------------------------------- the protocol, scripted


class WaitAck:
    """A script step: wait until the agent acked (or nacked) ``revision``."""

    def __init__(self, revision: int) -> None:
        self.revision = revision


Step = agent_pb2.SyncResponse | WaitAck | str  # "abort": drop the stream (UNAVAILABLE)


class ScriptedSync(agent_pb2_grpc.AgentServiceServicer):
    """Plays one script per connection, then holds the stream open."""

    def __init__(self, *scripts: list[Step]) -> None:
        self.scripts = list(scripts)
        self.hellos: list[agent_pb2.Hello] = []
        self.acks: list[tuple[int, str]] = []
        self._acked = asyncio.Condition()

    async def Sync(self, request_iterator: Any, context: Any) -> None:
        first = await anext(request_iterator)
        self.hellos.append(first.hello)
        script = self.scripts.pop(0) if self.scripts else []
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            for step in script:
                if isinstance(step, WaitAck):
                    await self.wait_ack(step.revision)
                elif step == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted drop")
                elif isinstance(step, agent_pb2.SyncResponse):
                    await context.write(step)
            await asyncio.Event().wait()
        finally:
            reader.cancel()

    async def _read(self, request_iterator: Any) -> None:
        async for request in request_iterator:
            if request.WhichOneof("message") == "ack":
                async with self._acked:
                    self.acks.append((request.ack.revision, request.ack.rejected_reason))
                    self._acked.notify_all()

    async def wait_ack(self, revision: int, within: float = 10.0) -> tuple[int, str]:
        async with asyncio.timeout(within), self._acked:
            while True:
                for ack in self.acks:
                    if ack[0] == revision:
                        return ack
                await self._acked.wait()


async def serve(servicer: ScriptedSync) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def running(
    servicer: ScriptedSync,
    setup: Callable[[AsyncAgent], object] = lambda agent: None,
    **kwargs: Any,
) -> AsyncIterator[AsyncAgent]:
    """An AsyncAgent (``setup`` called before its start) on a scripted server."""
    server, address = await serve(servicer)
    agent = AsyncAgent("checkout", [address], version="v9", instance_id="i-1", **kwargs)
    setup(agent)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()
        await server.stop(0)


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


async def test_a_malformed_change_is_nacked_and_the_state_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="agents")
    script: list[Step] = [
        snapshot_msg(10, flag("a", True)),
        change_msg(11, flag("a", False, scope="payments")),  # another service's record
        change_msg(12, flag("b", "x")),
        change_msg(9, flag("a", False)),  # older than the state: dropped, no ack
        change_msg(13, flag("c", "y")),
    ]
    servicer = ScriptedSync(script)
    async with running(servicer) as agent:
        await servicer.wait_ack(13)
        assert [rev for rev, _ in servicer.acks] == [10, 11, 12, 13]
        reasons = dict(servicer.acks)
        assert reasons[10] == reasons[12] == reasons[13] == ""
        assert "scope 'payments'" in reasons[11]
        # The rejected revision changed nothing; the later ones applied on top of 10.
        assert agent.enabled("a") is True
        assert (agent.value("b"), agent.value("c"), agent.revision) == ("x", "y", 13)
    assert any("agent_change_rejected" in r.getMessage() for r in caplog.records)


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


async def test_a_time_boxed_flag_expires_in_the_agent_on_time() -> None:
    boxed = flag("mode", "degraded", expires_in=0.4)
    boxed.replaced.CopyFrom(flag("mode", "full"))
    expires_at = boxed.meta.expires_at.ToDatetime(tzinfo=UTC)
    servicer = ScriptedSync([snapshot_msg(8, boxed)])
    switched: list[tuple[datetime, StateChange]] = []
    expired_event = asyncio.Event()

    def on_change(change: StateChange) -> None:
        switched.append((now(), change))
        if len(switched) == 2:
            expired_event.set()

    async with running(servicer, on_change=on_change) as agent:
        await servicer.wait_ack(8)
        assert agent.value("mode") == "degraded"
        await asyncio.wait_for(expired_event.wait(), 10)
        assert agent.value("mode") == "full"
        assert agent.revision == 8  # the agent's own switch: no new revision
    (_, loaded), (at, expired) = switched
    assert loaded.flags == {"mode": (None, "degraded")}
    assert expired.flags == {"mode": ("degraded", "full")}
    assert expires_at <= at < expires_at + timedelta(seconds=0.5)


async def test_the_threaded_agent_applies_and_closes_from_a_callback() -> None:
    servicer = ScriptedSync([snapshot_msg(3, flag("a", True)), change_msg(4, flag("a", False))])
    server, address = await serve(servicer)
    closed = asyncio.Event()
    loop = asyncio.get_running_loop()
    agent = Agent("checkout", [address])

    def close_at_4(change: StateChange) -> None:
        if change.revision == 4:
            agent.close()  # from the agent's own thread: must not deadlock
            loop.call_soon_threadsafe(closed.set)

    agent.on_change(close_at_4)
    try:
        agent.start()
        await asyncio.wait_for(closed.wait(), 10)
        assert agent.enabled("a", default=True) is False
        with pytest.raises(RuntimeError, match="closed"):
            agent.start()
    finally:
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    assert [rev for rev, _ in servicer.acks] == [3, 4]
