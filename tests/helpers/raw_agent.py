"""A bare Sync stream for tests of the server side (no SDK in between)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from controlplane.api.v1 import agent_pb2, agent_pb2_grpc


class RawAgent:
    """Opens Sync, records every response, acks (or nacks) on request."""

    def __init__(
        self,
        address: str,
        service: str,
        instance_id: str,
        *,
        last_applied: int = 0,
        version: str = "v1",
        auto_ack: bool = True,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        self.hello = agent_pb2.Hello(
            service=service,
            instance_id=instance_id,
            running_version=version,
            last_applied_revision=last_applied,
        )
        self.auto_ack = auto_ack
        self.received: list[agent_pb2.SyncResponse] = []
        self._outbox: asyncio.Queue[agent_pb2.SyncRequest | None] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: grpc.aio.AioRpcError | None = None

    async def __aenter__(self) -> RawAgent:
        # Each agent its own connection, as separate hosts would have.
        self._channel = grpc.aio.insecure_channel(
            self.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        call = stub.Sync(self._requests(), metadata=self.metadata)
        self._task = asyncio.create_task(self._read(call))
        await self._outbox.put(agent_pb2.SyncRequest(hello=self.hello))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._outbox.put(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close(grace=None)

    async def _requests(self) -> AsyncIterator[agent_pb2.SyncRequest]:
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            yield item

    async def _read(self, call: Any) -> None:
        try:
            async for response in call:
                self.received.append(response)
                self._arrived.set()
                if self.auto_ack:
                    revision = _revision(response)
                    if revision and response.WhichOneof("message") != "resume":
                        await self.ack(revision)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
            self._arrived.set()

    async def send(self, request: agent_pb2.SyncRequest) -> None:
        await self._outbox.put(request)

    async def ack(self, revision: int, rejected: str = "") -> None:
        await self._outbox.put(
            agent_pb2.SyncRequest(ack=agent_pb2.Ack(revision=revision, rejected_reason=rejected))
        )

    async def next(self, within: float = 10.0) -> agent_pb2.SyncResponse:
        """The next response not yet taken, waiting up to ``within`` seconds."""
        async with asyncio.timeout(within):
            while len(self.received) <= self._taken:
                if self.error is not None:
                    raise self.error
                self._arrived.clear()
                await self._arrived.wait()
        response = self.received[self._taken]
        self._taken += 1
        return response

    _taken = 0

    async def until_revision(self, revision: int, within: float = 10.0) -> agent_pb2.SyncResponse:
        """Take responses until one carries ``revision`` or later."""
        while True:
            response = await self.next(within)
            if _revision(response) >= revision:
                return response


def _revision(response: agent_pb2.SyncResponse) -> int:
    kind = response.WhichOneof("message")
    if kind == "snapshot":
        return int(response.snapshot.revision)
    if kind == "change":
        return int(response.change.revision)
    if kind == "resume":
        return int(response.resume.revision)
    return 0
