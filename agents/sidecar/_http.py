"""The sidecar's local HTTP endpoint: the server, its threads and the request
handler; the answers themselves come from the sidecar's ``handle``
(:meth:`agents.sidecar.Sidecar.handle`).
"""

from __future__ import annotations

import logging
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from agents.sidecar._documents import Response
from controlplane._serving import WakeableServer

log = logging.getLogger("agents.sidecar")


class _Endpoint(Protocol):
    """What the HTTP server asks of the sidecar: the answer to a request."""

    def handle(self, method: str, target: str) -> Response: ...


class EndpointServer(WakeableServer, ThreadingHTTPServer):
    """The endpoint's listener: each connection on a thread of its own; idle, it
    wakes for nothing, and a stop returns at once (``WakeableServer``)."""

    daemon_threads = True
    sidecar: _Endpoint
    allowed_hosts: frozenset[str] | None = frozenset({"localhost", "127.0.0.1", "::1"})
    """The names a request's ``Host`` may give (with or without the port): loopback's and
    the address the endpoint listens on, so that a web page the host's browser loads
    cannot reach the endpoint through a name of its own (DNS rebinding). None: any (an
    endpoint on a wildcard address answers the network, under every name)."""


class EndpointServer6(EndpointServer):
    address_family = socket.AF_INET6


class EndpointHandler(BaseHTTPRequestHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"
    server_version = "cp-agent"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(self._handle())

    def do_HEAD(self) -> None:
        self._answer(self._handle(), body=False)

    def _refuse(self) -> None:
        # The request body is not read: close the connection after answering.
        self.close_connection = True
        self._answer(self._handle())

    def _handle(self) -> Response:
        host = self.headers.get("Host")
        allowed = self.server.allowed_hosts
        if host is not None and allowed is not None and _host_name(host) not in allowed:
            self.close_connection = True
            return Response(
                HTTPStatus.MISDIRECTED_REQUEST,
                {
                    "error": "misdirected",
                    "message": f"Host {host!r} is not this endpoint's: ask for "
                    + " or ".join(sorted(allowed)),
                },
            )
        try:
            return self.server.sidecar.handle(self.command, self.path)
        except Exception:
            log.exception("http_error method=%s path=%s", self.command, self.path)
            return Response(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": "internal", "message": "the sidecar failed to answer; see its log"},
            )

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _refuse

    def _answer(self, response: Response, *, body: bool = True) -> None:
        data = response.encode()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request client=%s " + format, self.address_string(), *args)


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, without the port and the IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


ENDPOINTS = (
    "/v1/state", "/v1/flags", "/v1/flags/NAME", "/v1/shed", "/v1/pin", "/healthz", "/metrics",
)  # fmt: skip
