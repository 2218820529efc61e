"""The OpenFeature provider over a real Agent against a real control server, used as a
service on OpenFeature uses it: ``api.set_provider`` and the client API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from openfeature import api
from openfeature.event import EventDetails, ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus

from agents import Agent
from agents.openfeature import ControlPlaneProvider
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.server import ControlServer

Stub = mitigation_pb2_grpc.MitigationServiceStub
Event = tuple[ProviderEvent, EventDetails, float]


@pytest.fixture
async def agent(server: ControlServer) -> AsyncIterator[Agent]:
    started = Agent("checkout", [server.address], version="v1.5.0")
    started.start()
    yield started
    await asyncio.to_thread(api.shutdown)
    await asyncio.to_thread(started.close)


async def next_event(events: asyncio.Queue[Event], within: float = 15.0) -> Event:
    try:
        return await asyncio.wait_for(events.get(), within)
    except TimeoutError:
        raise AssertionError(f"no OpenFeature event within {within}s") from None


async def test_a_flip_reaches_the_client_with_a_configuration_changed_event(
    server: ControlServer, stub: Stub, agent: Agent
) -> None:
    await asyncio.to_thread(api.set_provider_and_wait, ControlPlaneProvider(agent))
    client = api.get_client()
    assert client.get_provider_status() is ProviderStatus.READY
    missing = client.get_boolean_details("new-ui", True)
    assert (missing.value, missing.reason, missing.error_code) == (
        True,
        Reason.DEFAULT,
        ErrorCode.FLAG_NOT_FOUND,
    )

    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def handler(kind: ProviderEvent) -> Callable[[EventDetails], None]:
        def put(details: EventDetails) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, details, time.monotonic()))

        return put

    for kind in (ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, ProviderEvent.PROVIDER_STALE):
        client.add_handler(kind, handler(kind))

    started = time.monotonic()
    response = await stub.SetFlag(
        m.SetFlagRequest(
            scope="checkout",
            name="new-ui",
            value=t.FlagValue(bool_value=False),
            options=t.WriteOptions(reason="openfeature test", actor="oncall"),
        )
    )
    revision = response.result.revision
    kind, details, arrived = await next_event(events)
    assert kind is ProviderEvent.PROVIDER_CONFIGURATION_CHANGED
    assert details.flags_changed == ["new-ui"]
    assert details.metadata == {"revision": revision}
    assert arrived - started < 1.0
    flipped = client.get_boolean_details("new-ui", True)
    assert (flipped.value, flipped.reason, flipped.error_code) == (False, Reason.STATIC, None)
    assert flipped.flag_metadata["revision"] == revision
    assert flipped.flag_metadata["scope"] == "checkout"
    assert client.get_string_details("new-ui", "x").error_code == ErrorCode.TYPE_MISMATCH

    # The server gone: PROVIDER_STALE, and the last value is still served.
    await server.stop(grace=0)
    kind, details, _ = await next_event(events)
    assert kind is ProviderEvent.PROVIDER_STALE
    assert client.get_provider_status() is ProviderStatus.STALE
    cached = client.get_boolean_details("new-ui", True)
    assert (cached.value, cached.reason) == (False, Reason.CACHED)
