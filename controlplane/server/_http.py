"""The HTTP listener (``--http``): MitigationService as JSON, on the server's own loop.

HTTP/1.1 by uvicorn on a socket bound here (so port 0 works and a port in use is said
as for the other ports), a Starlette app whose routes come from the one table in
``_routes``: each request becomes the RPC's request message, the servicer the gRPC
server uses is called in-process through :class:`HttpContext` (what the servicers and
``_rpc.rpc`` use of a gRPC context), and the answer or the error goes back as JSON.
The same TLS (mutual TLS: the client certificate's subject is an identity), bearer
tokens and roles as the gRPC port; one ``http`` log line per request. ``WatchChanges``
is a stream of JSON lines (``application/x-ndjson``) held in the server's
:class:`~controlplane.server._rpc.OpenStreams`, so that a stop ends it at once with an
UNAVAILABLE line; other requests in flight get the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import grpc
import structlog
import uvicorn
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.routing import Route as StarletteRoute
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from controlplane.server._alertmanager import AlertReceiver
from controlplane.server._config import ServerConfig
from controlplane.server._http_context import (
    HttpAbort,
    HttpContext,
    abort_response,
    authenticate_request,
    body_chunk,
    cancel_on_disconnect,
    deadline_of,
    error_body,
    error_response,
    http_exception,
    peer_of,
    query_items,
    read_json,
    rfc4514,
)
from controlplane.server._ofrep import Ofrep
from controlplane.server._openapi import openapi_document
from controlplane.server._ports import PortError, bind_listener, http_port
from controlplane.server._routes import (
    HTTP_STATUS,
    NDJSON,
    ROUTES,
    BadRequest,
    Route,
    build_request,
    render,
)
from controlplane.server._rpc import SHUTTING_DOWN, actor_of
from controlplane.server.auth import (
    AuthError,
    AuthInterceptor,
    Credential,
    Identity,
    current_identity,
)

log = structlog.get_logger("controlplane.http")

INTERNAL_ERROR = "internal error (logged on the server)"
"""What an answer says of a failure of the server's own, as the gRPC port does."""


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 on httptools (llhttp's parser, in C: on h11, in Python, an
    OFREP bulk evaluation cost the server 600 µs of CPU instead of 400) with the
    verified client certificate's subject in each request's ``state``
    (``client_subject``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        if cert:
            self.app_state = {**self.app_state, "client_subject": rfc4514(cert.get("subject"))}


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the control server has its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# -- the listener --------------------------------------------------------------------------


class HttpListener:
    """The HTTP listener of one server process."""

    def __init__(
        self,
        config: ServerConfig,
        servicer: Any,
        streams: Any,
        auth: AuthInterceptor | None,
        ssl_context: ssl.SSLContext | None,
        ofrep: Ofrep | None = None,
    ) -> None:
        self.config = config
        self.ofrep = ofrep
        self.servicer = servicer
        self.streams = streams
        self.auth = auth
        self.ssl_context = ssl_context
        self.host = ""
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._openapi: bytes | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind ``--http`` and serve.

        Raises:
            PortError: The address cannot be bound.
        """
        port = http_port(self.config)
        assert port is not None
        sock = bind_listener(port, shared=self.config.worker is not None)
        try:
            # Listening now: connections wait in the backlog until uvicorn accepts them.
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise PortError([f"cannot listen on {port.address} (HTTP): {exc}"], [port]) from None
        self.host, self.port = sock.getsockname()[:2]
        uv_config = uvicorn.Config(
            self.app(),
            http=_Protocol,
            ws="none",
            lifespan="off",
            access_log=False,
            log_config=None,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        uv_config.load()
        uv_config.ssl = self.ssl_context
        # uvicorn's own lines (start-up, a malformed request) are not ours: the log has
        # one `http` line per request instead.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._server = _Server(uv_config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        self._sock = sock

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for ``grace`` s (streams are
        ended by the server's OpenStreams meanwhile)."""
        if self._server is None or self._task is None:
            return
        # uvicorn declares it int; asyncio.timeout, which reads it, takes seconds as float.
        self._server.config.timeout_graceful_shutdown = max(grace, 0.001)  # type: ignore[assignment]
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        # What uvicorn cancelled past the grace period and has not finished yet.
        tasks = set(self._server.server_state.tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._sock.close()

    # -- the app ---------------------------------------------------------------

    def app(self) -> Starlette:
        by_path: dict[str, dict[str, Route]] = {}
        for route in ROUTES:
            by_path.setdefault(route.path, {})[route.verb] = route
        routes: list[BaseRoute] = [
            StarletteRoute(path, self._endpoint(verbs), methods=list(verbs))
            for path, verbs in by_path.items()
        ]
        routes.append(StarletteRoute("/openapi.json", self._openapi_json, methods=["GET"]))
        if self.ofrep is not None:
            routes += self.ofrep.routes(self.config.http_cors_origins)
        receiver = AlertReceiver(self.servicer, self.auth, self.config.max_message_bytes)
        routes += receiver.routes()
        return Starlette(routes=routes, exception_handlers={HTTPException: http_exception})

    async def _openapi_json(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = json.dumps(openapi_document(), indent=1).encode()
        return Response(self._openapi, media_type="application/json")

    def _endpoint(self, verbs: Mapping[str, Route]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            verb = "GET" if request.method == "HEAD" else request.method
            return await self._handle(verbs[verb], request)

        return endpoint

    async def _handle(self, route: Route, request: Request) -> Response:
        start = time.perf_counter()
        identity: Identity | None = None
        credential: Credential | None = None
        rpc_request: Message | None = None
        response: Response
        try:
            deadline = deadline_of(request.headers)
            try:
                identity, credential = authenticate_request(self.auth, request, route.full_method)
            except AuthError as error:
                raise HttpAbort(error.code, error.message) from None
            metadata = tuple(
                ("authorization", value) for value in request.headers.getlist("authorization")
            )
            body = await read_json(request, self.config.max_message_bytes, typed=route.has_body)
            rpc_request = build_request(route, request.path_params, query_items(request), body)
            subject: str | None = getattr(request.state, "client_subject", None)
            context = HttpContext(deadline, metadata, peer_of(request), subject)
            if route.streaming:
                return _Ndjson(self, route, rpc_request, context, identity, credential, start)
            response = await self._call(route, rpc_request, context, identity)
        except BadRequest as error:
            code = "RESOURCE_EXHAUSTED" if error.status == 413 else "INVALID_ARGUMENT"
            response = error_response(code, error.message, error.status)
        except HttpAbort as error:
            response = abort_response(error)
        except Exception:
            log.exception("http_failed", route=route.path, rpc=route.rpc)
            response = error_response("INTERNAL", INTERNAL_ERROR, 500)
        self.log(route, request.method, response.status_code, start, identity, rpc_request)
        return response

    async def _call(
        self, route: Route, message: Message, context: HttpContext, identity: Identity | None
    ) -> Response:
        token = current_identity.set(identity)
        try:
            with structlog.contextvars.bound_contextvars(transport="http"):
                remaining = context.time_remaining()
                try:
                    async with asyncio.timeout(remaining):
                        answer = await getattr(self.servicer, route.rpc)(message, context)
                except TimeoutError:
                    raise HttpAbort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the request's deadline (X-Timeout or grpc-timeout) ran out",
                    ) from None
        finally:
            current_identity.reset(token)
        return JSONResponse(render(answer))

    def log(
        self,
        route: Route,
        verb: str,
        status: int,
        start: float,
        identity: Identity | None,
        message: Message | None,
    ) -> None:
        token = current_identity.set(identity)
        try:
            actor = identity.name if identity is not None else ""
            if message is not None:
                actor = actor_of(message)
        finally:
            current_identity.reset(token)
        log.info(
            "http",
            method=verb,
            route=route.path,
            rpc=route.rpc,
            status=status,
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
            actor=actor or None,
        )


class _Ndjson(Response):
    """WatchChanges as JSON lines, in the request's own task (held in OpenStreams and,
    with authentication, in the identity's stream places): one line per response, a
    last ``{"error": ...}`` line when the server stops or the credentials are revoked."""

    media_type = NDJSON

    def __init__(
        self,
        listener: HttpListener,
        route: Route,
        message: Message,
        context: HttpContext,
        identity: Identity | None,
        credential: Credential | None,
        start: float,
    ) -> None:
        super().__init__(status_code=200, media_type=NDJSON, headers={"Cache-Control": "no-store"})
        self.listener = listener
        self.route = route
        self.message = message
        self.context = context
        self.identity = identity
        self.credential = credential
        self.start = start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = self.listener
        if scope["method"] == "HEAD":
            await super().__call__(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        gone, watcher = cancel_on_disconnect(receive)
        token = current_identity.set(self.identity)
        status, started, last = 200, False, None
        try:
            async with self._stream_place() as place:
                try:
                    responses = listener.servicer.WatchChanges(self.message, self.context)
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            if not started:
                                start = {"type": "http.response.start", "status": 200}
                                headers = [
                                    (k, v) for k, v in self.raw_headers if k != b"content-length"
                                ]
                                await send({**start, "headers": headers})
                                started = True
                            line = json.dumps(render(response), separators=(",", ":"))
                            await send(body_chunk(line.encode() + b"\n"))
                except HttpAbort as error:
                    status = HTTP_STATUS.get(error.code, 500)
                    last = error_body(error.code.name, error.message, status)
                except asyncio.CancelledError:
                    if place is not None and place.revoked is not None and task.uncancel() == 0:
                        status = 401
                        last = error_body("UNAUTHENTICATED", place.revoked, status)
                    elif listener.streams.ended_by_close():
                        status = 503
                        last = error_body("UNAVAILABLE", SHUTTING_DOWN, status)
                    elif gone.is_set() and task.uncancel() == 0:
                        status = 499
                    else:
                        raise
        except AuthError as error:  # over the identity's stream limit
            status = HTTP_STATUS.get(error.code, 500)
            last = error_body(error.code.name, error.message, status)
        except Exception:
            log.exception("http_failed", route=self.route.path, rpc=self.route.rpc)
            status = 500
            last = error_body("INTERNAL", INTERNAL_ERROR, status)
        finally:
            current_identity.reset(token)
            watcher.cancel()
            listener.log(self.route, "GET", status, self.start, self.identity, self.message)
        if gone.is_set():
            return
        tail = json.dumps(last, separators=(",", ":")).encode() + b"\n" if last else b""
        if not started:  # refused before the first line: an error answer of its own
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    @contextlib.asynccontextmanager
    async def _stream_place(self) -> AsyncIterator[Any]:
        auth = self.listener.auth
        if auth is None or self.identity is None or self.credential is None:
            yield None
            return
        with auth.streams.hold(self.identity, self.credential) as place:
            yield place
