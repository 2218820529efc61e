"""Several server processes on one port: ``controlplane serve --workers N``.

One Python process fans changes out on one core. With ``--workers N`` a supervisor
process starts N workers, each a whole control server (its own etcd watch, hub,
presence and expiry loop, as replicas are) listening on the same address with
SO_REUSEPORT, so that the kernel spreads agents' connections over them and the
fan-out over cores. Everything a replica shares through etcd (writes, acks,
status, expiries) works across workers as across replicas.

The supervisor:

- checks every port free before anything starts (as a single server does);
- starts the embedded etcd (without ``--etcd``) and gives its endpoint to the
  workers; picks the port when ``--listen`` says 0;
- serves ``--metrics`` for all workers (prometheus-client's multiprocess mode:
  counters and histograms summed, gauges as each one says);
- says ``control server listening on ...`` once every worker serves, and exits 1
  naming the error when a worker cannot start (a port in use, a bad file);
- restarts a worker that dies (1 s after, doubling to 30 s while it keeps dying
  within a minute of its start);
- passes SIGHUP on (each worker reloads its auth file and certificates) and
  stops them all on SIGTERM or SIGINT (SIGKILL after ``STOP_GRACE``).

Workers ignore SIGINT (a Ctrl-C reaches the whole process group: the supervisor
stops them in order) and stop by themselves when the supervisor is gone (the
pipe to it closes), so a supervisor killed outright leaves no worker serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import click
import structlog

from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.metrics import (
    MetricsEndpoint,
    MitigationAges,
    forget_mitigation_ages,
    read_mitigation_ages,
)
from controlplane.server._config import ServerConfig, ServerConfigError
from controlplane.server._control_server import (
    ControlServer,
    serve_metrics,
    start_embedded_etcd,
)
from controlplane.server._ports import (
    Port,
    check_ports,
    grpc_port,
    http_port,
    port_error,
    serve_ports,
)
from controlplane.server._runtime import (
    configure_logging,
    embedded_etcd_data,
    run_event_loop,
    serve_until_stopped,
)
from controlplane.server.auth import AuthFileError

log = structlog.get_logger("controlplane.workers")

READY_TIMEOUT = 60.0
"""Seconds a worker has to serve after it starts."""
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STABLE = 60.0
"""A worker that served this long before it died is restarted after RESTART_DELAY again."""
STOP_GRACE = 10.0
"""Seconds workers have to stop after SIGTERM (their own grace is 5 s) before SIGKILL."""


class WorkerStartError(RuntimeError):
    """A worker could not start (its message says why)."""


@dataclass(eq=False)
class _Worker:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    link: Connection
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    exited: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def run_workers(config: ServerConfig, count: int, log_format: str) -> None:
    """Run ``count`` workers of ``config`` until SIGTERM or SIGINT.

    Raises:
        WorkerStartError: A worker could not start (the others are stopped).
    """
    asyncio.run(_Supervisor(config, count, log_format).run())


class _Supervisor:
    def __init__(self, config: ServerConfig, count: int, log_format: str) -> None:
        self.config = config
        self.count = count
        self.log_format = log_format
        self.workers: list[_Worker | None] = [None] * count
        self.serving = False
        """Every worker served once: from then on a worker that dies is restarted."""
        self.stopping = False
        self._context = multiprocessing.get_context("spawn")
        self._metrics_dir = ""
        self._restarts: list[asyncio.Task[None]] = []
        self._delays = [RESTART_DELAY] * count

    async def run(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        etcd: EmbeddedEtcd | None = None
        reserved: socket.socket | None = None
        reserved_http: socket.socket | None = None
        metrics_server: MetricsEndpoint | None = None
        self._metrics_dir = tempfile.mkdtemp(prefix="controlplane-metrics-")
        # Read by prometheus-client when a worker imports it: multiprocess mode.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        # Before anything starts: a stop during start-up stops what started.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            check_ports(serve_ports(config))
            if config.metrics:
                metrics_server = _serve_metrics(config, self._metrics_dir)
            if not config.etcd:
                etcd = await start_embedded_etcd(config)
                log.info(
                    "embedded_etcd_started", endpoint=etcd.endpoint, data_dir=str(etcd.data_dir)
                )
            listen, reserved = _reserve(config)
            http, reserved_http = _reserve_http(config)
            self.config = replace(
                config,
                listen=listen,
                http=http,
                etcd=[etcd.endpoint] if etcd is not None else config.etcd,
                metrics=None,
            )
            if stop.is_set():
                return
            for index in range(self.count):
                self._start(index)
            if not await self._all_ready(stop):
                return  # stopped while they started
            self.serving = True
            for held in (reserved, reserved_http):
                if held is not None:
                    held.close()
            reserved = reserved_http = None
            metrics_at = (
                f"{metrics_server.host}:{metrics_server.port}"
                if metrics_server is not None
                else None
            )
            pids = [w.process.pid for w in self.workers if w is not None]
            log.info(
                "workers_started",
                address=listen,
                workers=self.count,
                pids=pids,
                metrics=metrics_at,
            )
            click.echo(
                f"control server listening on {listen} ({self.count} workers, pids "
                f"{', '.join(map(str, pids))}; etcd {', '.join(self.config.etcd)}"
                f"{f', embedded, {embedded_etcd_data(etcd)}' if etcd is not None else ''}; "
                f"prefix {config.prefix}{f'; HTTP {_http_url(config, http)}' if http else ''})",
                err=True,
            )
            await stop.wait()
            log.info("shutdown_requested")
        finally:
            self.stopping = True
            for task in self._restarts:
                task.cancel()
            await self._stop_all()
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.close)
            for held in (reserved, reserved_http):
                if held is not None:
                    held.close()
            if etcd is not None:
                await asyncio.to_thread(etcd.stop)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    # -- workers -------------------------------------------------------------

    def _start(self, index: int) -> _Worker:
        mine, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(replace(self.config, worker=index), index, self.log_format, theirs),
            name=f"controlplane-worker-{index}",
            daemon=False,
        )
        process.start()
        theirs.close()
        worker = _Worker(index, process, mine)
        # A start failure is said once (by whoever waits for it); never "not retrieved".
        worker.ready.add_done_callback(_retrieve)
        self.workers[index] = worker
        loop = asyncio.get_running_loop()
        loop.add_reader(mine.fileno(), self._on_message, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)
        log.info("worker_started", worker=index, pid=process.pid)
        return worker

    def _on_message(self, worker: _Worker) -> None:
        try:
            kind, text = worker.link.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.link.fileno())
            return
        _settle(worker, kind, text)

    def _on_exit(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(worker.link.fileno())
        # The sentinel closes as the process exits, a moment before it can be reaped.
        worker.process.join(5.0)
        code = worker.process.exitcode
        code = -1 if code is None else code
        if not worker.ready.done():
            # Why it could not start, if it said so before it went.
            with contextlib.suppress(EOFError, OSError):
                while not worker.ready.done() and worker.link.poll():
                    _settle(worker, *worker.link.recv())  # EOFError at the end
        worker.link.close()
        _mark_dead(worker.process.pid, self._metrics_dir)
        if not worker.exited.done():
            worker.exited.set_result(code)
        if not worker.ready.done():
            worker.ready.set_exception(
                WorkerStartError(f"worker {worker.index} exited with code {code} before serving")
            )
        if self.stopping or not self.serving:
            return
        lived = time.monotonic() - worker.started
        if lived >= STABLE:
            self._delays[worker.index] = RESTART_DELAY
        delay = self._schedule_restart(worker.index)
        log.error(
            "worker_exited",
            worker=worker.index,
            pid=worker.process.pid,
            code=code,
            served_s=round(lived, 3),
            restart_in_s=delay,
        )

    def _schedule_restart(self, index: int) -> float:
        """Restart worker ``index`` after its delay, which doubles for the next time
        (up to RESTART_DELAY_MAX); returns the delay."""
        delay = self._delays[index]
        self._delays[index] = min(delay * 2, RESTART_DELAY_MAX)
        task = asyncio.create_task(self._restart(index, delay))
        self._restarts.append(task)
        task.add_done_callback(self._restarts.remove)
        return delay

    async def _restart(self, index: int, delay: float) -> None:
        """Start worker ``index`` again after ``delay``; one that does not come up
        is restarted in turn when it exits (killed here if it hangs)."""
        await asyncio.sleep(delay)
        if self.stopping:
            return
        try:
            worker = self._start(index)
        except OSError as exc:  # no process could be made: try again later
            log.error("worker_restart_failed", worker=index, error=str(exc))
            self._schedule_restart(index)
            return
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.shield(worker.ready)
        except (WorkerStartError, TimeoutError) as exc:
            log.error("worker_restart_failed", worker=index, error=str(exc) or "timed out")
            if worker.process.is_alive():
                worker.process.kill()
            return
        log.info("worker_restarted", worker=index, pid=worker.process.pid)

    async def _all_ready(self, stop: asyncio.Event) -> bool:
        """Until every worker serves (True) or a stop is asked for (False); raise the
        first one's reason it cannot, also for one that served and died meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        pending: set[asyncio.Future[Any]] = {w.ready for w in self.workers if w is not None}
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while pending:
                done, _ = await asyncio.wait(
                    [*pending, stopped],
                    timeout=max(deadline - loop.time(), 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stopped in done:
                    return False
                if not done:
                    raise WorkerStartError(
                        f"the workers did not all serve within {READY_TIMEOUT:g}s"
                    )
                failures = _failed(done)
                if failures:
                    raise failures[0]
                pending -= done
        finally:
            stopped.cancel()
        for worker in self.workers:
            if worker is not None and worker.exited.done():
                raise WorkerStartError(
                    f"worker {worker.index} exited with code {worker.exited.result()} "
                    "while the others started"
                )
        return True

    def _reload(self) -> None:
        log.info("reload_requested", workers=self.count)
        for worker in self.workers:
            # Only to those serving: until its handler is in, a worker would just end
            # (one starting reads the files anew anyway).
            if worker is not None and worker.ready.done() and not worker.exited.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGHUP)

    async def _stop_all(self) -> None:
        live = [w for w in self.workers if w is not None and not w.exited.done()]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGTERM)
        if not live:
            return
        _done, pending = await asyncio.wait([w.exited for w in live], timeout=STOP_GRACE)
        for worker in live:
            if not worker.exited.done():
                log.warning("worker_killed", worker=worker.index, pid=worker.process.pid)
                worker.process.kill()
        if pending:
            await asyncio.wait(pending, timeout=STOP_GRACE)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _failed(futures: Any) -> list[BaseException]:
    return [
        exc
        for f in futures
        if f.done() and not f.cancelled() and (exc := f.exception()) is not None
    ]


def _settle(worker: _Worker, kind: str, text: str) -> None:
    """A worker's word on its start: ``ready`` (its address) or ``failed`` (why)."""
    if worker.ready.done():
        return
    if kind == "ready":
        worker.ready.set_result(text)
    else:
        worker.ready.set_exception(WorkerStartError(text))


def _reserve(config: ServerConfig) -> tuple[str, socket.socket | None]:
    """``--listen`` with its port, checked free: another process listening on it (even
    one that would share it) is an error, as for a single server. Port 0: one picked
    now, held by a socket (SO_REUSEPORT, not listening) until the workers bind it too.

    Raises:
        ServerConfigError: The address cannot be bound.
    """
    port = grpc_port(config)
    if port is None:
        raise ServerConfigError(
            f"--listen {config.listen!r} is not HOST:PORT, which --workers needs "
            "(e.g. 127.0.0.1:50051)"
        )
    return _reserve_port(port, config.listen)


def _reserve_http(config: ServerConfig) -> tuple[str | None, socket.socket | None]:
    """``--http`` as :func:`_reserve` does ``--listen`` (None: no HTTP listener)."""
    port = http_port(config)
    if port is None or config.http is None:
        return None, None
    return _reserve_port(port, config.http)


def _reserve_port(port: Port, address: str) -> tuple[str, socket.socket | None]:
    family = socket.AF_INET6 if ":" in port.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if port.port == 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        else:
            # Past connections in TIME_WAIT do not count; a listener does (Linux).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((port.host, port.port))
    except OSError as exc:
        sock.close()
        raise port_error(port, exc) from None
    if port.port != 0:
        sock.close()
        return address, None
    return f"{address.rpartition(':')[0]}:{sock.getsockname()[1]}", sock


def _http_url(config: ServerConfig, address: str) -> str:
    return f"{'https' if config.tls_cert is not None else 'http'}://{address}"


def _serve_metrics(config: ServerConfig, folder: str) -> MetricsEndpoint:
    """Serve the workers' metrics on ``--metrics``, summed from ``folder``.

    Raises:
        PortError: The address cannot be bound.
    """
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    # Its series come and go with the records: from the files the workers leave.
    registry.register(MitigationAges(lambda: read_mitigation_ages(folder)))
    return serve_metrics(config, registry)


def _mark_dead(pid: int, folder: str) -> None:
    """Drop a gone worker's live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
    forget_mitigation_ages(folder, pid)


# ---------------------------------------------------------------- the worker


def _worker_main(config: ServerConfig, index: int, log_format: str, link: Connection) -> None:
    """A worker process: one control server until SIGTERM or the supervisor is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the server's own handler is in
    configure_logging(log_format)
    structlog.contextvars.bind_contextvars(worker=index)

    def on_ready(server: ControlServer, stop: asyncio.Event) -> None:
        link.send(("ready", server.address))
        # The supervisor never writes again: readable means it is gone.
        asyncio.get_running_loop().add_reader(link.fileno(), _supervisor_gone, stop)

    try:
        run_event_loop(
            serve_until_stopped(config, on_ready=on_ready, stop_signals=(signal.SIGTERM,))
        )
    except (ServerConfigError, AuthFileError) as exc:
        with contextlib.suppress(OSError):
            link.send(("failed", str(exc)))
        sys.exit(1)
    except Exception as exc:
        log.exception("worker_failed")
        with contextlib.suppress(OSError):
            link.send(("failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)


def _supervisor_gone(stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.warning("supervisor_gone", message="stopping: the supervisor process is gone")
        stop.set()
