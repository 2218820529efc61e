"""The pieces of an HTTP request to the mirror that are not the listener's: the gRPC
context the servicers are called with (:class:`HttpContext`), the JSON error answers, the
request's deadline and body, and the client certificate's subject as gRPC words it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from controlplane.server._routes import HTTP_STATUS, BadRequest
from controlplane.server.auth import (
    AuthError,
    AuthInterceptor,
    Credential,
    Identity,
    authenticate,
    authorize,
)

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")


class HttpAbort(Exception):
    """``context.abort`` in a servicer called over HTTP: the call ends with this status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing = dict(trailing)


class HttpContext:
    """What the servicers and the ``rpc`` wrapper use of a gRPC servicer context."""

    def __init__(
        self,
        deadline: float | None,
        metadata: tuple[tuple[str, str], ...],
        peer: str,
        subject: str | None,
    ) -> None:
        self._deadline = deadline
        self._metadata = metadata
        self._peer = peer
        self._subject = subject

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(self._deadline - time.monotonic(), 0.0)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: tuple[tuple[str, str], ...] = (),
    ) -> NoReturn:
        raise HttpAbort(code, details, tuple(trailing_metadata))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_subject": [self._subject.encode()]} if self._subject else {}


def error_body(code: str, message: str, status: int, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, **extra}}


def error_response(
    code: str, message: str, status: int, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(code, message, status, **extra), status, headers=headers)


def abort_response(error: HttpAbort) -> JSONResponse:
    """The answer to an RPC that ended with a gRPC status."""
    status = HTTP_STATUS.get(error.code, 500)
    current = error.trailing.get("current-mod-revision")
    if current is not None:
        return error_response(
            error.code.name,
            error.message,
            status,
            {"X-Current-Mod-Revision": current},
            current_mod_revision=current,
        )
    return error_response(error.code.name, error.message, status)


# -- mutual TLS: the client certificate's subject ---------------------------------------

_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "streetAddress": "STREET",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "userId": "UID",
}


def rfc4514(subject: Any) -> str:
    """A subject as ``ssl`` gives it (RDNs of (name, value) pairs) in RFC 4514, as gRPC
    reports ``x509_subject``: last RDN first, short attribute names."""
    rdns = []
    for rdn in reversed(subject or ()):
        parts = []
        for name, value in rdn:
            text = re.sub(r'([,+"\\<>;=])', r"\\\1", str(value))
            if text.startswith(("#", " ")):
                text = "\\" + text
            if text.endswith(" "):
                text = text[:-1] + "\\ "
            parts.append(f"{_SHORT_NAMES.get(name, name)}={text}")
        rdns.append("+".join(parts))
    return ",".join(rdns)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405 as JSON errors (405 with Allow)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return error_response(
            "METHOD_NOT_ALLOWED",
            f"{request.method} is not allowed on {request.url.path}: use {allow}",
            405,
            {"Allow": allow},
        )
    if exc.status_code == 404:
        return error_response(
            "NOT_FOUND",
            f"no route {request.method} {request.url.path}: the routes are in /openapi.json",
            404,
        )
    return error_response("INVALID_ARGUMENT", str(exc.detail), exc.status_code)


def query_items(request: Request) -> list[tuple[str, str]]:
    return list(request.query_params.multi_items())


def deadline_of(headers: Mapping[str, str]) -> float | None:
    """When the request must be answered by (monotonic), from ``X-Timeout`` (seconds)
    or ``grpc-timeout`` (gRPC's form: ``500m``, ``5S``); None without either."""
    seconds: float | None = None
    given = headers.get("x-timeout")
    if given is not None:
        try:
            seconds = float(given)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 3600:
            raise BadRequest(
                f"X-Timeout {given!r}: give the seconds the request may take (0 < s <= 3600)"
            )
    grpc_timeout = headers.get("grpc-timeout")
    if seconds is None and grpc_timeout is not None:
        match = _GRPC_TIMEOUT.fullmatch(grpc_timeout)
        if match is None:
            raise BadRequest(
                f"grpc-timeout {grpc_timeout!r}: give up to 8 digits and a unit H, M, S, m, "
                "u or n (e.g. 500m)"
            )
        seconds = int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)]
    return None if seconds is None else time.monotonic() + seconds


async def read_json(request: Request, limit: int, *, typed: bool = True) -> Any:
    """The JSON body, None when there is none; at most ``limit`` bytes.

    Raises:
        BadRequest: 413 too large, 415 not JSON by its type (when ``typed``: a route
            that takes a body), 400 not JSON.
    """
    length = request.headers.get("content-length")
    too_large = BadRequest(
        f"the body is larger than {limit} bytes, the server's limit (--max-message-bytes)", 413
    )
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        return None
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if typed and media != "application/json" and not media.endswith("+json"):
        raise BadRequest(
            f"the body is {media}: send JSON with Content-Type: application/json "
            "(curl: -H 'Content-Type: application/json')",
            415,
        )
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not JSON ({exc}): send a JSON object") from None
    except RecursionError:
        raise BadRequest("the body nests too deeply to read: send a flatter JSON object") from None


def body_chunk(data: bytes) -> dict[str, Any]:
    """An ASGI message: part of a streamed body, more to come."""
    return {"type": "http.response.body", "body": data, "more_body": True}


def cancel_on_disconnect(receive: Receive) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """For a streamed answer: watch ``receive`` and, when the client goes away, set the
    event returned and cancel the calling task (cancel the watcher when done)."""
    task = asyncio.current_task()
    assert task is not None
    gone = asyncio.Event()

    async def watch_client() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    return gone, asyncio.create_task(watch_client())


def peer_of(request: Request) -> str:
    """The client as gRPC names a peer (``ipv4:127.0.0.1:50512``), for logs."""
    client = request.client
    if client is None:
        return "unknown"
    if ":" in client.host:
        return f"ipv6:[{client.host}]:{client.port}"
    return f"ipv4:{client.host}:{client.port}"


def authenticate_request(
    auth: AuthInterceptor | None, request: Request, method: str
) -> tuple[Identity | None, Credential | None]:
    """Who sends ``request`` (its bearer token, else its client certificate's subject),
    allowed to call ``method`` as the auth rules name it; (None, None) with
    authentication off. The HTTP routes' one way in, as the gRPC interceptor's.

    Raises:
        AuthError: UNAUTHENTICATED or PERMISSION_DENIED (counted and logged).
    """
    if auth is None:
        return None, None
    subject: str | None = getattr(request.state, "client_subject", None)
    metadata = tuple(("authorization", value) for value in request.headers.getlist("authorization"))
    peer = peer_of(request)
    try:
        presented = HttpContext(None, (), peer, subject).auth_context()
        identity, credential = authenticate(auth.config, metadata, presented)
        authorize(identity, method)
    except AuthError as error:
        auth.refused(method, error, peer, transport="http")
        raise
    return identity, credential
