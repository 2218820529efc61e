"""A tiny WSGI app whose module-level Agent is created and started before the fork.

Served by ``gunicorn --preload tests.helpers.agent_wsgi_app:app`` (the master
imports it, starting the agent, then forks its workers). Configured through the
agent's own environment variables (``CONTROLPLANE_SERVICE``,
``CONTROLPLANE_SERVERS``, ...). Each response is the answering worker's view::

    {"pid": 123, "state": "READY", "revision": 7, "mode": "full", "instance_id": "..."}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from agents import Agent

agent = Agent()
agent.start()


def app(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    body = json.dumps(
        {
            "pid": os.getpid(),
            "state": agent.state.value,
            "revision": agent.revision,
            "mode": agent.value("mode", "full"),
            "instance_id": agent.instance_id,
        }
    ).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    return [body]
