"""What the server is told (:class:`ServerConfig`) and the checks it must pass.

Options come from the command line, else the environment (``CONTROLPLANE_LISTEN``,
``CONTROLPLANE_ETCD``, ...), else the defaults of :class:`ServerConfig`. What can be wrong
with a configuration fails as :class:`ServerConfigError` before etcd starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from controlplane.store import DEFAULT_PREFIX, EtcdSecurity
from controlplane.transport import is_loopback_target

MIN_AUDIT_RETENTION = timedelta(hours=1)
DEFAULT_STALE_AFTER = timedelta(hours=4)
"""A mitigation in force without expiry for longer than this is likely forgotten."""


@dataclass(slots=True)
class ServerConfig:
    """Everything the server is told; see ``controlplane serve --help``."""

    listen: str = "127.0.0.1:50051"
    etcd: list[str] = field(default_factory=list)  # empty: embedded etcd
    prefix: str = DEFAULT_PREFIX
    metrics: str | None = "127.0.0.1:9464"  # None: no metrics endpoint
    # HOST:PORT of the HTTP listener (the JSON mirror of MitigationService); None: off.
    http: str | None = None
    # Web origins whose pages may call the OFREP routes (CORS); "*": any; empty: none.
    http_cors_origins: tuple[str, ...] = ()
    etcd_timeout: float = 2.0
    audit_retention: timedelta = timedelta(days=30)
    data_dir: Path = Path(".controlplane")
    embedded_etcd_client_port: int = 2379
    embedded_etcd_peer_port: int = 2380
    health_interval: float = 1.0
    maintenance_interval: float = 60.0
    # Longest wait between looks for expired changes when nothing is written: the loop
    # wakes at the next expiry it knows of and at every write the hub sees (another
    # replica's may add an earlier one), so this only bounds a missed wake-up (a watch
    # that stalled without failing, a wall clock that jumped).
    expiry_interval: float = 5.0
    # A mitigation in force without expiry for longer than this is stale (--stale-after):
    # `cpctl status` warns of it (GetStatusResponse.stale).
    stale_after: timedelta = DEFAULT_STALE_AFTER
    # How often the gauges that age with time (unapplied changes) are refreshed.
    metrics_interval: float = 1.0
    # The notifications file (--notify): where audited changes are told; None: nowhere.
    notify_file: Path | None = None
    # Security (see controlplane.server.auth): None everywhere is the local default.
    auth_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # given: clients must present a certificate it signed
    insecure: bool = False  # allow plaintext on an address that is not loopback
    no_auth: bool = False  # allow serving without authentication off loopback
    etcd_insecure: bool = False  # allow plaintext to etcd endpoints off loopback
    max_streams_per_identity: int | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    etcd_security: EtcdSecurity | None = None  # TLS and user to an external etcd
    # One of several worker processes on one port (controlplane.server._workers): the port is
    # shared (SO_REUSEPORT). Otherwise a port in use is an error, never shared.
    worker: int | None = None


class ServerConfigError(ValueError):
    """The server cannot start with this configuration; the message names the option."""


def check_exposure(config: ServerConfig, *, serves_tls: bool) -> None:
    """Refuse to serve off loopback without TLS or authentication, or to reach a remote
    etcd in plaintext, unless the configuration allows it explicitly.

    Raises:
        ServerConfigError: The option to give is named in the message.
    """
    if not serves_tls and not is_loopback_target(config.listen) and not config.insecure:
        raise ServerConfigError(
            f"--listen {config.listen} is not a loopback address: serve TLS "
            "(--tls-cert and --tls-key) or allow plaintext explicitly (--insecure)"
        )
    if config.auth_file is None and not is_loopback_target(config.listen) and not config.no_auth:
        raise ServerConfigError(
            f"--listen {config.listen} is not a loopback address: give --auth-file "
            "(who may do what), or --no-auth to let anyone who reaches it change mitigations"
        )
    if config.http is not None:
        if not serves_tls and not is_loopback_target(config.http) and not config.insecure:
            raise ServerConfigError(
                f"--http {config.http} is not a loopback address: serve TLS "
                "(--tls-cert and --tls-key) or allow plaintext explicitly (--insecure)"
            )
        if config.auth_file is None and not is_loopback_target(config.http) and not config.no_auth:
            raise ServerConfigError(
                f"--http {config.http} is not a loopback address: give --auth-file "
                "(who may do what), or --no-auth to let anyone who reaches it change mitigations"
            )
    etcd_tls = config.etcd_security is not None and config.etcd_security.uses_tls
    remote = [e for e in config.etcd if not is_loopback_target(_etcd_host(e))]
    if remote and not etcd_tls and not config.etcd_insecure:
        raise ServerConfigError(
            f"etcd {', '.join(remote)} is not on loopback: reach it over TLS (--etcd-ca, "
            "and --etcd-cert/--etcd-key for client certificates) or allow plaintext "
            "explicitly (--etcd-insecure)"
        )


def _etcd_host(endpoint: str) -> str:
    """``host:port`` of an etcd endpoint given as ``host:port`` or an http(s) URL."""
    return endpoint.split("://", 1)[-1].rstrip("/")
