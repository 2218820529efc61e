"""Prometheus metrics of the control server; every metric takes a registry.

Names are ``controlplane_*`` with ``_total`` / ``_seconds`` suffixes. Tests build
:class:`ServerMetrics` on a fresh ``CollectorRegistry`` and read samples with
``registry.get_sample_value``. :class:`MetricsEndpoint` serves a registry over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from controlplane._serving import WakeableServer


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


class MetricsEndpoint:
    """A registry served over HTTP (``/metrics``) by a thread of its own.

    Binds at construction (``OSError`` when it cannot: the port in use, ...), serves
    until :meth:`close`.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]

        class Server(WakeableServer, ThreadingWSGIServer):
            address_family = family

        self._server = make_server(
            str(sockaddr[0]), port, make_wsgi_app(registry), Server, handler_class=_Quiet
        )
        self.host = host
        self.port: int = self._server.server_port
        # Idle, the thread waits on the sockets and wakes for nothing (prometheus-client's
        # own endpoint looks for a stop every 0.5 s, half a second of every stop).
        self._thread = threading.Thread(
            target=self._server.serve, name="metrics-endpoint", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and let the port go, at once. Idempotent."""
        self._server.stop()
        self._thread.join()
        self._server.server_close()


MitigationAgeRows = Callable[[], Iterable[tuple[str, str, str, float]]]
"""What :class:`MitigationAges` reads: (kind, service, flag name, set_at in Unix seconds)."""


class MitigationAges:
    """``controlplane_mitigation_age_seconds``: for every record in force without expiry,
    seconds since it was set; computed at each scrape from ``source`` (the hub's mirror),
    so a record that goes away leaves no series behind.

    A collector of its own rather than a gauge: its label sets come and go with the
    records, and a scrape costs one pass over them (about 15 ms for 10,000).
    """

    NAME = "controlplane_mitigation_age_seconds"
    HELP = (
        "Seconds since a mitigation in force without expiry was set, by kind (flag, "
        "shedding, pin), service (global for global flags) and name (the flag's; empty "
        "for shedding and pins)."
    )
    LABELS = ("kind", "service", "name")

    def __init__(self, source: MitigationAgeRows = tuple) -> None:
        self.source = source
        self.clock: Callable[[], float] = time.time

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        now = self.clock()
        for kind, service, name, set_at in self.source():
            family.add_metric((kind, service, name), max(0.0, now - set_at))
        yield family


_AGES_FILE = "mitigation-ages-{pid}.json"


def write_mitigation_ages(
    folder: str, revision: int, rows: Iterable[tuple[str, str, str, float]]
) -> None:
    """Leave this worker's records without expiry in ``folder`` (the ``--workers``
    supervisor's metrics directory) for :func:`read_mitigation_ages`: a gauge whose
    series come and go cannot go through prometheus-client's multiprocess files."""
    path = Path(folder) / _AGES_FILE.format(pid=os.getpid())
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"revision": revision, "rows": list(rows)}))
    os.replace(temporary, path)


def read_mitigation_ages(folder: str) -> list[tuple[str, str, str, float]]:
    """The rows the worker with the newest mirror left in ``folder`` (workers mirror the
    same records; one that fell behind, or died, is not the one read)."""
    best: tuple[int, list[tuple[str, str, str, float]]] = (-1, [])
    for path in Path(folder).glob(_AGES_FILE.format(pid="*")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text())
            if int(data["revision"]) > best[0]:
                rows = [(str(k), str(s), str(n), float(t)) for k, s, n, t in data["rows"]]
                best = (int(data["revision"]), rows)
    return best[1]


def forget_mitigation_ages(folder: str, pid: int) -> None:
    """Remove what a worker that ended left (:func:`write_mitigation_ages`)."""
    with contextlib.suppress(OSError):
        (Path(folder) / _AGES_FILE.format(pid=pid)).unlink()


_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Every metric the control server exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rpcs = Counter(
            "controlplane_rpcs_total",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "controlplane_rpc_duration_seconds",
            "Time to handle an RPC, by method.",
            ["method"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.etcd_seconds = Histogram(
            "controlplane_etcd_operation_duration_seconds",
            "Time of one etcd operation, by operation and outcome.",
            ["operation", "outcome"],
            buckets=_RPC_BUCKETS,
            registry=registry,
        )
        self.write_batch_size = Histogram(
            "controlplane_write_batch_size",
            "Writes sent to etcd together in one shared transaction (group commit), "
            "for transactions of two or more.",
            buckets=(2, 4, 8, 16, 24),
            registry=registry,
        )
        self.invalid_records = Counter(
            "controlplane_invalid_records_total",
            "Records in etcd that did not parse or broke a rule, by kind (each read counts).",
            ["kind"],
            registry=registry,
        )
        self.active_mitigations = Gauge(
            "controlplane_active_mitigations",
            "Records in force, by kind (flag, shedding, pin).",
            ["kind"],
            registry=registry,
            # With --workers, each worker counts the same records: one count.
            multiprocess_mode="livemax",
        )
        self.audit_deleted = Counter(
            "controlplane_audit_records_deleted_total",
            "Audit records removed by the retention period.",
            registry=registry,
        )
        self.override_reports_dropped = Counter(
            "controlplane_override_reports_dropped_total",
            "Agents' override reports not audited: over what one instance may report.",
            registry=registry,
        )
        self.changes = Counter(
            "controlplane_changes_total",
            "Changes written, by action (flag.set, pin.clear, ...).",
            ["action"],
            registry=registry,
        )
        self.agents_connected = Gauge(
            "controlplane_agents_connected",
            "Agent streams connected, by service (with --workers, all workers together).",
            ["service"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.change_unapplied = Gauge(
            "controlplane_change_unapplied_seconds",
            "Seconds for which some agent of the service connected to this server process "
            "has not applied the service's newest change (0: every one has; refreshed "
            "every second).",
            ["service"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.fanout_seconds = Histogram(
            "controlplane_fanout_duration_seconds",
            "Time from an etcd watch event to its change queued for every stream.",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=registry,
        )
        self.stream_write_seconds = Histogram(
            "controlplane_stream_write_delay_seconds",
            "Time from a change entering a service's feed to its write on an agent's stream "
            "(1 stream in 16 is timed).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self.ack_seconds = Histogram(
            "controlplane_ack_lag_seconds",
            "Time from a change entering a service's feed to an agent's ack of it "
            "(1 stream in 16 is timed).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
            registry=registry,
        )
        self.snapshots = Counter(
            "controlplane_snapshots_total",
            "Snapshots sent to agents, by reason (connect, resume_impossible, behind).",
            ["reason"],
            registry=registry,
        )
        self.resumes = Counter(
            "controlplane_resumes_total",
            "Agent streams resumed from their last applied revision (no snapshot).",
            registry=registry,
        )
        self.resyncs = Counter(
            "controlplane_resyncs_total",
            "Times the hub re-read the whole state, by reason.",
            ["reason"],
            registry=registry,
        )
        self.nacks = Counter(
            "controlplane_agent_nacks_total",
            "Changes agents rejected, by service.",
            ["service"],
            registry=registry,
        )
        self.etcd_up = Gauge(
            "controlplane_etcd_up",
            "1 when the last etcd operation or health probe succeeded, else 0 (with "
            "--workers, 0 if any worker's did not).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.auth_refused = Counter(
            "controlplane_auth_refused_total",
            "Calls refused before their handler ran, by method and code "
            "(UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED).",
            ["method", "code"],
            registry=registry,
        )
        self.auth_reloads = Counter(
            "controlplane_auth_reloads_total",
            "Reloads of the auth file and TLS certificates (SIGHUP), by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.auth_identities = Gauge(
            "controlplane_auth_identities",
            "Identities in the auth file in force (0 with authentication off).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.notifications_sent = Counter(
            "controlplane_notifications_sent_total",
            "Notifications delivered (2xx), by destination and event kind.",
            ["destination", "kind"],
            registry=registry,
        )
        self.notification_errors = Counter(
            "controlplane_notification_send_errors_total",
            "Failed attempts to deliver a notification (each is retried), by destination.",
            ["destination"],
            registry=registry,
        )
        self.notifications_failed = Counter(
            "controlplane_notifications_failed_total",
            "Notifications given up on after retrying for --notify's give_up_after, by "
            "destination (listed by `cpctl notifications failed`).",
            ["destination"],
            registry=registry,
        )
        self.notifications_pending = Gauge(
            "controlplane_notifications_pending",
            "Audited changes not yet delivered, by destination (on the sending process).",
            ["destination"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.mitigation_ages = MitigationAges()
        """Fed by the server with its hub's records (``source``)."""
        registry.register(self.mitigation_ages)
        self.notify_sender = Gauge(
            "controlplane_notify_sender",
            "1 on the server process that sends notifications now, else 0.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.trigger_fires = Counter(
            "controlplane_trigger_fires_total",
            "Triggers fired by alerts, by trigger and outcome (fired, disabled, cooldown, "
            "dry_run, reverted).",
            ["trigger", "outcome"],
            registry=registry,
        )
