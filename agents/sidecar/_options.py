"""The sidecar's settings: the options, their defaults and environment variables,
and what the sidecar needs of an agent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agents._config import (
    ENV_INSECURE,
    ENV_TLS,
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
    ENV_TLS_SERVER_NAME,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
)
from agents._state import Snapshot, StateChange

DEFAULT_LISTEN = "127.0.0.1:9465"
HOOK_ATTEMPTS = 5
HOOK_TIMEOUT = 300.0
HOOK_BACKOFF = 1.0
"""Seconds before the first retry of a failed hook; doubled per attempt."""
HOOK_BACKOFF_CAP = 30.0
HOOK_STOP_GRACE = 10.0
"""Seconds a running hook may take to finish when the sidecar stops."""
STATE_RETRY = 0.1
"""Seconds before the state file writer tries a failed write again; doubled per
failure up to STATE_RETRY_CAP. It wakes for nothing else but what changes the file."""
STATE_RETRY_CAP = 1.0
STATE_FILE_MODE = 0o644
"""The state file's permissions: readable by the service's other users."""

ENV_LISTEN = "CP_AGENT_LISTEN"
ENV_STATE_FILE = "CP_AGENT_STATE_FILE"
ENV_ON_CHANGE = "CP_AGENT_ON_CHANGE"
ENV_ON_PIN_CHANGE = "CP_AGENT_ON_PIN_CHANGE"
ENV_HOOK_TIMEOUT = "CP_AGENT_HOOK_TIMEOUT"
ENV_HOOK_ATTEMPTS = "CP_AGENT_HOOK_ATTEMPTS"
ENV_LOG_LEVEL = "CP_AGENT_LOG_LEVEL"


class SidecarAgent(Protocol):
    """What the sidecar needs of an agent: :class:`agents.Agent`, or
    :class:`agents.testing.StaticAgent` in tests.

    The sidecar lives in the SDK's package and reads the agent's immutable
    snapshot itself: one attribute read gives flags, shedding, pin and revision
    of one and the same revision.
    """

    _snapshot: Snapshot

    @property
    def state(self) -> str: ...

    def on_change(self, callback: Callable[[StateChange], None]) -> Callable[[], None]: ...

    def on_state(self, callback: Callable[[str], object]) -> Callable[[], None]: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    """The sidecar's settings (each described in the ``agents.sidecar`` docstring)."""

    service: str
    servers: tuple[str, ...] = ()
    version: str = ""
    instance_id: str | None = None
    cache: Path | None = None
    listen: str = DEFAULT_LISTEN
    state_file: Path | None = None
    on_change: str | None = None
    on_pin_change: str | None = None
    hook_timeout: float = HOOK_TIMEOUT
    hook_attempts: int = HOOK_ATTEMPTS
    hook_backoff: float = HOOK_BACKOFF
    """Seconds before a hook's first retry (tests make it short)."""
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls: bool | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    insecure: bool | None = None
    """The connection settings, as the agent's arguments (None: the agent's
    environment variable, else its default)."""


SECURITY_NAMES = {
    "token": ENV_TOKEN,
    "token_file": f"--token-file/{ENV_TOKEN_FILE}",
    "tls": f"--tls/{ENV_TLS}",
    "ca": f"--tls-ca/{ENV_TLS_CA}",
    "cert": f"--tls-cert/{ENV_TLS_CERT}",
    "key": f"--tls-key/{ENV_TLS_KEY}",
    "server_name": f"--tls-server-name/{ENV_TLS_SERVER_NAME}",
    "insecure": f"--insecure/{ENV_INSECURE}",
}
"""What cp-agent's errors call the connection settings (``controlplane.transport``)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6; port 0: any free port) as a pair.

    Raises:
        ValueError: It is not that.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
