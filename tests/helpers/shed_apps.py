"""Tiny services behind the shedding middleware, and the clients that count what they see.

- A gRPC echo service with one method of each kind (identity serializers: bytes in,
  bytes out), in a sync and an asyncio flavour, counting the calls its code ran.
- An ASGI and a WSGI app answering ``ok``, counting the requests they saw.
- :class:`UvicornThread`: uvicorn on a socket bound here (port 0) before it starts,
  so that requests queue in the backlog until it serves them: no waiting for it.
- :class:`HttpClient`: one keep-alive connection for thousands of requests.
"""

from __future__ import annotations

import collections
import http.client
import socket
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import uvicorn

from agents.shedding import ASGIReceive, ASGIScope, ASGISend

ECHO_SERVICE = "shedtest.Echo"
KINDS = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")
"""The four RPC kinds, as the echo service's method names."""


class Calls:
    """How many times the service's own code ran, per method or path (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


# ---------------------------------------------------------------- gRPC


def sync_echo_handler(calls: Calls) -> grpc.GenericRpcHandler[bytes, bytes]:
    """The echo service for ``grpc.server``."""

    def unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.add("UnaryUnary")
        return request

    def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.add("UnaryStream")
        yield request
        yield request

    def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        calls.add("StreamUnary")
        return b"".join(requests)

    def stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        calls.add("StreamStream")
        yield from requests

    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


def aio_echo_handler(calls: Calls) -> grpc.GenericRpcHandler[bytes, bytes]:
    """The echo service for ``grpc.aio.server``."""

    async def unary_unary(request: bytes, context: Any) -> bytes:
        calls.add("UnaryUnary")
        return request

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        calls.add("UnaryStream")
        yield request
        yield request

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        calls.add("StreamUnary")
        return b"".join([r async for r in requests])

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        calls.add("StreamStream")
        async for request in requests:
            yield request

    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


@dataclass(frozen=True)
class Outcome:
    """How one call ended, as the client saw it."""

    code: grpc.StatusCode
    details: str
    trailing: dict[str, str | bytes]
    responses: list[bytes]

    @property
    def shed(self) -> bool:
        return self.code is grpc.StatusCode.RESOURCE_EXHAUSTED


class EchoClient:
    """A blocking client of the echo service (works against both servers)."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._calls = {
            kind: getattr(self._channel, _multicallable(kind))(f"/{ECHO_SERVICE}/{kind}")
            for kind in KINDS
        }

    def call(self, kind: str, criticality: str | None = None, payload: bytes = b"hi") -> Outcome:
        """One call of the given kind, with ``x-criticality`` when given."""
        metadata = () if criticality is None else (("x-criticality", criticality),)
        stub = self._calls[kind]
        request: bytes | Iterator[bytes] = (
            payload if kind.startswith("Unary") else iter([payload, payload])
        )
        try:
            if kind.endswith("Unary"):
                response, call = stub.with_call(request, metadata=metadata, timeout=10)
                return Outcome(call.code(), call.details() or "", _trailing(call), [response])
            call = stub(request, metadata=metadata, timeout=10)
            responses = list(call)
            return Outcome(call.code(), call.details() or "", _trailing(call), responses)
        except grpc.RpcError as exc:
            # The error is also the call: code, details, trailing metadata.
            failed: Any = exc
            return Outcome(failed.code(), failed.details() or "", _trailing(failed), [])

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EchoClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _multicallable(kind: str) -> str:
    return {
        "UnaryUnary": "unary_unary",
        "UnaryStream": "unary_stream",
        "StreamUnary": "stream_unary",
        "StreamStream": "stream_stream",
    }[kind]


def _trailing(call: Any) -> dict[str, str | bytes]:
    return {name: value for name, value in call.trailing_metadata() or ()}


# ---------------------------------------------------------------- HTTP apps


class ASGIApp:
    """Answers every HTTP request ``200 ok``; records lifespan events."""

    def __init__(self) -> None:
        self.calls = Calls()
        self.lifespan: list[str] = []

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.lifespan.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.lifespan.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        self.calls.add(scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


def wsgi_ok(calls: Calls) -> Any:
    """A WSGI app answering ``200 ok`` and counting requests by path."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        calls.add(environ.get("PATH_INFO", ""))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return app


def listening_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a port of the kernel's choice, listening."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it a response written in two parts waits 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class UvicornThread:
    """uvicorn serving ``app`` in a thread of its own, on a socket already listening.

    ``port`` is known and connectable before uvicorn runs: connections wait in the
    backlog until it serves them (after the app's lifespan startup).
    """

    def __init__(self, app: Any) -> None:
        self._sock = listening_socket()
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> UvicornThread:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        assert not self._thread.is_alive(), "uvicorn did not stop"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpClient:
    """HTTP/1.1 requests to 127.0.0.1:``port`` over one connection, reopened when
    the server closes it."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self._port = port
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str = "/", criticality: str | None = None, **headers: str) -> Reply:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if criticality is not None:
            sent["X-Criticality"] = criticality
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
        try:
            self._conn.request("GET", path, headers=sent)
            response = self._conn.getresponse()
            body = response.read()
        except (ConnectionError, http.client.HTTPException):
            # A keep-alive connection the server closed between requests: once more.
            self.close()
            self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
            self._conn.request("GET", path, headers=sent)
            response = self._conn.getresponse()
            body = response.read()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
        if response.will_close:
            self.close()
        return reply

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
