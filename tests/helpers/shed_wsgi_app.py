"""A WSGI app behind :class:`agents.shedding.WSGIShedder`, with a real agent per worker.

Served by ``gunicorn tests.helpers.shed_wsgi_app:app``: each worker imports it and
gets an :class:`agents.Agent` configured by the agent's own environment variables
(``CONTROLPLANE_SERVICE``, ``CONTROLPLANE_SERVERS``, ...). Every response, shed or
not, carries the answering worker's pid in ``X-Worker-Pid``::

    GET /agent   {"pid": 123, "state": "READY", "revision": 7}  (CRITICAL: never shed
                                                                  by the tests' levels)
    GET /...     200 ok, or 503 from the shedder
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from agents import Agent
from agents.shedding import WSGIShedder

agent = Agent()
agent.start()


def _inner(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/agent":
        body = json.dumps(
            {"pid": os.getpid(), "state": agent.state.value, "revision": agent.revision}
        ).encode()
        content_type = "application/json"
    else:
        body, content_type = b"ok", "text/plain"
    start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


_shedder = WSGIShedder(_inner, agent)


def app(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    def with_pid(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        return start_response(status, [*headers, ("X-Worker-Pid", str(os.getpid()))], *exc_info)

    return _shedder(environ, with_pid)
