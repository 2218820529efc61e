"""How clients reach the control server: TLS, mutual TLS, bearer tokens, plaintext rules.

Shared by ``cpctl``, the agent SDK and the ``cp-agent`` sidecar (and used by the server
for its own listen address). It imports only grpc and the standard library, so that the
SDK pulls in nothing of the server.

Plaintext is allowed without asking only to loopback addresses (127.0.0.0/8, ::1,
``localhost``, unix sockets); anything else needs TLS or an explicit ``insecure``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"
"""The metadata key tokens travel in, as ``Bearer <token>``."""

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})
# A token goes into an HTTP/2 header: visible ASCII, no spaces.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")
MAX_TOKEN_CHARS = 4096


class TransportConfigError(ValueError):
    """A connection setting is missing, contradictory or unreadable; the message names it."""


def _split_host(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, ``host`` or ``[v6]``."""
    address = address.strip()
    if address.startswith("["):
        return address[1 : address.index("]")] if "]" in address else address[1:]
    if address.count(":") > 1:  # a bare IPv6 address
        return address
    return address.rpartition(":")[0] if ":" in address else address


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names; ``["unix"]`` for unix sockets.

    Understands ``host:port``, ``[::1]:port``, ``dns:///host:port``, ``dns:host:port``,
    ``ipv4:a:p,b:p``, ``ipv6:[a]:p,[b]:p`` and ``unix:path`` / ``unix://path``.
    """
    target = target.strip()
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("unix", "unix-abstract"):
        return ["unix"]
    if sep and scheme == "dns":
        rest = rest[2:] if rest.startswith("//") else rest
        rest = rest.partition("/")[2] if "/" in rest else rest  # dns://authority/host:port
        return [_split_host(rest)]
    if sep and scheme in ("ipv4", "ipv6"):
        return [_split_host(part) for part in rest.split(",") if part.strip()]
    return [_split_host(target)]


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is a loopback address or name (``unix`` counts: a local socket)."""
    host = host.strip().lower()
    if host in _LOOPBACK_NAMES or host == "unix":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Whether every address ``target`` names is on loopback."""
    hosts = target_hosts(target)
    return bool(hosts) and all(is_loopback_host(h) for h in hosts)


def validate_token(token: str, source: str) -> str:
    """``token`` without surrounding whitespace, or an error naming ``source``."""
    token = token.strip()
    if token.lower().startswith("bearer "):
        token = token[7:].strip()
    if not token:
        raise TransportConfigError(f"{source} is empty")
    if not _TOKEN_RE.fullmatch(token):
        raise TransportConfigError(
            f"{source} must be 1-{MAX_TOKEN_CHARS} visible ASCII characters without spaces"
        )
    return token


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TransportConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise TransportConfigError(f"{what} {path} is empty")
    return data


@dataclass(frozen=True)
class ClientSecurity:
    """A client's connection settings.

    Attributes:
        token: A bearer token (never printed: excluded from ``repr``).
        token_file: A file holding the token, read again for each new connection
            (so a rotated token is picked up without a restart).
        tls: Use TLS even without ``ca`` (the system's roots then verify the server).
        ca: The CA bundle (PEM) that verifies the server; implies TLS.
        cert: This client's certificate (PEM) for mutual TLS; needs ``key``.
        key: Its private key (PEM).
        server_name: The name to verify the server's certificate against, when it
            differs from the target's host.
        insecure: Allow plaintext to an address that is not on loopback.
    """

    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise TransportConfigError("give a token or a token file, not both")
        if self.token is not None:
            object.__setattr__(self, "token", validate_token(self.token, "the token"))
        if (self.cert is None) != (self.key is None):
            raise TransportConfigError(
                "a client certificate needs its key and a key its certificate "
                "(both --tls-cert and --tls-key)"
            )
        if self.insecure and self.uses_tls:
            raise TransportConfigError("insecure (plaintext) contradicts the TLS settings given")

    @property
    def uses_tls(self) -> bool:
        """Whether connections use TLS."""
        return self.tls or self.ca is not None or self.cert is not None

    def check_target(self, target: str) -> None:
        """Refuse plaintext to an address off loopback unless ``insecure`` was chosen.

        Raises:
            TransportConfigError: naming the target and the ways out.
        """
        if self.uses_tls or self.insecure or is_loopback_target(target):
            return
        raise TransportConfigError(
            f"{target} is not a loopback address: connect with TLS (a CA to verify the "
            "server, e.g. --tls-ca) or allow plaintext explicitly (--insecure)"
        )

    def bearer(self) -> str | None:
        """The token to send, read from ``token_file`` now if that is where it lives."""
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return None
        raw = _read(self.token_file, "token file").decode("utf-8", errors="replace")
        return validate_token(raw, f"token file {self.token_file}")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token (empty without one)."""
        token = self.bearer()
        return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials from the files (None for plaintext)."""
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA file") if self.ca else None,
            private_key=_read(self.key, "key file") if self.key else None,
            certificate_chain=_read(self.cert, "certificate file") if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options these settings need (the TLS name override)."""
        if self.uses_tls and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def channel(self, target: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A blocking channel to ``target`` (checked with :meth:`check_target`)."""
        self.check_target(target)
        opts = [*(options or []), *self.channel_options()]
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, creds, options=opts)

    def aio_channel(
        self, target: str, options: list[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``target`` (checked with :meth:`check_target`)."""
        self.check_target(target)
        opts = [*(options or []), *self.channel_options()]
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, creds, options=opts)


def path_or_none(value: str | os.PathLike[str] | None) -> Path | None:
    """A path from an option or environment variable; empty means none."""
    if value is None:
        return None
    text = os.fspath(value)
    return Path(text).expanduser() if text.strip() else None
