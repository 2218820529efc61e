"""Services that tell which criticality they handle a call under, or which one it brought.

- ``Seen``: gRPC handlers answering with the name of :func:`agents.criticality.current`
  at each step (``-`` for none): at the call, at each request read, before each
  response streamed. One method per kind and per way of writing a handler: for
  ``grpc.server`` plain functions and generators; for ``grpc.aio.server`` coroutines,
  async generators, a coroutine writing with ``context.write``, and plain functions
  and generators (which grpc.aio runs in its thread pool).
- ``Echo``: gRPC handlers answering with the ``x-criticality`` values a call
  brought, as JSON; :func:`echo_asgi` the same for the ``X-Criticality`` header of
  an HTTP request, with a redirect to it.
- :func:`seen_asgi` and :func:`seen_wsgi`: ``Seen`` over HTTP, one line per step,
  from an async and a sync endpoint and from streamed bodies.
- :class:`WSGIThread`: a WSGI app under the standard library's server, in a thread.

Every gRPC service uses bytes as they are (no serializers).
"""

from __future__ import annotations

import asyncio
import json
import threading
import wsgiref.simple_server
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from agents.criticality import current
from agents.shedding import ASGIReceive, ASGIScope, ASGISend

SEEN_SERVICE = "crittest.Seen"
ECHO_SERVICE = "crittest.Echo"

SYNC_SEEN_METHODS = {
    "UnaryUnary": "unary_unary",
    "UnaryStream": "unary_stream",
    "StreamUnary": "stream_unary",
    "StreamStream": "stream_stream",
}
"""The ``Seen`` methods of the sync server, and the kind of each."""
AIO_SEEN_METHODS = {
    **SYNC_SEEN_METHODS,
    "WriteStream": "unary_stream",
    "SyncUnaryUnary": "unary_unary",
    "SyncUnaryStream": "unary_stream",
    "SyncStreamUnary": "stream_unary",
    "SyncStreamStream": "stream_stream",
}
"""The ``Seen`` methods of the asyncio server, and the kind of each."""

_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def seen() -> bytes:
    """The current criticality's name, as a response."""
    criticality = current()
    return b"-" if criticality is None else criticality.name.encode()


def _sync_seen() -> dict[str, Any]:
    def unary_unary(request: bytes, context: Any) -> bytes:
        return seen()

    def unary_stream(request: bytes, context: Any) -> Iterator[bytes]:
        yield seen()
        yield seen()

    def stream_unary(requests: Iterator[bytes], context: Any) -> bytes:
        names = [seen()]
        for _ in requests:
            names.append(seen())
        names.append(seen())
        return b",".join(names)

    def stream_stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield seen()
        for _ in requests:
            yield seen()

    return {
        "UnaryUnary": unary_unary,
        "UnaryStream": unary_stream,
        "StreamUnary": stream_unary,
        "StreamStream": stream_stream,
    }


def sync_seen_handler() -> grpc.GenericRpcHandler[bytes, bytes]:
    """``Seen`` for ``grpc.server``."""
    behaviours = _sync_seen()
    return grpc.method_handlers_generic_handler(
        SEEN_SERVICE,
        {name: _FACTORIES[kind](behaviours[name]) for name, kind in SYNC_SEEN_METHODS.items()},
    )


def aio_seen_handler() -> grpc.GenericRpcHandler[bytes, bytes]:
    """``Seen`` for ``grpc.aio.server``."""

    async def unary_unary(request: bytes, context: Any) -> bytes:
        # asyncio.to_thread carries the context into its thread.
        return await asyncio.to_thread(seen)

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield seen()
        yield await asyncio.to_thread(seen)

    async def write_stream(request: bytes, context: Any) -> None:
        await context.write(seen())
        await context.write(seen())

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        names = [seen()]
        async for _ in requests:
            names.append(seen())
        names.append(seen())
        return b",".join(names)

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        yield seen()
        async for _ in requests:
            yield seen()

    behaviours: dict[str, Any] = {
        "UnaryUnary": unary_unary,
        "UnaryStream": unary_stream,
        "WriteStream": write_stream,
        "StreamUnary": stream_unary,
        "StreamStream": stream_stream,
    }
    for name, behaviour in _sync_seen().items():
        behaviours["Sync" + name] = behaviour
    return grpc.method_handlers_generic_handler(
        SEEN_SERVICE,
        {name: _FACTORIES[kind](behaviours[name]) for name, kind in AIO_SEEN_METHODS.items()},
    )


def _brought(context: Any) -> bytes:
    values = [value for key, value in context.invocation_metadata() if key == "x-criticality"]
    return json.dumps(values).encode()


def echo_handler() -> grpc.GenericRpcHandler[bytes, bytes]:
    """``Echo`` for ``grpc.server``: every kind answers the ``x-criticality`` values
    the call brought, as a JSON list (streams: once, after the requests)."""

    def unary(request: bytes, context: Any) -> bytes:
        return _brought(context)

    def unary_stream(request: bytes, context: Any) -> Iterator[bytes]:
        yield _brought(context)

    def stream_unary(requests: Iterator[bytes], context: Any) -> bytes:
        for _ in requests:
            pass
        return _brought(context)

    def stream_stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            pass
        yield _brought(context)

    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
            "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )


async def echo_asgi(scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
    """``GET /echo``: the request's ``X-Criticality`` values as a JSON list;
    ``GET /redirect``: a 307 to ``/echo``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/redirect":
        status, headers, body = 307, [(b"location", b"/echo")], b""
    else:
        values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-criticality"]
        body = json.dumps(values).encode()
        status, headers = 200, [(b"content-type", b"application/json")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def seen_asgi() -> Starlette:
    """``Seen`` over HTTP: ``/`` (async), ``/thread`` (a sync endpoint, run in a
    thread), ``/stream`` and ``/sync-stream`` (a streamed body from an async and a
    sync generator); one name per line."""

    async def plain(request: Request) -> Response:
        return PlainTextResponse(seen() + b"\n")

    def threaded(request: Request) -> Response:
        return PlainTextResponse(seen() + b"\n")

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield seen() + b"\n"
            yield await asyncio.to_thread(seen) + b"\n"

        return StreamingResponse(body())

    async def sync_stream(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            yield seen() + b"\n"
            yield seen() + b"\n"

        return StreamingResponse(body())

    return Starlette(
        routes=[
            Route("/", plain),
            Route("/thread", threaded),
            Route("/stream", stream),
            Route("/sync-stream", sync_stream),
        ]
    )


class _Body:
    """A WSGI body that names the criticality at each step and at its close."""

    def __init__(self, closed: list[bytes]) -> None:
        self._closed = closed

    def __iter__(self) -> Iterator[bytes]:
        yield seen() + b"\n"
        yield seen() + b"\n"

    def close(self) -> None:
        self._closed.append(seen())


def seen_wsgi(closed: list[bytes]) -> Any:
    """``Seen`` over WSGI: ``/`` a list body; ``/stream`` a body iterated while it
    is sent, whose ``close()`` appends the criticality it ran under to ``closed``."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [("Content-Type", "text/plain")])
        if environ.get("PATH_INFO") == "/stream":
            return _Body(closed)
        return [seen() + b"\n"]

    return app


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class WSGIThread:
    """``app`` under ``wsgiref``'s server on 127.0.0.1 (a port of the kernel's
    choice, bound before the thread starts), served from a thread of its own."""

    def __init__(self, app: Any) -> None:
        self._server = wsgiref.simple_server.make_server(
            "127.0.0.1", 0, app, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WSGIThread:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._thread.join(30)
        self._server.server_close()
        assert not self._thread.is_alive(), "the WSGI server did not stop"
