"""What gRPC itself costs an agent: the floor under ``bench_agent_cost``'s figures.

A :class:`BareAgent` does what the protocol asks of an agent and nothing else:
one grpc.aio channel with the SDK's options, one Sync stream, the Hello, then
each message read and acknowledged; only the flags' values are kept (no
validation, no layers, no expiry, no cache, no callbacks beyond the
benchmark's own). Run by ``benchmarks._agent_worker --sdk bare``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from agents._channels import CHANNEL_OPTIONS
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.api.v1 import types_pb2 as t

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class BareChange:
    """What the benchmark's callback reads of a change."""

    revision: int


class BareAgent:
    """One stream, each message acknowledged; the values of its flags kept."""

    def __init__(
        self,
        service: str,
        servers: list[str],
        *,
        instance_id: str,
        on_change: Callable[[BareChange], None],
        **_: Any,
    ) -> None:
        self.service = service
        self.server = servers[0]
        self.instance_id = instance_id
        self._on_change = on_change
        self._values: dict[str, Any] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.revision = 0

    @property
    def state(self) -> str:
        return "READY" if self._ready.is_set() else "CONNECTING"

    def value(self, name: str, default: object = None) -> object:
        return self._values.get(name, default)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        return self._ready.is_set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.server, options=CHANNEL_OPTIONS) as channel:
            call: Any = agent_pb2_grpc.AgentServiceStub(channel).Sync()
            hello = agent_pb2.Hello(
                service=self.service, instance_id=self.instance_id, running_version="bare"
            )
            await call.write(agent_pb2.SyncRequest(hello=hello))
            while True:
                response = await call.read()
                if response is _EOF:
                    return
                kind = response.WhichOneof("message")
                if kind == "snapshot":
                    self._values = {f.name: _value(f) for f in response.snapshot.flags}
                    revision = response.snapshot.revision
                elif kind == "change":
                    for flag in response.change.flags_set:
                        self._values[flag.name] = _value(flag)
                    revision = response.change.revision
                else:
                    continue
                self.revision = revision
                await call.write(agent_pb2.SyncRequest(ack=agent_pb2.Ack(revision=revision)))
                self._ready.set()
                self._on_change(BareChange(revision))


def _value(flag: t.Flag) -> object:
    kind = flag.value.WhichOneof("kind")
    return getattr(flag.value, kind) if kind else None
