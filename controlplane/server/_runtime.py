"""What a serving process runs on: logging, the event loop, the collector, signals.

:func:`serve_until_stopped` runs one :class:`ControlServer` until SIGTERM or SIGINT
(SIGHUP reloads it), on the loop :func:`run_event_loop` makes; ``controlplane serve``
and each worker process of ``--workers`` run it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click
import structlog

from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server._config import ServerConfig
from controlplane.server._control_server import ControlServer

log = structlog.get_logger("controlplane.server")


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


EMBEDDED_ETCD_MOST = "~2.5 GiB"
"""About the most the embedded etcd's data directory grows to: etcd's quota for its
database (2 GiB: past it, writes fail) and its write-ahead log (64 MB segments: 5 kept
once a snapshot lets older ones go, and the next allocated ahead, ~0.4 GiB)."""


def embedded_etcd_data(etcd: EmbeddedEtcd) -> str:
    """Where the embedded etcd keeps its data and how big it is, for the start-up line:
    ``data in /abs/path: 123 MiB now, at most ~2.5 GiB`` (MiB rounded up, as ``du -h``)."""
    size = math.ceil(etcd.disk_usage() / 2**20)
    return f"data in {etcd.data_dir}: {size} MiB now, at most {EMBEDDED_ETCD_MOST}"


def _say_listening(server: ControlServer, stop: asyncio.Event) -> None:
    config = server.config
    embedded = f", embedded, {embedded_etcd_data(server.etcd)}" if server.etcd else ""
    click.echo(
        f"control server listening on {server.address} (etcd {', '.join(server.etcd_endpoints)}"
        f"{embedded}; prefix {config.prefix}; {server.security_summary}"
        f"{f'; HTTP {server.http.url}' if server.http is not None else ''})",
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
