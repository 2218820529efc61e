"""OFREP, OpenFeature's Remote Evaluation Protocol, on the HTTP listener.

Any OpenFeature SDK (server, web, mobile) with its stock OFREP provider evaluates our
mitigations with no code of ours:

- ``POST /ofrep/v1/evaluate/flags/{key}``: one flag, for server-side providers.
- ``POST /ofrep/v1/evaluate/flags``: every flag in effect (bulk), for static-context
  providers, with an ``ETag`` (``304 Not Modified`` for a matching ``If-None-Match``)
  and ``eventStreams``: one server-sent-event stream that says ``refetchEvaluation``
  when what the service sees changes, so clients refetch instead of polling.
- ``GET /ofrep/v1/events?service=S``: that stream (``text/event-stream``).

The service comes from the evaluation context's attribute ``service``, else from the
caller's agent identity when it names exactly one service. What is evaluated is the
service's view (:mod:`._effective`, the same the flagd sync stream carries): reason
``STATIC``, the value ``Agent.value()`` gives, ``404 FLAG_NOT_FOUND`` for a flag that
is not set. Answers come from the hub's mirror, so they go on while etcd is down.

With authentication on, an OFREP client is an agent: the same bearer tokens or client
certificates as the gRPC port, and the identity must allow the service it evaluates.
A browser's ``EventSource`` cannot send an ``Authorization`` header, so with
authentication on the event stream serves clients that can (servers, and web
providers given an ``EventSource`` that sends headers); the others keep polling.

ETags are ``"<stamp>-<hash>"``: the stamp is the etcd revision of the last change that
concerns the service, so a server process asked with a ``flagConfigEtag`` (an event's
etag, sent by a provider refetching after an event) newer than what its mirror has
seen waits for its mirror (up to :data:`CATCH_UP_SECONDS`) instead of answering stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import structlog
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from controlplane import model
from controlplane.errors import InvalidArgumentError
from controlplane.server._effective import View, Views, etag_stamp, evaluation
from controlplane.server._http_context import (
    authenticate_request,
    body_chunk,
    cancel_on_disconnect,
    read_json,
)
from controlplane.server._presence import Presence
from controlplane.server._routes import BadRequest
from controlplane.server._rpc import OpenStreams
from controlplane.server._services import closest
from controlplane.server.auth import (
    OFREP_BULK,
    OFREP_EVALUATE,
    OFREP_EVENTS,
    AuthError,
    AuthInterceptor,
    Credential,
    Identity,
)
from controlplane.server.hub import Hub

log = structlog.get_logger("controlplane.http")

PREFIX = "/ofrep"
EVALUATE_PATH = "/ofrep/v1/evaluate/flags/{key}"
BULK_PATH = "/ofrep/v1/evaluate/flags"
EVENTS_PATH = "/ofrep/v1/events"

CATCH_UP_SECONDS = 2.0
"""How long a refetch naming a newer etag waits for this process's mirror."""
READY_SECONDS = 5.0
"""How long a request waits for a server that has not read its state yet."""
KEEPALIVE_SECONDS = 25.0
"""A comment line this often on an idle event stream (proxies close silent ones)."""
RETRY_MS = 1000
"""The reconnection delay the event stream suggests to its clients."""
INACTIVITY_SECONDS = 120
"""``inactivityDelaySec``: a hidden browser tab closes its stream after this."""

_CONTEXT_EXAMPLE = '{"context": {"targetingKey": "user-1", "service": "checkout"}}'


class _AnyKey(Convertor[str]):
    """A flag key as sent, whatever it holds (``path`` stops at a newline)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("ofrep_key", _AnyKey())


class OfrepError(Exception):
    """An OFREP error answer: HTTP status, OFREP error code, details."""

    def __init__(self, status: int, code: str, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.code = code
        self.details = details


_AUTH_STATUS = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403}


class Ofrep:
    """The OFREP routes of one HTTP listener."""

    def __init__(
        self,
        hub: Hub,
        views: Views,
        streams: OpenStreams,
        auth: AuthInterceptor | None,
        presence: Presence | None,
        max_body: int,
    ) -> None:
        self.hub = hub
        self.views = views
        self.streams = streams
        self.auth = auth
        self.presence = presence
        self.max_body = max_body

    def routes(self, cors_origins: Sequence[str] = ()) -> list[BaseRoute]:
        """The routes, under ``/ofrep``; with ``cors_origins``, web pages of those origins
        (``*``: any) may call them (CORS: preflight answered, ``ETag`` readable)."""
        middleware = []
        if cors_origins:
            cors = Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "If-None-Match", "Last-Event-ID"],
                expose_headers=["ETag"],
                max_age=600,
            )
            middleware.append(cors)
        routes = [
            # Any key (slashes, newlines) is a flag found or not, in OFREP's words.
            Route("/v1/evaluate/flags/{key:ofrep_key}", self.evaluate_flag, methods=["POST"]),
            Route(BULK_PATH.removeprefix(PREFIX), self.evaluate_flags, methods=["POST"]),
            Route(EVENTS_PATH.removeprefix(PREFIX), self.events, methods=["GET"]),
        ]
        mount = Mount(PREFIX, routes=routes, middleware=middleware)
        # Starlette's {path:path} stops at a newline, and a key sent may hold one.
        mount.path_regex = re.compile(f"^{PREFIX}/(?P<path>[\\s\\S]*)$")
        return [mount]

    # -- the routes --------------------------------------------------------------

    async def evaluate_flag(self, request: Request) -> Response:
        start = time.perf_counter()
        key = request.path_params["key"]
        identity: Identity | None = None
        try:
            identity, _ = self._authenticate(request, OFREP_EVALUATE)
            service = self._service(await self._context(request), identity)
            view = await self._view(service)
            flag = view.flags.get(key)
            if flag is None:
                raise OfrepError(404, "FLAG_NOT_FOUND", _not_found(key, service, view))
            response: Response = JSONResponse(evaluation(key, flag))
        except OfrepError as error:
            body: dict[str, Any] = {"key": key, "errorCode": error.code}
            response = JSONResponse({**body, "errorDetails": error.details}, error.status)
        self._log(request, EVALUATE_PATH, response.status_code, start, identity)
        return response

    async def evaluate_flags(self, request: Request) -> Response:
        start = time.perf_counter()
        identity: Identity | None = None
        try:
            identity, _ = self._authenticate(request, OFREP_BULK)
            service = self._service(await self._context(request), identity)
            await self._catch_up(service, request.query_params.get("flagConfigEtag"))
            view = await self._view(service)
            headers = {"ETag": view.etag, "Cache-Control": "no-cache"}
            if _matches(request.headers.get("if-none-match"), view.etag):
                response: Response = Response(status_code=304, headers=headers)
            else:
                streams = json.dumps(_event_streams(service), separators=(",", ":"))
                body = view.bulk[:-1] + b',"eventStreams":' + streams.encode() + b"}"
                response = Response(body, media_type="application/json", headers=headers)
        except OfrepError as error:
            payload = {"errorCode": error.code, "errorDetails": error.details}
            response = JSONResponse(payload, error.status)
        self._log(request, BULK_PATH, response.status_code, start, identity)
        return response

    async def events(self, request: Request) -> Response:
        start = time.perf_counter()
        identity: Identity | None = None
        try:
            if self.streams.closing:
                raise OfrepError(503, "GENERAL", "the server is stopping: connect again")
            identity, credential = self._authenticate(request, OFREP_EVENTS)
            given = request.query_params.get("service")
            service = self._service({} if given is None else {"service": given}, identity)
            await self._view(service)
        except OfrepError as error:
            payload = {"errorCode": error.code, "errorDetails": error.details}
            response = JSONResponse(payload, error.status)
            self._log(request, EVENTS_PATH, response.status_code, start, identity)
            return response
        return _EventStream(self, service, identity, credential, request, start)

    # -- the parts -----------------------------------------------------------------

    def _authenticate(
        self, request: Request, method: str
    ) -> tuple[Identity | None, Credential | None]:
        try:
            return authenticate_request(self.auth, request, method)
        except AuthError as error:
            raise OfrepError(_AUTH_STATUS.get(error.code, 403), "GENERAL", error.message) from None

    async def _context(self, request: Request) -> dict[str, Any]:
        """The evaluation context of the body (``{}`` when there is none)."""
        try:
            body = await read_json(request, self.max_body, typed=False)
        except BadRequest as error:
            code = "GENERAL" if error.status == 413 else "PARSE_ERROR"
            raise OfrepError(error.status, code, error.message) from None
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise OfrepError(
                400, "PARSE_ERROR", f"the body must be a JSON object such as {_CONTEXT_EXAMPLE}"
            )
        context = body.get("context", {})
        if not isinstance(context, dict):
            raise OfrepError(
                400,
                "INVALID_CONTEXT",
                f"context must be a JSON object of attributes, such as {_CONTEXT_EXAMPLE}",
            )
        key = context.get("targetingKey")
        if key is not None and not isinstance(key, str):
            raise OfrepError(
                400,
                "INVALID_CONTEXT",
                f"targetingKey must be a string (OFREP), not {type(key).__name__}",
            )
        return context

    def _service(self, context: dict[str, Any], identity: Identity | None) -> str:
        """The service evaluated: the context's ``service``, else the identity's one."""
        given = context.get("service")
        if given is None:
            named = sorted(identity.services - {"*"}) if identity is not None else []
            if identity is None or len(named) != 1 or "*" in identity.services:
                raise OfrepError(
                    400,
                    "INVALID_CONTEXT",
                    "name the service whose mitigations to evaluate: the evaluation "
                    f"context attribute 'service', e.g. {_CONTEXT_EXAMPLE}",
                )
            return named[0]
        if not isinstance(given, str):
            raise OfrepError(
                400,
                "INVALID_CONTEXT",
                f"the context attribute 'service' must be a string, not {type(given).__name__}",
            )
        try:
            service = model.validate_service(given, "context attribute 'service'")
        except InvalidArgumentError as error:
            raise OfrepError(400, "INVALID_CONTEXT", str(error)) from None
        if identity is not None and not identity.may_sync(service):
            allowed = ", ".join(sorted(identity.services)) or "no service"
            raise OfrepError(
                403, "GENERAL", f"{identity.name} may evaluate {allowed}, not {service}"
            )
        return service

    async def _view(self, service: str) -> View:
        if not self.hub.ready.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_SECONDS):
                    await self.hub.ready.wait()
        if not self.hub.ready.is_set():
            raise OfrepError(
                503,
                "GENERAL",
                "the server has not read the mitigations from etcd yet: retry in a few seconds",
            )
        return self.views.get(service)

    async def _catch_up(self, service: str, etag: str | None) -> None:
        """A refetch after an event names the event's etag: if this process's mirror is
        behind it (another process sent the event), wait for the mirror, briefly."""
        stamp = etag_stamp(etag) if etag else None
        behind = stamp is not None and self.hub.ready.is_set() and stamp > self.hub.stamp(service)
        if behind and not await self.hub.wait_for_revision(stamp or 0, CATCH_UP_SECONDS):
            # A stale answer now would be kept until the next change: have it asked
            # again (the provider retries, or polls).
            raise OfrepError(
                503,
                "GENERAL",
                f"this server has not seen revision {stamp} yet (etcd is slow or "
                "unreachable from it): retry",
            )

    def _log(
        self, request: Request, route: str, status: int, start: float, identity: Identity | None
    ) -> None:
        log.info(
            "http",
            method=request.method,
            route=route,
            status=status,
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
            actor=identity.name if identity is not None else None,
        )


def _not_found(key: str, service: str, view: View) -> str:
    text = f"flag {key!r} is not set for {service} (nor globally): the caller's default applies"
    near = closest(key, view.flags)
    if near:
        text += "; did you mean " + " or ".join(near) + "?"
    return text


def _matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` against our ETag (weak comparison, as RFC 9110 says for it)."""
    if if_none_match is None:
        return False
    ours = etag.removeprefix("W/")
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == ours:
            return True
    return False


def _event_streams(service: str) -> list[dict[str, Any]]:
    # A relative endpoint: the provider connects to the origin it was configured with,
    # which stays right behind proxies and port mappings.
    return [
        {
            "type": "sse",
            "endpoint": {"requestUri": f"{EVENTS_PATH}?service={service}"},
            "inactivityDelaySec": INACTIVITY_SECONDS,
        }
    ]


def _event(view: View) -> bytes:
    data = json.dumps({"type": "refetchEvaluation", "etag": view.etag}, separators=(",", ":"))
    return f"id: {view.etag.strip(chr(34))}\nevent: message\ndata: {data}\n\n".encode()


class _EventStream(Response):
    """The event stream of one service: ``refetchEvaluation`` with the new etag whenever
    the service's view changes. The first event comes at once (with the current etag:
    a client that fetched just before gets a 304), so nothing changed between a bulk
    answer and the connection is missed. Held in the server's open streams (a stop
    ends it) and, with authentication, in the identity's stream places (a revoked
    token ends it); counted as the service's OpenFeature sync clients."""

    def __init__(
        self,
        ofrep: Ofrep,
        service: str,
        identity: Identity | None,
        credential: Credential | None,
        request: Request,
        start: float,
    ) -> None:
        super().__init__(
            status_code=200,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.ofrep = ofrep
        self.service = service
        self.identity = identity
        self.credential = credential
        self.request = request
        self.start = start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ofrep = self.ofrep
        if scope["method"] == "HEAD":  # the headers, not an endless body
            await super().__call__(scope, receive, send)
            ofrep._log(self.request, EVENTS_PATH, 200, self.start, self.identity)
            return
        task = asyncio.current_task()
        assert task is not None
        gone, watcher = cancel_on_disconnect(receive)
        status, last = 200, b""
        try:
            with ofrep.streams.held():
                try:
                    async with self._place():
                        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
                        start = {"type": "http.response.start", "status": 200, "headers": headers}
                        await send(start)
                        await send(body_chunk(f"retry: {RETRY_MS}\n\n".encode()))
                        await self._stream(send)
                except asyncio.CancelledError:
                    # Ended here on purpose (the request's task goes on), or re-raised.
                    if self._revoked and task.uncancel() == 0:
                        status, last = 401, b": ended: the credentials were revoked\n\n"
                    elif ofrep.streams.ended_by_close():
                        status, last = 503, b": ended: the server stops\n\n"
                    elif gone.is_set() and task.uncancel() == 0:
                        status = 499
                    else:
                        raise
        except AuthError as error:  # revoked meanwhile, or over the identity's stream limit
            status = _AUTH_STATUS.get(error.code, 429)
            body = json.dumps({"errorCode": "GENERAL", "errorDetails": error.message})
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body.encode(), "more_body": False})
            return
        finally:
            watcher.cancel()
            ofrep._log(self.request, EVENTS_PATH, status, self.start, self.identity)
        if not gone.is_set():
            await send({"type": "http.response.body", "body": last, "more_body": False})

    _revoked = False

    @contextlib.asynccontextmanager
    async def _place(self) -> AsyncIterator[None]:
        presence = self.ofrep.presence
        if presence is not None:
            presence.sync_connect(self.service)
        try:
            auth = self.ofrep.auth
            if auth is None or self.identity is None or self.credential is None:
                yield
                return
            # The credential may have been revoked while the request waited for the
            # server's state: a stream starts only with what the auth file grants now.
            now = auth.config.resolve(self.credential)
            if now is None or not now.may_sync(self.service):
                raise AuthError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the credentials of {self.identity.name} no longer allow {self.service}",
                )
            with auth.streams.hold(self.identity, self.credential) as place:
                try:
                    yield
                finally:
                    self._revoked = place.revoked is not None
        finally:
            if presence is not None:
                presence.sync_disconnect(self.service)

    async def _stream(self, send: Send) -> None:
        hub, views = self.ofrep.hub, self.ofrep.views
        feed = hub.feed(self.service)
        feed.streams += 1
        try:
            view = views.get(self.service)
            sent = view.etag
            await send(body_chunk(_event(view)))
            while True:
                timeout = KEEPALIVE_SECONDS
                if view.until is not None:
                    left = (view.until - model.utcnow()).total_seconds()
                    timeout = min(timeout, max(left, 0.0) + 0.01)
                try:
                    async with asyncio.timeout(timeout):
                        await feed.wait_past(feed.latest)
                except TimeoutError:
                    pass
                view = views.get(self.service)
                if view.etag != sent:
                    sent = view.etag
                    await send(body_chunk(_event(view)))
                else:
                    await send(body_chunk(b": keepalive\n\n"))
        finally:
            feed.streams -= 1
            hub.release(feed)


# -- the OpenAPI document's part ---------------------------------------------------------


def openapi_part(service_pattern: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """OFREP's paths and schemas for ``/openapi.json``: the specification's, narrowed to
    what this server answers (reason STATIC, the context's ``service``)."""
    ref = "#/components/schemas/"
    context = {
        "type": "object",
        "description": "The evaluation context. 'service' names the service evaluated "
        "(else the caller's agent identity, when it names one service); the other "
        "attributes are accepted and do not change the answer.",
        "properties": {
            "targetingKey": {"type": "string"},
            "service": {"type": "string", "pattern": f"^{service_pattern}$"},
        },
        "additionalProperties": True,
    }
    request = {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"context": {"$ref": ref + "OfrepContext"}},
                }
            }
        },
    }
    value = {
        "oneOf": [
            {"type": "boolean"},
            {"type": "string"},
            {"type": "number"},
            {"type": "object"},
        ]
    }
    metadata = {
        "type": "object",
        "additionalProperties": {"type": ["boolean", "string", "number"]},
    }
    success = {
        "type": "object",
        "required": ["key", "value", "reason", "variant"],
        "properties": {
            "key": {"type": "string"},
            "value": value,
            "reason": {"enum": ["STATIC"]},
            "variant": {"type": "string"},
            "metadata": metadata,
        },
    }
    failure = {
        "type": "object",
        "required": ["errorCode", "errorDetails"],
        "properties": {
            "key": {"type": "string"},
            "errorCode": {"type": "string"},
            "errorDetails": {"type": "string"},
        },
    }
    bulk = {
        "type": "object",
        "required": ["flags"],
        "properties": {
            "flags": {"type": "array", "items": {"$ref": ref + "OfrepEvaluationSuccess"}},
            "metadata": metadata,
            "eventStreams": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "endpoint"],
                    "properties": {
                        "type": {"const": "sse"},
                        "endpoint": {
                            "type": "object",
                            "required": ["requestUri"],
                            "properties": {"requestUri": {"type": "string", "pattern": "^/"}},
                        },
                        "inactivityDelaySec": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
    }

    def error(description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": ref + "OfrepError"}}},
        }

    errors = {
        "400": error("INVALID_CONTEXT (no service, or a bad one) or PARSE_ERROR (the body)"),
        "401": error("No credentials, or unknown ones"),
        "403": error("The identity may not evaluate this service"),
        "413": error("The body is larger than the server's limit"),
        "503": error("The server has not read the mitigations yet"),
    }
    etag = {"ETag": {"schema": {"type": "string"}}}
    paths = {
        EVALUATE_PATH: {
            "post": {
                "operationId": "OfrepEvaluateFlag",
                "tags": ["OFREP"],
                "summary": "Evaluate one flag for a service (OFREP)",
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": request,
                "responses": {
                    "200": {
                        "description": "The flag's value in force, reason STATIC",
                        "content": {
                            "application/json": {"schema": {"$ref": ref + "OfrepEvaluationSuccess"}}
                        },
                    },
                    "404": error("FLAG_NOT_FOUND: the flag is not set (the default applies)"),
                    **errors,
                },
            }
        },
        BULK_PATH: {
            "post": {
                "operationId": "OfrepEvaluateFlags",
                "tags": ["OFREP"],
                "summary": "Evaluate every flag in effect for a service (OFREP bulk)",
                "parameters": [
                    {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    {"name": "flagConfigEtag", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "flagConfigLastModified",
                        "in": "query",
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": request,
                "responses": {
                    "200": {
                        "description": "Every flag in effect, with an ETag",
                        "headers": etag,
                        "content": {"application/json": {"schema": {"$ref": ref + "OfrepBulk"}}},
                    },
                    "304": {"description": "Unchanged since If-None-Match", "headers": etag},
                    **errors,
                },
            }
        },
        EVENTS_PATH: {
            "get": {
                "operationId": "OfrepEventStream",
                "tags": ["OFREP"],
                "summary": "Server-sent events: refetchEvaluation when the service's flags change",
                "parameters": [
                    {
                        "name": "service",
                        "in": "query",
                        "schema": {"type": "string", "pattern": f"^{service_pattern}$"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": 'Events "data: {"type":"refetchEvaluation",'
                        '"etag":...}", the first at once',
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "429": error("The identity's open streams are at its limit"),
                    **errors,
                },
            }
        },
    }
    schemas = {
        "OfrepContext": context,
        "OfrepEvaluationSuccess": success,
        "OfrepError": failure,
        "OfrepBulk": bulk,
    }
    return paths, schemas
