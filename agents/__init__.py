"""The agent SDK: a service's view of the control plane's mitigations.

    from agents import Agent
    agent = Agent(service="checkout", servers=["10.0.0.5:50051", "10.0.0.6:50051"],
                  version="v1.5.0", cache_path="/var/cache/checkout/controlplane.json",
                  tls_ca="/etc/controlplane/ca.pem", token_file="/run/secrets/cp-token")
    agent.start(); agent.wait_ready(timeout=5)
    if agent.enabled("new-ui", default=True): ...

:class:`Agent` keeps the state current from a background thread (and survives
``fork()``); :class:`AsyncAgent` does the same as a task in the caller's asyncio
loop. Reads (``enabled``, ``value``, ``should_shed``, ``pinned_version``) are
lookups in an immutable snapshot, without lock, I/O or clock read; see
``agents._state``. For tests, ``agents.testing.StaticAgent`` has the same read
API in memory. ``agents.shedding`` sheds at the door; ``agents.criticality`` carries
a request's criticality onto the calls it makes.

Plaintext goes only to servers on loopback: others need TLS (``tls_ca``, or
``tls`` for the system's roots; mutual TLS with ``tls_cert`` and ``tls_key``)
or ``insecure=True``. Every setting also has an environment variable (the
table in ``agents._config``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from agents._config import AgentConfigError
from agents._override import OverrideError
from agents._state import StateChange
from agents._types import Criticality, FlagValue, Override, PinnedVersion, SheddingLevel

if TYPE_CHECKING:
    from agents._agent import Agent, AsyncAgent
    from agents._channels import Backoff
    from agents._client_state import AgentState
    from agents.openfeature import ControlPlaneProvider
    from agents.shedding import AioShedInterceptor, ASGIShedder, ShedInterceptor, WSGIShedder

# Imported on first use, so that ``import agents`` (and ``agents.testing``, in a
# service's unit tests) pulls in no gRPC (nor, for the shedding middleware,
# prometheus_client).
_LAZY = {
    "Agent": "agents._agent",
    "AsyncAgent": "agents._agent",
    "AgentState": "agents._client_state",
    "Backoff": "agents._channels",
    "ShedInterceptor": "agents.shedding",
    "ControlPlaneProvider": "agents.openfeature",
    "AioShedInterceptor": "agents.shedding",
    "ASGIShedder": "agents.shedding",
    "WSGIShedder": "agents.shedding",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ASGIShedder",
    "Agent",
    "AgentConfigError",
    "AgentState",
    "AioShedInterceptor",
    "AsyncAgent",
    "Backoff",
    "ControlPlaneProvider",
    "Criticality",
    "FlagValue",
    "Override",
    "OverrideError",
    "PinnedVersion",
    "ShedInterceptor",
    "SheddingLevel",
    "StateChange",
    "WSGIShedder",
]
