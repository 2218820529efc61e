"""A scripted Sync server on loopback for the agent client's unit tests, and the
records it sends.

It stands in for the control server (our own protocol, hand-written): it sends
what a test tells it to (malformed records, stale revisions, an older snapshot,
a dropped stream) and records the hellos and acks it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from agents import Agent, AgentState, AsyncAgent
from agents._codec import snapshot_from_proto
from agents._state import Snapshot
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.api.v1 import types_pb2 as t


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


def state(revision: int, *flags: t.Flag, service: str = "checkout") -> Snapshot:
    msg = agent_pb2.Snapshot(revision=revision, flags=flags)
    return snapshot_from_proto(service, msg, now())


def cached_revision(path: Path) -> int:
    revision: int = json.loads(path.read_bytes())["revision"]
    return revision


class WaitAck:
    """A script step: wait until the agent acked (or nacked) ``revision`` on this
    connection."""

    def __init__(self, revision: int) -> None:
        self.revision = revision


class Gate:
    """A script step: wait until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    def open(self) -> None:
        self.opened.set()


Step = agent_pb2.SyncResponse | WaitAck | Gate | str  # "abort": drop the stream (UNAVAILABLE)
Ack = tuple[int, str]


class ScriptedSync(agent_pb2_grpc.AgentServiceServicer):
    """Plays one script per connection, then holds the stream open until the agent
    closes its side (as the real server does) or goes."""

    def __init__(self, *scripts: list[Step]) -> None:
        self.scripts = list(scripts)
        self.hellos: list[agent_pb2.Hello] = []
        self.acks: list[Ack] = []
        self.connection_acks: list[list[Ack]] = []
        """The acks of each connection, in the order of ``hellos``."""
        self._changed = asyncio.Condition()

    async def Sync(self, request_iterator: Any, context: Any) -> None:
        first = await anext(request_iterator)
        acks: list[Ack] = []
        async with self._changed:
            self.hellos.append(first.hello)
            self.connection_acks.append(acks)
            self._changed.notify_all()
        script = self.scripts.pop(0) if self.scripts else []
        reader = asyncio.create_task(self._read(request_iterator, acks))
        try:
            for step in script:
                if isinstance(step, WaitAck):
                    await self._wait(functools.partial(_find, acks, step.revision))
                elif isinstance(step, Gate):
                    await step.opened.wait()
                elif step == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted drop")
                elif isinstance(step, agent_pb2.SyncResponse):
                    await context.write(step)
            await reader  # the agent closed its side: the stream ends
        finally:
            reader.cancel()

    async def _read(self, request_iterator: Any, acks: list[Ack]) -> None:
        async for request in request_iterator:
            if request.WhichOneof("message") == "ack":
                async with self._changed:
                    ack = (request.ack.revision, request.ack.rejected_reason)
                    acks.append(ack)
                    self.acks.append(ack)
                    self._changed.notify_all()

    async def _wait(self, found: Callable[[], Any], within: float = 10.0) -> Any:
        async with asyncio.timeout(within), self._changed:
            while True:
                result = found()
                if result is not None:
                    return result
                await self._changed.wait()

    async def wait_ack(self, revision: int, within: float = 10.0) -> Ack:
        """The first ack (or nack) of ``revision`` on any connection."""
        ack: Ack = await self._wait(lambda: _find(self.acks, revision), within)
        return ack

    async def wait_hellos(self, count: int, within: float = 10.0) -> None:
        """Until ``count`` connections said hello."""
        await self._wait(lambda: True if len(self.hellos) >= count else None, within)


def _find(acks: list[Ack], revision: int) -> Ack | None:
    return next((ack for ack in acks if ack[0] == revision), None)


async def serve(
    servicer: ScriptedSync, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
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


def record_states(states: list[AgentState]) -> Callable[[AsyncAgent | Agent], None]:
    """A ``setup`` that records each state the agent goes to, in order."""

    def setup(agent: AsyncAgent | Agent) -> None:
        agent.on_state(states.append)

    return setup
