"""A request's criticality, in the service that handles it and on the calls it makes.

Server side: real servers behind the shedding middleware (no level in force), whose
handlers answer with the criticality they run under: a ``grpc.server`` (interceptor
and handlers in different threads), a ``grpc.aio.server`` (coroutines, async
generators, ``context.write``, and plain functions in its thread pool), an ASGI app
under uvicorn (async and sync endpoints, streamed bodies) and a WSGI app under the
standard library's server (a body iterated while it is sent, and its close).

Client side: real servers answering with the ``x-criticality`` / ``X-Criticality``
values a call brought, called through a ``grpc`` and a ``grpc.aio`` channel (the
four kinds of call), an ``httpx.Client``, an ``httpx.AsyncClient`` and a
``requests.Session``: the current criticality is sent, a call's own is kept, and
nothing is sent without one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
import requests
from prometheus_client import CollectorRegistry

from agents import criticality
from agents.criticality import CriticalityAdapter, CriticalityInterceptor, aio_interceptors
from agents.shedding import AioShedInterceptor, ASGIShedder, ShedInterceptor, WSGIShedder
from agents.testing import StaticAgent
from tests.helpers.criticality_apps import (
    AIO_SEEN_METHODS,
    ECHO_SERVICE,
    SEEN_SERVICE,
    SYNC_SEEN_METHODS,
    WSGIThread,
    aio_seen_handler,
    echo_asgi,
    echo_handler,
    seen_asgi,
    seen_wsgi,
    sync_seen_handler,
)
from tests.helpers.shed_apps import KINDS, HttpClient, UvicornThread

HEADERS = [
    ("SHEDDABLE", "SHEDDABLE"),
    ("sheddable-plus", "SHEDDABLE_PLUS"),
    ("Critical_Plus", "CRITICAL_PLUS"),
    # Anything else, or nothing, is CRITICAL: never an error.
    ("SHEDDABLE, CRITICAL", "CRITICAL"),
    ("4", "CRITICAL"),
    (None, "CRITICAL"),
]
"""An inbound header or metadata value, and the criticality the handler runs under."""


def middleware_kwargs() -> dict[str, Any]:
    """What every door here is built with: an agent shedding nothing, a registry of
    the test's own."""
    return {"agent": StaticAgent(service="seen"), "registry": CollectorRegistry()}


# ---------------------------------------------------------------- server side: gRPC


@contextlib.asynccontextmanager
async def seen_server(flavour: str, **options: Any) -> AsyncIterator[str]:
    """``Seen`` on 127.0.0.1:0 behind the shed interceptor of ``flavour``."""
    kwargs = middleware_kwargs()
    agent = kwargs.pop("agent")
    if flavour == "sync":
        # Two threads: the interceptor runs in the server's own, handlers in these.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            server = grpc.server(pool, interceptors=[ShedInterceptor(agent, **kwargs, **options)])
            server.add_generic_rpc_handlers((sync_seen_handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            try:
                yield f"127.0.0.1:{port}"
            finally:
                server.stop(None).wait()
    else:
        aio_server = grpc.aio.server(interceptors=[AioShedInterceptor(agent, **kwargs, **options)])
        aio_server.add_generic_rpc_handlers((aio_seen_handler(),))
        port = aio_server.add_insecure_port("127.0.0.1:0")
        await aio_server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await aio_server.stop(None)


async def _requests() -> AsyncIterator[bytes]:
    for request in (b"1", b"2"):
        yield request


async def call_seen(
    channel: grpc.aio.Channel, method: str, kind: str, metadata: tuple[tuple[str, str], ...]
) -> list[str]:
    """Every name a ``Seen`` call answered, over all its responses."""
    stub = getattr(channel, kind)(f"/{SEEN_SERVICE}/{method}")
    request: Any = b"0" if kind.startswith("unary") else _requests()
    if kind.endswith("unary"):
        responses = [await stub(request, metadata=metadata, timeout=10)]
    else:
        responses = [r async for r in stub(request, metadata=metadata, timeout=10)]
    return [name.decode() for response in responses for name in response.split(b",")]


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_grpc_handlers_run_under_the_request_criticality(flavour: str) -> None:
    methods = SYNC_SEEN_METHODS if flavour == "sync" else AIO_SEEN_METHODS
    got: dict[tuple[str, str | None], list[str]] = {}
    async with (
        seen_server(flavour) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        for method, kind in methods.items():
            for header, _ in HEADERS:
                metadata = () if header is None else (("x-criticality", header),)
                got[(method, header)] = await call_seen(channel, method, kind, metadata)
    for method, kind in methods.items():
        # One name at the call, one per request read, one per response streamed.
        steps = {"unary_unary": 1, "unary_stream": 2, "stream_unary": 4, "stream_stream": 3}
        for header, expected in HEADERS:
            assert got[(method, header)] == [expected] * steps[kind], (method, header)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_grpc_handlers_run_under_the_classifier_criticality(flavour: str) -> None:
    def classify(details: grpc.HandlerCallDetails) -> str | None:
        return "sheddable_plus" if details.method.endswith("Stream") else None

    async with (
        seen_server(flavour, classifier=classify) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        metadata = (("x-criticality", "CRITICAL_PLUS"),)
        classified = await call_seen(channel, "UnaryStream", "unary_stream", metadata)
        by_header = await call_seen(channel, "UnaryUnary", "unary_unary", metadata)
    assert classified == ["SHEDDABLE_PLUS", "SHEDDABLE_PLUS"]
    assert by_header == ["CRITICAL_PLUS"]


# ---------------------------------------------------------------- server side: HTTP


def test_asgi_app_runs_under_the_request_criticality() -> None:
    app = ASGIShedder(seen_asgi(), **middleware_kwargs())
    paths = ["/", "/thread", "/stream", "/sync-stream"]
    got: dict[tuple[str, str | None], list[str]] = {}
    with UvicornThread(app) as server, HttpClient(server.port) as client:
        for path in paths:
            for header, _ in HEADERS:
                reply = client.get(path, header)
                assert reply.status == 200, reply
                got[(path, header)] = reply.body.decode().split()
    for path in paths:
        steps = 2 if "stream" in path else 1
        for header, expected in HEADERS:
            assert got[(path, header)] == [expected] * steps, (path, header)


def test_wsgi_app_runs_under_the_request_criticality() -> None:
    closed: list[bytes] = []
    app = WSGIShedder(seen_wsgi(closed), **middleware_kwargs())
    got: dict[tuple[str, str | None], list[str]] = {}
    with WSGIThread(app) as server, HttpClient(server.port) as client:
        for path in ("/", "/stream"):
            for header, _ in HEADERS:
                reply = client.get(path, header)
                assert reply.status == 200, reply
                got[(path, header)] = reply.body.decode().split()
    for header, expected in HEADERS:
        assert got[("/", header)] == [expected], header
        # The body's steps run while the server sends it, after the app returned.
        assert got[("/stream", header)] == [expected, expected], header
    # Each close() ran under its request's criticality (the server reads to the end
    # of a body without a length, so it closed before the reply was complete).
    assert closed == [expected.encode() for _, expected in HEADERS]


# ---------------------------------------------------------------- client side

CASES: list[tuple[str, Any, str | None, list[str]]] = [
    # (case, the criticality in hand, the call's own, what the server got)
    ("none in hand", None, None, []),
    ("in hand", "sheddable-plus", None, ["SHEDDABLE_PLUS"]),
    ("the call's own", "SHEDDABLE", "critical_plus", ["critical_plus"]),
    ("unknown", "not-a-tier", None, ["CRITICAL"]),
    ("cleared", ("SHEDDABLE", None), None, []),
]
"""The criticality in hand is a name for :func:`criticality.use`, None for no
``use`` at all, or a tuple of them, nested."""


@contextlib.contextmanager
def in_hand(given: Any) -> Iterator[None]:
    """``criticality.use`` for each name of ``given``, nested; nothing for None."""
    names = () if given is None else given if isinstance(given, tuple) else (given,)
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(criticality.use(name))
        yield


@pytest.fixture(scope="module")
def echo_address() -> Iterator[str]:
    """``Echo`` on a ``grpc.server`` of its own threads: sync and asyncio tests call it."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        server = grpc.server(pool)
        server.add_generic_rpc_handlers((echo_handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop(None).wait()


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    """:func:`echo_asgi` under uvicorn, in a thread."""
    with UvicornThread(echo_asgi) as server:
        yield f"http://127.0.0.1:{server.port}"


def metadata_of(own: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-other", "kept"),) if own is None else (("x-criticality", own),)


_ATTRIBUTES = {
    "UnaryUnary": "unary_unary",
    "UnaryStream": "unary_stream",
    "StreamUnary": "stream_unary",
    "StreamStream": "stream_stream",
}


def call_echo(channel: grpc.Channel, kind: str, metadata: tuple[tuple[str, str], ...]) -> bytes:
    """One ``Echo`` call of ``kind`` through a ``grpc`` channel; its one response."""
    stub: Any = getattr(channel, _ATTRIBUTES[kind])(f"/{ECHO_SERVICE}/{kind}")
    request: Any = b"0" if kind.startswith("Unary") else iter([b"1", b"2"])
    if kind.endswith("Unary"):
        answer: bytes = stub(request, metadata=metadata, timeout=10)
        return answer
    (answer,) = stub(request, metadata=metadata, timeout=10)
    return answer


async def call_echo_aio(
    channel: grpc.aio.Channel, kind: str, metadata: tuple[tuple[str, str], ...]
) -> bytes:
    """One ``Echo`` call of ``kind`` through a ``grpc.aio`` channel; its one response."""
    stub: Any = getattr(channel, _ATTRIBUTES[kind])(f"/{ECHO_SERVICE}/{kind}")
    request: Any = b"0" if kind.startswith("Unary") else _requests()
    if kind.endswith("Unary"):
        answer: bytes = await stub(request, metadata=metadata, timeout=10)
        return answer
    (answer,) = [response async for response in stub(request, metadata=metadata, timeout=10)]
    return answer


def test_grpc_channel_sends_the_current_criticality(echo_address: str) -> None:
    got: dict[tuple[str, str], list[str]] = {}
    with grpc.insecure_channel(echo_address) as plain:
        channel = grpc.intercept_channel(plain, CriticalityInterceptor())
        for kind in KINDS:
            for case, given, own, _ in CASES:
                with in_hand(given):
                    got[(kind, case)] = json.loads(call_echo(channel, kind, metadata_of(own)))
    for kind in KINDS:
        for case, _, _, expected in CASES:
            assert got[(kind, case)] == expected, (kind, case)


async def test_grpc_aio_channel_sends_the_current_criticality(echo_address: str) -> None:
    got: dict[tuple[str, str], list[str]] = {}
    async with grpc.aio.insecure_channel(echo_address, interceptors=aio_interceptors()) as channel:
        for kind in KINDS:
            for case, given, own, _ in CASES:
                with in_hand(given):
                    answer = await call_echo_aio(channel, kind, metadata_of(own))
                got[(kind, case)] = json.loads(answer)
    for kind in KINDS:
        for case, _, _, expected in CASES:
            assert got[(kind, case)] == expected, (kind, case)


def headers_of(own: str | None) -> dict[str, str]:
    return {} if own is None else {"X-Criticality": own}


@pytest.mark.parametrize("path", ["/echo", "/redirect"])
def test_httpx_client_sends_the_current_criticality(echo_url: str, path: str) -> None:
    got: dict[str, Any] = {}
    with httpx.Client(
        base_url=echo_url, event_hooks={"request": [criticality.httpx_hook]}, follow_redirects=True
    ) as client:
        for case, given, own, _ in CASES:
            with in_hand(given):
                reply = client.get(path, headers=headers_of(own), timeout=10)
            got[case] = (reply.status_code, reply.url.path, reply.json())
    for case, _, _, expected in CASES:
        assert got[case] == (200, "/echo", expected), case


@pytest.mark.parametrize("path", ["/echo", "/redirect"])
async def test_httpx_async_client_sends_the_current_criticality(echo_url: str, path: str) -> None:
    got: dict[str, Any] = {}
    async with httpx.AsyncClient(
        base_url=echo_url,
        event_hooks={"request": [criticality.httpx_async_hook]},
        follow_redirects=True,
    ) as client:
        for case, given, own, _ in CASES:
            with in_hand(given):
                reply = await client.get(path, headers=headers_of(own), timeout=10)
            got[case] = (reply.status_code, reply.url.path, reply.json())
    for case, _, _, expected in CASES:
        assert got[case] == (200, "/echo", expected), case


@pytest.mark.parametrize("path", ["/echo", "/redirect"])
def test_requests_session_sends_the_current_criticality(echo_url: str, path: str) -> None:
    got: dict[str, Any] = {}
    with requests.Session() as session:
        session.mount("http://", CriticalityAdapter(max_retries=0))
        for case, given, own, _ in CASES:
            with in_hand(given):
                reply = session.get(echo_url + path, headers=headers_of(own), timeout=10)
            got[case] = (reply.status_code, reply.url.rsplit("/", 1)[-1], reply.json())
    for case, _, _, expected in CASES:
        assert got[case] == (200, "echo", expected), case


def test_a_session_without_the_adapter_sends_nothing(echo_url: str) -> None:
    # What the adapter is for: requests does not send it by itself.
    with requests.Session() as session, criticality.use("SHEDDABLE"):
        assert session.get(echo_url + "/echo", timeout=10).json() == []
